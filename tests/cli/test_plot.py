"""`fastformer plot`: which metrics, grouped into which panels, drawn from which runs."""

import json
import os

import pytest

from fastformer import FastformerError, use_backend
from fastformer.cli import main
from fastformer.cli.plot import METRICS, panels, plot_data

PNG = b"\x89PNG\r\n\x1a\n"


def write_run(path, records):
    os.makedirs(path)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.write('{"step": 99, "loss"')  # a line cut by a crash is skipped
    return str(path)


@pytest.fixture
def runs(tmp_path):
    """A byte-level and a BPE language-model run (val_bpb on evaluation steps) and an encoder-decoder."""
    def lm(loss0, bpb0):
        return [{"step": s, "loss": loss0 / s, "lr": 1e-3 * s, "tokens_per_sec": 1000.0 + s,
                 **({"val_loss": loss0 / s + 0.1, "val_ppl": 2.0 + s, "val_bpb": bpb0 / s} if s % 2 == 0 else {})}
                for s in range(1, 5)]
    seq2seq = [{"step": s, "loss": 3.0 / s, "lr": 1e-3, "tokens_per_sec": 500.0,
                **({"val_loss": 2.0, "val_acc": 0.5, "val_exact": 0.1, "val_bleu": 3.0} if s == 4 else {})}
               for s in range(1, 5)]
    return (write_run(tmp_path / "bytes", lm(4.0, 2.0)), write_run(tmp_path / "bpe", lm(8.0, 1.5)),
            write_run(tmp_path / "reverse", seq2seq))


def test_metrics_in_one_unit_share_a_panel_the_others_stand_side_by_side():
    assert set(METRICS) == {"loss", "val_loss", "val_bpb", "val_ppl", "lr", "tokens_per_sec"}
    assert panels(["val_bpb", "loss", "lr", "val_loss"]) == [
        ("bits per byte", ["val_bpb"]), ("loss (nats per token)", ["loss", "val_loss"]),
        ("learning rate", ["lr"])]
    with pytest.raises(FastformerError, match="--metric must be one of loss, val_loss, .* got 'acc'"):
        panels(["acc"])


def test_plot_data_holds_every_run_on_its_evaluation_steps(runs):
    bytes_run, bpe_run, _ = runs
    (label, lines), = plot_data([bytes_run, bpe_run], ["val_bpb"])
    assert label == "bits per byte"
    assert [(i, name, steps, values) for i, name, _, steps, values in lines] == [
        (0, "bytes", [2, 4], [1.0, 0.5]), (1, "bpe", [2, 4], [0.75, 0.375])]
    (_, lines), = plot_data([bytes_run], ["loss", "val_loss"])
    assert [(name, steps) for _, name, _, steps, _ in lines] == [("bytes train", [1, 2, 3, 4]),
                                                                 ("bytes val", [2, 4])]


def test_a_run_without_a_metric_is_left_out_and_a_metric_no_run_logs_is_refused(runs):
    bytes_run, _, reverse = runs
    (_, lines), = plot_data([reverse, bytes_run], ["val_bpb"])
    assert [(i, name) for i, name, *_ in lines] == [(1, "bytes")]  # the colour still follows the run
    with pytest.raises(FastformerError, match=r"no run logs val_ppl: .*reverse \(language models log val_bpb"):
        plot_data([reverse], ["loss", "val_ppl"])


def test_cli_writes_a_png_of_several_panels_on_a_log_axis(runs, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = str(tmp_path / "p.png")
    assert main(["plot", *runs[:2], "--metric", "val_bpb", "val_ppl", "lr", "tokens_per_sec", "--logy",
                 "--out", png]) == 0
    assert capsys.readouterr().out == f"wrote {png}\n"
    with open(png, "rb") as f:
        assert f.read(8) == PNG
    assert not os.path.exists(png + ".tmp")
    assert main(["plot", runs[2], "--metric", "val_bpb", "--out", str(tmp_path / "q.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastformer plot: error: no run logs val_bpb") and err.count("\n") == 1
    assert not (tmp_path / "q.png").exists()
    with pytest.raises(SystemExit):
        main(["plot", runs[0], "--metric", "bleu", "--out", png])
    assert "invalid choice: 'bleu'" in capsys.readouterr().err


def test_a_trained_language_model_logs_what_plot_reads(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    data = tmp_path / "data.txt"
    data.write_text("To be, or not to be, that is the question.\n" * 40, encoding="utf-8")
    run = str(tmp_path / "run")
    with use_backend("numpy"):
        assert main(["train", "--data", str(data), "--out", run, "--max-steps", "4", "--set", "model.d_model=16",
                     "--set", "model.d_ff=32", "--set", "model.n_layers=1", "--set", "train.batch_size=4",
                     "--set", "train.seq_len=32", "--set", "model.max_seq_len=32", "--set", "train.eval_interval=2",
                     "--set", "train.eval_batches=1", "--set", "train.log_interval=1"]) == 0
    capsys.readouterr()
    with open(os.path.join(run, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:  # bits per byte: the summed nats over the predicted bytes; one byte per token here
        assert r["val_bpb"] == pytest.approx(r["val_loss"] / 0.6931471805599453, rel=1e-6)
    png = str(tmp_path / "run.png")
    assert main(["plot", run, "--metric", *METRICS, "--out", png]) == 0
    with open(png, "rb") as f:
        assert f.read(8) == PNG
