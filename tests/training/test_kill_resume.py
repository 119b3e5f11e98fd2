"""The kill -9 fault suite: a short training run killed at seeded random moments -- inside every
step of a checkpoint write included -- then resumed, ends with the bytes of the run uninterrupted.

A few seeded trials run by default; `pytest --slow` runs many more.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "fault_worker.py")
REPO = os.path.dirname(os.path.dirname(HERE))
TINY_YAML = """\
model: {max_seq_len: 16, d_model: 16, n_heads: 2, d_ff: 32, n_layers: 1, dropout: 0.1}
train: {batch_size: 4, seq_len: 16, max_steps: 9, warmup_steps: 1, log_interval: 1, eval_interval: 3,
        eval_batches: 1, checkpoint_interval: 3, keep_checkpoints: 2}
"""
# the steps of a checkpoint write that fault_worker.py announces, and how often each comes in a run
# of 3 checkpoints keeping 2 (one prune: renamed aside, then deleted)
PHASES = {"model-half": 3, "optimizer": 3, "config": 3, "state": 3, "rename": 3, "prune": 1, "rmtree": 1}
ENV = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           FASTFORMER_NUM_THREADS="1", FASTFORMER_BACKEND="numpy")


def worker(log, sleep, *args):
    return [sys.executable, WORKER, str(log), str(sleep), *args]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The config, the data and the uninterrupted run's final checkpoint bytes and metrics."""
    d = tmp_path_factory.mktemp("kill")
    (d / "tiny.yaml").write_text(TINY_YAML)
    (d / "data.txt").write_text("To be, or not to be, that is the question.\n" * 40, encoding="utf-8")
    ref = d / "reference"
    r = subprocess.run(worker(d / "ref.log", 0, *train_args(d, ref)), env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return d, final_state(ref)


def train_args(d, run):
    return ["train", "--config", str(d / "tiny.yaml"), "--data", str(d / "data.txt"), "--out", str(run)]


def final_state(run):
    """The newest checkpoint's name and bytes, and the metrics without their timings."""
    names = sorted(n for n in os.listdir(run) if n.startswith("ckpt-"))
    assert all(n.startswith("ckpt-0000") and n[5:].isdigit() for n in names), f"litter in {run}: {names}"
    assert [n for n in os.listdir(run) if ".tmp" in n] == []
    ckpt = os.path.join(run, names[-1])
    files = {n: open(os.path.join(ckpt, n), "rb").read() for n in ("model.safetensors", "optimizer.safetensors")}
    with open(os.path.join(run, "metrics.jsonl")) as f:
        metrics = [{k: v for k, v in json.loads(line).items() if k != "tokens_per_sec"} for line in f]
    return names, files, metrics


def kill_and_resume(setup, tmp_path, phase=None, occurrence=1, delay=None):
    """Start the run, kill -9 it when it announces `phase` for the `occurrence`-th time (or after
    `delay` seconds), resume it to the end and return its final state."""
    d, _ = setup
    run, log = tmp_path / "run", tmp_path / "fault.log"
    p = subprocess.Popen(worker(log, 0.5 if phase else 0, *train_args(d, run)), env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    start = time.monotonic()
    while time.monotonic() - start < 120 and p.poll() is None:
        if phase is None and time.monotonic() - start > delay:
            break
        if phase is not None and log.exists() and log.read_text().split().count(phase) >= occurrence:
            break
        time.sleep(0.01)
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=60)
    p.stderr.close()
    if phase is not None:
        assert p.returncode == -signal.SIGKILL, "the run ended before the kill"
    has_checkpoint = run.exists() and any(n.startswith("ckpt-") and ".tmp" not in n and
                                          (run / n / "state.json").exists() for n in os.listdir(run))
    args = ["train", "--resume", "--out", str(run)] if has_checkpoint else train_args(d, run)
    r = subprocess.run(worker(tmp_path / "resume.log", 0, *args), env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return final_state(run)


def phase_trials(n, seed):
    rng = random.Random(seed)
    return [(phase, rng.randint(1, PHASES[phase])) for phase in rng.sample(sorted(PHASES), k=min(n, len(PHASES)))]


@pytest.mark.parametrize("phase, occurrence", phase_trials(3, seed=15))
def test_killed_inside_a_checkpoint_write_resumes_bit_for_bit(setup, tmp_path, phase, occurrence):
    assert kill_and_resume(setup, tmp_path, phase, occurrence) == setup[1]


@pytest.mark.parametrize("trial", range(2))
def test_killed_at_a_random_moment_resumes_bit_for_bit(setup, tmp_path, trial):
    assert kill_and_resume(setup, tmp_path, delay=random.Random(trial).uniform(0.2, 2.5)) == setup[1]


@pytest.mark.slow
@pytest.mark.parametrize("phase, occurrence", [(p, k) for p, n in PHASES.items() for k in range(1, n + 1)])
def test_every_step_of_every_checkpoint_write(setup, tmp_path, phase, occurrence):
    assert kill_and_resume(setup, tmp_path, phase, occurrence) == setup[1]


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(2, 32))
def test_many_random_kills(setup, tmp_path, trial):
    assert kill_and_resume(setup, tmp_path, delay=random.Random(trial).uniform(0.2, 4.0)) == setup[1]
