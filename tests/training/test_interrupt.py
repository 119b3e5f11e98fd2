"""Stopping a run: Ctrl-C (SIGINT) or SIGTERM checkpoints the step it was at and prints the resume
command, which continues bit for bit; a second Ctrl-C stops at once and leaves the last complete
checkpoint whole; a changed schedule on resume warns with the rate before and after; the
evaluation lines fit the terminal."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings

import pytest
from small_runs import TEXT

from fastformer.cli import main
from fastformer.training import trainer as trainer_module
from fastformer.training.checkpoint import checkpoint_dirs, latest_checkpoint, load_checkpoint
from fastformer.training.config import ModelConfig, RunConfig, TrainConfig
from fastformer.training.optim import learning_rate
from fastformer.training.trainer import Trainer, TrainingInterrupted, fit_columns, stop_on_signals

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAX_STEPS = 400  # the interrupted child is stopped after its first logged step, far before this
SETTINGS = ["--set", "model.max_seq_len=16", "--set", "model.d_model=16", "--set", "model.n_heads=2",
            "--set", "model.d_ff=32", "--set", "model.n_layers=1", "--set", "model.dropout=0.1",
            "--set", "train.seq_len=16", "--set", "train.batch_size=4", "--set", "train.warmup_steps=5",
            "--set", "train.log_interval=1", "--set", f"train.eval_interval={MAX_STEPS}",
            "--set", "train.eval_batches=1", "--set", f"train.checkpoint_interval={MAX_STEPS}"]


def tiny_config(**train):
    t = dict(batch_size=4, seq_len=16, max_steps=8, warmup_steps=2, log_interval=1, eval_interval=100,
             eval_batches=1, checkpoint_interval=100)
    t.update(train)
    return RunConfig(model=ModelConfig(max_seq_len=16, d_model=16, n_heads=2, d_ff=32, n_layers=1),
                     train=TrainConfig(**t))


def child_env():
    return {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def test_sigint_checkpoints_the_step_and_the_resume_command_continues_bit_for_bit(tmp_path, capsys):
    data = tmp_path / "data.txt"
    data.write_text(TEXT)
    run, whole = str(tmp_path / "run"), str(tmp_path / "whole")
    train = ["train", "--data", str(data), "--max-steps", str(MAX_STEPS), *SETTINGS]
    child = subprocess.Popen([sys.executable, "-m", "fastformer.cli", *train, "--out", run], env=child_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        metrics = os.path.join(run, "metrics.jsonl")
        deadline = time.monotonic() + 120
        while not (os.path.exists(metrics) and os.path.getsize(metrics)) and child.poll() is None:
            assert time.monotonic() < deadline, "the child never logged a step"
            time.sleep(0.005)
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 130, err
    m = re.search(r"stopped by SIGINT at step (\d+) of 400; wrote (\S+)\nresume with: (.+)\n", err)
    assert m, err
    step = int(m.group(1))
    assert 1 <= step < MAX_STEPS
    assert m.group(2) == latest_checkpoint(run) == os.path.join(run, f"ckpt-{step:06d}")
    assert load_checkpoint(run).step == step  # complete and verified
    assert not [d for d in os.listdir(run) if d.endswith(".tmp")]
    with open(os.path.join(run, "metrics.jsonl")) as f:
        assert json.loads(f.readlines()[-1])["step"] <= step
    assert m.group(3) == f"fastformer train --resume --out {run}"

    # the printed command, run: the same final weights, optimizer state and dropout stream as a run
    # never interrupted, byte for byte
    assert main(m.group(3).split()[1:]) == 0
    assert main([*train, "--out", whole]) == 0
    capsys.readouterr()
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert read_bytes(os.path.join(latest_checkpoint(run), name)) == \
            read_bytes(os.path.join(latest_checkpoint(whole), name)), name
    assert load_checkpoint(run).state["rng"] == load_checkpoint(whole).state["rng"]


def test_the_first_signal_stops_after_the_step_with_a_checkpoint(tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(), str(tmp_path / "r"), text=TEXT, verbose=False)
    real, calls = trainer.model.loss_and_grads, []

    def signal_at_step_three(**batch):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # during the step: the step still completes
        return real(**batch)

    trainer.model.loss_and_grads = signal_at_step_three
    with pytest.raises(TrainingInterrupted) as stop:
        trainer.train()
    assert (stop.value.step, stop.value.signal) == (3, "SIGTERM") and trainer.step == 3
    assert stop.value.checkpoint == latest_checkpoint(str(tmp_path / "r"))
    assert load_checkpoint(stop.value.checkpoint).step == 3
    assert isinstance(stop.value, KeyboardInterrupt)  # a script that does not catch it stops, as on Ctrl-C
    # the handlers are the process's own again
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_second_signal_stops_at_once_and_keeps_the_last_complete_checkpoint(tmp_path, monkeypatch):
    run = str(tmp_path / "r")
    trainer = Trainer(tiny_config(checkpoint_interval=2), run, text=TEXT, verbose=False)
    real_save, real_step = trainer_module.save_checkpoint, trainer.model.loss_and_grads
    steps = []

    def signal_at_step_three(**batch):
        steps.append(1)
        if len(steps) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(**batch)

    def save_interrupted(run_dir, step, *args, **kwargs):
        if step == 3:  # the second Ctrl-C arrives while the interrupt's checkpoint is being written
            os.makedirs(os.path.join(run_dir, f"ckpt-{step:06d}.tmp"))
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler raises here
        return real_save(run_dir, step, *args, **kwargs)

    trainer.model.loss_and_grads = signal_at_step_three
    monkeypatch.setattr(trainer_module, "save_checkpoint", save_interrupted)
    with pytest.raises(KeyboardInterrupt) as stop:
        trainer.train()
    assert not isinstance(stop.value, TrainingInterrupted)
    assert [os.path.basename(d) for d in checkpoint_dirs(run)] == ["ckpt-000002"]
    assert load_checkpoint(run).step == 2  # whole and verified
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_or_foreign_handler_is_left_alone():
    def mine(signum, frame):
        pass

    old = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a job started in the background
    try:
        with stop_on_signals():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        signal.signal(signal.SIGINT, mine)
        with stop_on_signals():
            assert signal.getsignal(signal.SIGINT) is mine
    finally:
        signal.signal(signal.SIGINT, old)


def test_resuming_with_another_max_steps_warns_with_the_rate_before_and_after(tmp_path, capsys):
    data = tmp_path / "data.txt"
    data.write_text(TEXT)
    run = str(tmp_path / "run")
    args = ["train", "--data", str(data), "--out", run, *SETTINGS[:-4], "--set", "train.warmup_steps=1",
            "--set", "train.lr=1e-3", "--set", "train.min_lr=1e-4"]
    assert main([*args, "--max-steps", "4"]) == 0
    capsys.readouterr()
    # in a child process: the warning as the user sees it, one line on stderr
    proc = subprocess.run([sys.executable, "-m", "fastformer.cli", "train", "--resume", "--out", run,
                           "--max-steps", "8"], env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    kw = dict(lr=1e-3, min_lr=1e-4, schedule="cosine", warmup_steps=1)
    before, after = learning_rate(4, max_steps=4, **kw), learning_rate(4, max_steps=8, **kw)
    assert f"{before:.2e}" == "1.00e-04" and after > 5 * before
    assert (f"fastformer train: warning: resuming at step 4 with train.max_steps 4 -> 8: the learning rate "
            f"follows the schedule of the new settings from here, {before:.2e} -> {after:.2e} at step 4") in err
    with open(os.path.join(run, "metrics.jsonl")) as f:
        lrs = {r["step"]: r["lr"] for r in map(json.loads, f)}
    assert lrs[5] == pytest.approx(after)  # the rate the warning announced is the one step 5 used
    assert err.count("warning") == 1 and "UserWarning" not in err
    # unchanged settings: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Trainer(None, run, resume=True, verbose=False)


@pytest.mark.parametrize("width", [40, 80, 200])
def test_fit_columns_wraps_at_the_width_and_keeps_every_field(width):
    fields = ["step 250/2000", "loss 1.2345", "val_loss 1.6840", "val_ppl 5.3912", "val_acc 0.6120",
              "val_bpb 1.2140", "lr 1.00e-03", "21,345 tok/s"]
    text = fit_columns(fields, width)
    assert all(len(line) <= width for line in text.splitlines())
    assert [f.strip() for line in text.splitlines() for f in line.split(" | ")] == fields
    assert text.count("\n") == (0 if width == 200 else 1 if width == 80 else 3)


def test_evaluation_lines_fit_80_columns(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    Trainer(tiny_config(max_steps=4, eval_interval=2), str(tmp_path / "r"), text=TEXT).train()
    out = capsys.readouterr()
    lines = (out.out + out.err).splitlines()
    assert sum(line.startswith("step ") for line in lines) == 2
    assert all(len(line) <= 80 for line in lines), lines
    assert re.search(r"^step 2/4 \| loss \d\.\d{4} \| val_loss \d\.\d{4}", out.out, re.M), out.out
