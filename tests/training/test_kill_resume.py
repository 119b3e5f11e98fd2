"""The kill -9 and SIGTERM fault suite: a short training run killed at seeded random moments --
inside every step of a checkpoint write included -- or stopped by SIGTERM, then resumed, ends with
the bytes of the run uninterrupted. Four kinds of run: a language model on a text file, an
encoder-decoder (the reverse task), a language model on a prepared directory, and one with
gradient accumulation.

A few seeded trials of each kind run by default; `pytest --slow` runs many more.
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
SEQ2SEQ_YAML = """\
seq2seq: {max_src_len: 8, max_tgt_len: 9, d_model: 16, n_heads: 2, d_ff: 32, n_encoder_layers: 1,
          n_decoder_layers: 1, dropout: 0.1}
data: {task: reverse, max_len: 8}
train: {batch_size: 4, max_steps: 9, warmup_steps: 1, log_interval: 1, eval_interval: 3, eval_batches: 1,
        checkpoint_interval: 3, keep_checkpoints: 2}
"""
ACCUM_YAML = TINY_YAML.replace("keep_checkpoints: 2}", "keep_checkpoints: 2, grad_accum_steps: 2}")
KINDS = ("lm", "seq2seq", "prepared", "accum")
# the steps of a checkpoint write that fault_worker.py announces, and how often each comes in a run
# of 3 checkpoints keeping 2 (one prune: renamed aside, then deleted)
PHASES = {"model-half": 3, "optimizer": 3, "config": 3, "state": 3, "rename": 3, "prune": 1, "rmtree": 1}
ENV = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           FASTFORMER_NUM_THREADS="1", FASTFORMER_BACKEND="numpy")


def worker(log, sleep, *args):
    return [sys.executable, WORKER, str(log), str(sleep), *args]


def make_run(d, kind):
    """The `train` arguments (without --out) of a run of `kind`, its files made in `d`."""
    (d / "tiny.yaml").write_text(TINY_YAML)
    (d / "data.txt").write_text("To be, or not to be, that is the question.\n" * 40, encoding="utf-8")
    if kind == "seq2seq":
        (d / "seq2seq.yaml").write_text(SEQ2SEQ_YAML)
        return ["train", "--config", str(d / "seq2seq.yaml")]
    if kind == "accum":
        (d / "accum.yaml").write_text(ACCUM_YAML)
        return ["train", "--config", str(d / "accum.yaml"), "--data", str(d / "data.txt")]
    data = d / "data.txt"
    if kind == "prepared":
        data = d / "prepared"
        r = subprocess.run([sys.executable, "-m", "fastformer.cli", "prepare", "--data", str(d / "data.txt"),
                            "--out", str(data)], env=ENV, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    return ["train", "--config", str(d / "tiny.yaml"), "--data", str(data)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """kind -> (its train arguments, the uninterrupted run's final checkpoint bytes and metrics),
    each made once per module, when a test first asks for it."""
    made = {}

    def get(kind):
        if kind not in made:
            d = tmp_path_factory.mktemp(kind)
            args = make_run(d, kind)
            ref = d / "reference"
            r = subprocess.run(worker(d / "ref.log", 0, *args, "--out", str(ref)), env=ENV, capture_output=True,
                               text=True, timeout=300)
            assert r.returncode == 0, r.stderr
            made[kind] = args, final_state(ref)
        return made[kind]

    return get


@pytest.fixture
def setup(runs):
    return runs("lm")


def train_args(setup, run):
    return [*setup[0], "--out", str(run)]


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
    run, log = tmp_path / "run", tmp_path / "fault.log"
    p = subprocess.Popen(worker(log, 0.5 if phase else 0, *train_args(setup, run)), env=ENV,
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
    args = ["train", "--resume", "--out", str(run)] if has_checkpoint else train_args(setup, run)
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


def terminate_and_resume(setup, tmp_path, phase, occurrence=1):
    """Start the run, send it SIGTERM when it announces `phase` for the `occurrence`-th time: it
    finishes the step, checkpoints it and exits 130 with the resume command; run that command to
    the end and return the run's final state."""
    run, log = tmp_path / "run", tmp_path / "fault.log"
    p = subprocess.Popen(worker(log, 0.3, *train_args(setup, run)), env=ENV, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (log.exists() and log.read_text().split().count(phase) >= occurrence):
            assert p.poll() is None and time.monotonic() < deadline, "the run ended before the signal"
            time.sleep(0.01)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130 and "stopped by SIGTERM" in err, err
    resume = err.strip().splitlines()[-1]
    assert resume == f"resume with: fastformer train --resume --out {run}", err
    r = subprocess.run(worker(tmp_path / "resume.log", 0, "train", "--resume", "--out", str(run)), env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return final_state(run)


# ------------------------------------------- seq2seq, prepared data and accumulation runs
@pytest.mark.parametrize("kind", KINDS)
def test_sigterm_checkpoints_and_resumes_bit_for_bit(runs, tmp_path, kind):
    """SIGTERM inside the first checkpoint write (step 3 of 9): that step is checkpointed, the run
    stops, and the resume command ends with the uninterrupted run's bytes."""
    setup = runs(kind)
    assert terminate_and_resume(setup, tmp_path, "config") == setup[1]


@pytest.mark.parametrize("kind, phase, occurrence", [("seq2seq", "state", 2), ("prepared", "model-half", 2),
                                                     ("accum", "rename", 1)])
def test_other_kinds_of_run_killed_inside_a_checkpoint_write_resume_bit_for_bit(runs, tmp_path, kind, phase,
                                                                                occurrence):
    setup = runs(kind)
    assert kill_and_resume(setup, tmp_path, phase, occurrence) == setup[1]


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS[1:])
@pytest.mark.parametrize("phase, occurrence", [(p, k) for p, n in PHASES.items() for k in range(1, n + 1)])
def test_other_kinds_every_step_of_every_checkpoint_write(runs, tmp_path, kind, phase, occurrence):
    setup = runs(kind)
    assert kill_and_resume(setup, tmp_path, phase, occurrence) == setup[1]


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("phase, occurrence", [(p, k) for p in PHASES if p not in ("prune", "rmtree")
                                               for k in (1, 2)])  # the third checkpoint is the run's end
def test_sigterm_at_every_step_of_every_checkpoint_write(runs, tmp_path, kind, phase, occurrence):
    setup = runs(kind)
    assert terminate_and_resume(setup, tmp_path, phase, occurrence) == setup[1]


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS[1:])
@pytest.mark.parametrize("trial", range(10))
def test_other_kinds_many_random_kills(runs, tmp_path, kind, trial):
    setup = runs(kind)
    assert kill_and_resume(setup, tmp_path, delay=random.Random(trial).uniform(0.2, 2.5)) == setup[1]
