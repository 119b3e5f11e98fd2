"""One writer per run directory: a second train or resume into the same --out is refused naming
the holder's PID; a lock left by a dead process is taken over; readers take no lock."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from test_trainer import TEXT, tiny_config

import fastformer.training.runlock as runlock
from fastformer.cli import main
from fastformer.errors import FastformerError
from fastformer.training.runlock import LOCK_FILE, lock_run_dir
from fastformer.training.trainer import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HOLD = "import sys, time; from fastformer.training.runlock import lock_run_dir; lock_run_dir(sys.argv[1]); " \
       "print('locked', flush=True); time.sleep(120)"


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock of tmp_path/run, a trained run; yields (run, the process)."""
    run = str(tmp_path / "run")
    trainer = Trainer(tiny_config(max_steps=1), run, text=TEXT, verbose=False)
    trainer.train()
    trainer.close()
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen([sys.executable, "-c", HOLD, run], stdout=subprocess.PIPE, text=True, env=env)
    assert p.stdout.readline() == "locked\n"
    yield run, p
    if p.poll() is None:
        p.kill()
    p.wait()
    p.stdout.close()


def test_a_second_writer_is_refused_naming_the_holder(holder, capsys):
    run, p = holder
    with pytest.raises(FastformerError, match=rf"is in use by another fastformer process \(PID {p.pid}\)"):
        lock_run_dir(run)
    before = {n: os.stat(os.path.join(run, n)).st_mtime_ns for n in os.listdir(run)}
    for argv in (["train", "--max-steps", "1", "--out", run], ["train", "--resume", "--max-steps", "3", "--out", run]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"(PID {p.pid})" in err, err
    assert {n: os.stat(os.path.join(run, n)).st_mtime_ns for n in os.listdir(run)} == before  # nothing written


def test_the_lock_of_a_killed_process_is_taken_over(holder):
    run, p = holder
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    lock = lock_run_dir(run)
    with open(os.path.join(run, LOCK_FILE)) as f:
        assert f.read() == f"{os.getpid()}\n"
    lock.release()


def test_the_lock_is_shared_within_a_process_and_released(tmp_path):
    run = str(tmp_path / "run")
    trainer = Trainer(tiny_config(max_steps=2), run, text=TEXT, verbose=False)
    trainer.train()
    again = Trainer(None, run, resume=True, text=TEXT, verbose=False)  # the same process: allowed
    trainer.close()
    trainer.close()  # once only: the second Trainer still holds it
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    probe = [sys.executable, "-c", "import sys; from fastformer.training.runlock import lock_run_dir; "
                                   "lock_run_dir(sys.argv[1])", run]
    r = subprocess.run(probe, capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode != 0 and f"(PID {os.getpid()})" in r.stderr
    again.close()
    r = subprocess.run(probe, capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr


def test_without_flock_the_pid_decides(tmp_path, monkeypatch, holder):
    run, p = holder

    def unsupported(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(runlock.fcntl, "flock", unsupported)
    with pytest.raises(FastformerError, match=rf"\(PID {p.pid}; file locks are not supported"):
        lock_run_dir(run)
    p.kill()
    p.wait()
    lock_run_dir(run).release()  # a dead PID: taken over


def test_a_symlinked_lock_file_is_refused(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("victim")
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(victim, run / LOCK_FILE)
    with pytest.raises(FastformerError, match="is a symlink, not fastformer's lock file"):
        lock_run_dir(str(run))
    assert victim.read_text() == "victim"


def test_a_refused_run_leaves_no_directory_it_made(tmp_path):
    run = str(tmp_path / "new")
    with pytest.raises(FastformerError, match="no checkpoint in"):
        Trainer(None, run, resume=True, text=TEXT, verbose=False)
    assert not os.path.exists(run)
    os.makedirs(run)  # a directory that was there stays
    with pytest.raises(FastformerError, match="no checkpoint in"):
        Trainer(None, run, resume=True, text=TEXT, verbose=False)
    assert os.listdir(run) == [LOCK_FILE]


def test_readers_take_no_lock(holder, capsys):
    run, _ = holder
    assert main(["generate", "--checkpoint", run, "--prompt", "the", "--max-new-tokens", "2"]) == 0
    assert main(["export", "--checkpoint", run, "--format", "hf", "--out", run + "-hf"]) == 0


def test_two_train_commands_on_one_directory(tmp_path):
    """Two `fastformer train` processes: the second is refused naming the first, which goes on."""
    from test_kill_resume import ENV, TINY_YAML, WORKER

    (tmp_path / "tiny.yaml").write_text(TINY_YAML)
    (tmp_path / "data.txt").write_text("To be, or not to be, that is the question.\n" * 40, encoding="utf-8")
    run, log = str(tmp_path / "run"), tmp_path / "a.log"
    args = ["train", "--config", str(tmp_path / "tiny.yaml"), "--data", str(tmp_path / "data.txt"), "--out", run]
    first = subprocess.Popen([sys.executable, WORKER, str(log), "0.1", *args], env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        while not (log.exists() and "model-half" in log.read_text()):  # it is writing its first checkpoint
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.01)
        second = subprocess.run([sys.executable, "-m", "fastformer.cli", *args, "--seed", "1"], env=ENV,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and second.stderr.count("\n") == 1
        assert f"is in use by another fastformer process (PID {first.pid})" in second.stderr
        assert first.wait(timeout=120) == 0, first.stderr.read()
    finally:
        if first.poll() is None:
            first.kill()
        first.wait()
        first.stderr.close()
    with open(os.path.join(run, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == list(range(1, 10))  # one run's lines, in order
