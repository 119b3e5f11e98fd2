"""A run directory that fastformer does not own, or whose files were replaced by a symlink, a FIFO,
a directory or hostile content: refused in one line, nothing outside the run written, nothing of
someone else's cleaned; a prepared directory kept usable when a re-prepare is refused."""

import json
import os
import subprocess
import sys

import pytest
from conftest import copy_run, trained_run
from test_trainer import TEXT, tiny_config

from fastformer import use_backend
from fastformer.cli import main
from fastformer.cli.plot import read_metrics
from fastformer.data.prepare import load_prepared, prepare
from fastformer.data.tokenizer import ByteTokenizer
from fastformer.errors import FastformerError
from fastformer.training.checkpoint import checkpoint_dirs
from fastformer.training.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT = 120  # seconds: a guard against a hang, far above the few seconds a run takes


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return trained_run(str(tmp_path_factory.mktemp("base") / "run"), tiny_config(max_steps=2, checkpoint_interval=2),
                       TEXT)


@pytest.fixture
def run(base, tmp_path):
    return copy_run(base, tmp_path)


def resume(run, steps=3):
    trainer = Trainer(tiny_config(max_steps=steps, checkpoint_interval=2), run, resume=True, text=TEXT, verbose=False)
    try:
        return trainer.train()
    finally:
        trainer.close()


