"""The command line end to end on a tiny config: train -> resume -> generate, info, plot, scripts."""

import json
import os
import re
import subprocess
import sys

import pytest

from fastformer import FastformerError, TransformerLM, use_backend
from fastformer.cli import info as info_command
from fastformer.cli import main, plot
from fastformer.training.checkpoint import checkpoint_dirs, load_model
from fastformer.training.config import preset

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TINY_YAML = """\
model: {max_seq_len: 32, d_model: 16, n_heads: 2, d_ff: 32, n_layers: 1}
train: {batch_size: 4, seq_len: 32, max_steps: 4, warmup_steps: 1, log_interval: 1, eval_interval: 2,
        eval_batches: 1, checkpoint_interval: 2}
"""


@pytest.fixture
def files(tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("To be, or not to be, that is the question.\n" * 40, encoding="utf-8")
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY_YAML)
    return str(data), str(cfg), str(tmp_path / "run")


def test_train_resume_generate(files, capsys):
    data, cfg, run = files
    with use_backend("numpy"):  # restores the backend that --backend changes
        assert main(["train", "--config", cfg, "--data", data, "--out", run, "--seed", "3", "--backend", "numpy"]) == 0
    assert "done: step 4" in capsys.readouterr().out
    assert [os.path.basename(d) for d in checkpoint_dirs(run)] == ["ckpt-000002", "ckpt-000004"]
    assert {"config.yaml", "metrics.jsonl"} <= set(os.listdir(run))
    assert set(os.listdir(checkpoint_dirs(run)[-1])) == {"model.safetensors", "optimizer.safetensors",
                                                        "config.yaml", "tokenizer.json", "state.json"}

    # resume to a longer run; the saved config (seed, data path) is reused
    assert main(["train", "--resume", "--out", run, "--max-steps", "6", "--set", "train.eval_interval=3"]) == 0
    assert "done: step 6" in capsys.readouterr().out
    with open(os.path.join(run, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert main(["train", "--resume", "--out", run, "--preset", "small"]) == 2
    assert "drop --preset" in capsys.readouterr().err

    assert main(["generate", "--checkpoint", run, "--prompt", "To be", "--max-new-tokens", "12",
                 "--temperature", "0"]) == 0
    greedy = capsys.readouterr().out
    assert greedy.startswith("To be") and len(greedy) > len("To be")
    assert main(["generate", "--checkpoint", checkpoint_dirs(run)[-1], "--prompt", "To be", "--max-new-tokens",
                 "12", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == greedy  # run dir means its newest checkpoint
    assert main(["generate", "--checkpoint", run, "--prompt", "To", "--temperature", "0.9", "--top-k", "5",
                 "--top-p", "0.9", "--seed", "1", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("To")
    assert main(["generate", "--checkpoint", run, "--prompt", "To be", "--max-new-tokens", "12", "--beam", "1",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out == greedy  # one beam is greedy
    assert main(["generate", "--checkpoint", run, "--prompt", "To be", "--max-new-tokens", "12", "--beam", "3"]) == 0
    beam = capsys.readouterr().out
    assert beam.startswith("To be") and len(beam) > len("To be")
    model, tok, _ = load_model(run)
    best = model.generate(tok.encode("To be"), 12, beam_size=3, eos_id=tok.eos_id)
    assert beam == tok.decode(best.tolist()) + "\n"
    assert main(["generate", "--checkpoint", run, "--prompt", "To", "--beam", "0"]) == 2
    assert "beam_size must be an integer >= 1, got 0" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", run, "--prompt", "To", "--temperature", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "temperature must be a finite number >= 0, got -1.0" in err
    assert main(["generate", "--checkpoint", run, "--prompt", "To", "--top-p", "1.5"]) == 2
    assert "top_p must be a number in (0, 1], got 1.5" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", run, "--prompt", ""]) == 2
    assert "--prompt is empty" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(os.path.dirname(run)), "--prompt", "x"]) == 2
    assert "no checkpoint in" in capsys.readouterr().err


def test_missing_data_file(files, capsys):
    _, cfg, run = files
    assert main(["train", "--config", cfg, "--data", "/nonexistent/corpus.txt", "--out", run]) == 2
    assert "data file '/nonexistent/corpus.txt' does not exist" in capsys.readouterr().err


def test_info_reports_parameters(capsys):
    assert main(["info", "--preset", "small"]) == 0
    out = capsys.readouterr().out
    n = TransformerLM(preset("small").model).num_parameters()
    assert f"{n:,} parameters" in out and "backend:" in out and "threads" in out


def test_plot(files, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    data, cfg, run = files
    assert main(["train", "--config", cfg, "--data", data, "--out", run]) == 0
    png = str(tmp_path / "loss.png")
    assert main(["plot", run, run, "--out", png]) == 0
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(tmp_path), "--out", png]) == 2
    assert "no metrics in" in capsys.readouterr().err


def test_scripts_are_thin_wrappers():
    r = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "train.py"), "--set", "train.bogus=1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown config key train.bogus" in r.stderr
    r = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "generate.py"), "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--top-p" in r.stdout


def test_bad_input_is_one_line_and_exit_status_2(monkeypatch, capsys):
    assert main(["train", "--set", "train.batch_size=true"]) == 2
    assert capsys.readouterr().err == "fastformer train: error: config key train.batch_size must be int, got 'true'\n"

    def bad_input(args):
        raise FastformerError("the first line\n  and the second")

    monkeypatch.setattr(info_command, "main", bad_input)
    assert main(["info"]) == 2
    assert capsys.readouterr().err == "fastformer info: error: the first line and the second\n"


@pytest.mark.parametrize("bug", [ZeroDivisionError("division by zero"), TypeError("unsupported operand"),
                                 ValueError("cannot reshape array of size 2 into shape (3,)")])
def test_any_other_exception_is_a_bug_and_keeps_its_traceback(monkeypatch, bug):
    def command(args):
        raise bug

    monkeypatch.setattr(info_command, "main", command)
    with pytest.raises(type(bug), match=re.escape(str(bug))):
        main(["info"])


def test_file_errors_are_one_line_and_exit_status_2(files, monkeypatch, capsys):
    data, cfg, _ = files
    assert main(["train", "--config", cfg, "--data", data, "--out", "/dev/null/run"]) == 2  # not a directory
    err = capsys.readouterr().err
    assert err == "fastformer train: error: '/dev/null/run': Not a directory\n"

    def missing(args):
        raise FileNotFoundError(2, "No such file or directory", "corpus.txt")

    monkeypatch.setattr(plot, "main", missing)
    assert main(["plot", "run", "--out", "loss.png"]) == 2
    assert capsys.readouterr().err == "fastformer plot: error: 'corpus.txt': No such file or directory\n"


def test_bf16_on_a_cpu_without_it_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    pytest.importorskip("numba")
    from fastformer.kernels.ops import gemm_bf16

    monkeypatch.setattr(gemm_bf16, "cpu_has_bf16", lambda: False)  # as on a CPU without AVX-512 BF16
    run = str(tmp_path / "run")
    with use_backend("numpy"):  # restores the backend that --backend changes
        assert main(["train", "--preset", "tiny", "--max-steps", "1", "--precision", "bf16", "--backend", "numba",
                     "--out", run]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bfloat16 needs a CPU with AVX-512 BF16" in err, err
    assert not os.path.exists(os.path.join(run, "ckpt-000001"))