# ---------------------------------------------------------------------- metrics.jsonl replaced
def test_a_symlinked_metrics_log_is_never_followed(run, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    os.remove(os.path.join(run, "metrics.jsonl"))
    os.symlink(victim, os.path.join(run, "metrics.jsonl"))
    with pytest.raises(FastformerError, match=r"metrics\.jsonl' is a symlink, not the metrics log"):
        resume(run)
    assert victim.read_text() == "precious\n"
    assert os.path.islink(os.path.join(run, "metrics.jsonl"))


def test_a_metrics_log_linked_while_training_is_not_appended_to(run, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    trainer = Trainer(tiny_config(max_steps=4, checkpoint_interval=2), run, resume=True, text=TEXT, verbose=False)
    os.remove(os.path.join(run, "metrics.jsonl"))  # planted after the start, before the first line is logged
    os.symlink(victim, os.path.join(run, "metrics.jsonl"))
    with pytest.raises(FastformerError, match="is a symlink"):
        trainer.train()
    trainer.close()
    assert victim.read_text() == "precious\n"


def test_a_fifo_as_metrics_log_does_not_block_resume(run):
    path = os.path.join(run, "metrics.jsonl")
    os.remove(path)
    os.mkfifo(path)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), FASTFORMER_BACKEND="numpy")
    cmd = [sys.executable, "-m", "fastformer.cli", "train", "--resume", "--out", run, "--max-steps", "3"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith("metrics.jsonl' is not a regular file, not the metrics log fastformer writes: "
                                        "remove it (or choose another --out)")


def test_a_directory_as_metrics_log_is_refused(run):
    path = os.path.join(run, "metrics.jsonl")
    os.remove(path)
    os.mkdir(path)
    with pytest.raises(FastformerError, match="metrics.jsonl' is a directory"):
        resume(run)


@pytest.mark.parametrize("line", [b'{"step": 1, "loss": "\xff\xfe"}\n', b"[" * 100_000 + b"]" * 100_000 + b"\n"],
                         ids=["not-utf8", "deeply-nested"])
def test_hostile_metrics_lines_are_dropped_on_resume_and_skipped_by_plot(run, line):
    path = os.path.join(run, "metrics.jsonl")
    with open(path, "ab") as f:
        f.write(line)
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
    assert len(resume(run)) == 1
    with open(path, "rb") as f:
        assert [json.loads(ln)["step"] for ln in f] == [1, 2, 3]


# --------------------------------------------------------------- --out that is not a fastformer run
def test_a_folder_fastformer_did_not_write_is_refused_and_left_alone(tmp_path):
    out = tmp_path / "mine"
    (out / "ckpt-1").mkdir(parents=True)
    (out / "ckpt-1" / "data.csv").write_text("a,b\n")
    (out / "metrics.jsonl").write_text("my own log\n")
    (out / "config.yaml").write_text("learning_rate: 3\n")
    (out / "notes.txt").write_text("notes\n")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(FastformerError, match=r"is not a fastformer run directory \(it holds 'notes.txt'\)"):
        Trainer(tiny_config(max_steps=1), str(out), text=TEXT, verbose=False)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(os.listdir(out)) == ["ckpt-1", "config.yaml", "metrics.jsonl", "notes.txt"]


@pytest.mark.parametrize("name, content, why", [
    ("config.yaml", "learning_rate: 3\n", "its config.yaml is not a run config"),
    ("metrics.jsonl", "my own log\nanother line\n", "its metrics.jsonl holds lines fastformer did not write"),
])
def test_files_of_fastformer_names_but_not_fastformer_content_are_refused(tmp_path, name, content, why):
    out = tmp_path / "mine"
    out.mkdir()
    (out / name).write_text(content)
    with pytest.raises(FastformerError, match=why):
        Trainer(tiny_config(max_steps=1), str(out), text=TEXT, verbose=False)
    assert (out / name).read_text() == content and os.listdir(out) == [name]


def test_a_ckpt_folder_of_someone_else_is_never_swept(tmp_path):
    out = tmp_path / "mine"
    (out / "ckpt-7").mkdir(parents=True)
    (out / "ckpt-7" / "data.csv").write_text("a,b\n")
    Trainer(tiny_config(max_steps=1), str(out), text=TEXT, verbose=False).close()
    assert (out / "ckpt-7" / "data.csv").read_text() == "a,b\n"
    with pytest.raises(FastformerError, match="no checkpoint in"):
        Trainer(None, str(out), resume=True, text=TEXT, verbose=False)
    assert (out / "ckpt-7" / "data.csv").read_text() == "a,b\n"


def test_a_run_killed_before_its_first_checkpoint_starts_again(tmp_path):
    out = str(tmp_path / "run")
    Trainer(tiny_config(max_steps=2), out, text=TEXT, verbose=False).close()  # config.yaml written, no step
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        f.write('{"step": 1, "loss": 5.0}\n{"step": 2, "lo')  # lines of the killed run, the last cut
    assert len(Trainer(tiny_config(max_steps=2), out, text=TEXT, verbose=False).train()) == 2
    assert len(checkpoint_dirs(out)) == 1


# ------------------------------------------------------------------------ escape sequences
def test_escape_sequences_from_a_hand_edited_state_are_not_printed_raw(run, capsys):
    path = os.path.join(checkpoint_dirs(run)[-1], "state.json")
    with open(path) as f:
        state = json.load(f)
    state["init_from"] = "\x1b]0;owned\x07\x1b[2J"
    with open(path, "w") as f:
        json.dump(state, f)
    with use_backend("numpy"):  # restores the backend that --backend changes
        assert main(["train", "--resume", "--out", run, "--max-steps", "3", "--backend", "numpy"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert "weights from \\x1b]0;owned\\x07\\x1b[2J" in out


# ------------------------------------------------------------------------------- prepare --out
def test_a_refused_re_prepare_leaves_the_prepared_directory_usable(tmp_path):
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("some text to prepare\n" * 200)
    bad.write_bytes(b"fine line\n" * 200 + b"\xff\xfe not UTF-8\n")
    out = str(tmp_path / "prep")
    prepare([str(good)], ByteTokenizer(), out, progress=False)
    before = {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)}
    with pytest.raises(FastformerError, match="is not UTF-8 text"):
        prepare([str(bad)], ByteTokenizer(), out, progress=False)
    assert {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)} == before
    assert load_prepared(out).train.size > 0


def test_temporaries_of_a_killed_prepare_are_removed(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("some text to prepare\n" * 200)
    out = tmp_path / "prep"
    out.mkdir()
    for name in ("train.bin.tmp-abcd1234", "val.bin.tmp-efgh5678", "meta.json.tmp-ijkl9012"):
        (out / name).write_bytes(b"\0" * 100)
    (out / "mine.tmp-abcd1234").write_text("not fastformer's")
    prepare([str(good)], ByteTokenizer(), str(out), progress=False)
    assert sorted(os.listdir(out)) == ["meta.json", "mine.tmp-abcd1234", "tokenizer.json", "train.bin", "val.bin"]


def test_an_export_killed_late_leaves_nothing_after_the_next_one(run, tmp_path):
    stale = tmp_path / "hf.tmp-abcd1234"  # what a killed export left: a private, partly written directory
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    theirs = tmp_path / "hf2.tmp-abcd1234"
    theirs.mkdir()
    assert main(["export", "--checkpoint", run, "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert not stale.exists() and theirs.exists()


def test_a_reader_racing_the_pruner_takes_the_next_newest_checkpoint(run, monkeypatch):
    import fastformer.training.checkpoint as checkpoint

    resume(run, steps=4)  # checkpoints 2 and 4
    real, pruned = checkpoint._read_state, []

    def read_state(path):  # a running train writes step 6 and prunes step 4 while it is read
        if not pruned:
            pruned.append(path)
            checkpoint.remove_dir(path)
        return real(path)

    monkeypatch.setattr(checkpoint, "_read_state", read_state)
    assert checkpoint.load_checkpoint(run).step == 2
    assert pruned == [os.path.join(run, "ckpt-000004")]


def test_a_prepare_failing_on_its_second_split_leaves_no_temporary(tmp_path, monkeypatch):
    import fastformer.data.prepare as prepare_module

    good = tmp_path / "good.txt"
    good.write_text("some text to prepare\n" * 200)
    real = prepare_module._SplitWriter.close

    def close(self):
        if self.path.endswith("val.bin"):
            raise OSError(28, "No space left on device", self.path)
        return real(self)

    monkeypatch.setattr(prepare_module._SplitWriter, "close", close)
    with pytest.raises(OSError):
        prepare([str(good)], ByteTokenizer(), str(tmp_path / "prep"), progress=False)
    assert not [n for n in os.listdir(tmp_path / "prep") if ".tmp-" in n]
