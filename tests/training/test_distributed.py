"""Data-parallel training over MPI (training/distributed.py): launch detection and the one-line
error without mpi4py; then, with `mpiexec -n 2` local ranks (skipped when mpi4py or mpiexec is not
installed), 2 ranks against 1 process, exact resume, rank 0 as the only writer and a failing rank
ending the job. Each rank runs with FASTFORMER_NUM_THREADS=1 (2 ranks on 2 cores)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fastformer import use_backend
from fastformer.cli import main
from fastformer.errors import FastformerError
from fastformer.training import distributed
from fastformer.training.config import ModelConfig, RunConfig, TrainConfig
from fastformer.training.distributed import SingleProcess, get_comm, launched_by_mpi
from fastformer.training.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(ROOT, "tests", "training", "distributed_worker.py")
MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
TIMEOUT = 120  # seconds: a guard against a hung job, far above a run's few seconds


def clean_env():
    """The environment for a child process: no MPI launcher variables, one thread per rank."""
    env = {k: v for k, v in os.environ.items() if k not in distributed.LAUNCHER_VARS}
    env["FASTFORMER_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def have_mpi():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return MPIEXEC is not None


needs_mpi = pytest.mark.skipif(not have_mpi(), reason='needs mpi4py and mpiexec: pip install "fastformer[mpi]"')


def launch(spec, n, timeout=TIMEOUT):
    """Run the worker with `spec` on n ranks (n = 1: a plain process, no MPI); returns the
    completed process and rank 0's results (None if it wrote none)."""
    cmd = [sys.executable, WORKER, json.dumps(spec)]
    if n > 1:
        cmd = [MPIEXEC, "-n", str(n)] + cmd
    proc = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=timeout)
    result = dict(np.load(spec["result"])) if os.path.exists(spec["result"]) else None
    return proc, result


def run(tmp_path, name, n, **spec):
    spec = {"out": str(tmp_path / name), "result": str(tmp_path / f"{name}.npz"), **spec}
    proc, result = launch(spec, n)
    assert proc.returncode == 0, proc.stderr
    assert int(result["size"]) == n
    return result


def rel_err(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# ------------------------------------------------------------------ without MPI (always run)
def test_launch_detection():
    assert not launched_by_mpi({})
    assert not launched_by_mpi({"PATH": "/usr/bin"})
    for name in ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS"):
        assert launched_by_mpi({name: "2"})


def test_one_process_is_the_single_process_communicator(monkeypatch):
    for name in distributed.LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)
    comm = get_comm()
    assert isinstance(comm, SingleProcess) and (comm.rank, comm.size) == (0, 1)
    buf = np.arange(4, dtype=np.float32)
    assert comm.allreduce_sum(buf) is buf and comm.bcast(buf) is buf and comm.allreduce_scalar(3) == 3
    assert comm.gather("x") == ["x"]


def test_a_distributed_launch_without_mpi4py_names_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py raises ImportError
    with pytest.raises(FastformerError, match=r'pip install "fastformer\[mpi\]"'):
        get_comm(True)
    monkeypatch.setenv("PMI_RANK", "0")
    with pytest.raises(FastformerError, match=r'pip install "fastformer\[mpi\]"'):
        get_comm()
    monkeypatch.delenv("PMI_RANK")
    code = main(["train", "--distributed", "--preset", "tiny", "--max-steps", "1", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and 'pip install "fastformer[mpi]"' in err


def test_plain_train_never_imports_mpi4py(tmp_path):
    code = ("import sys; from fastformer.cli import main; "
            f"rc = main(['train', '--preset', 'tiny', '--max-steps', '1', '--out', {str(tmp_path / 'r')!r}]); "
            "assert rc == 0, rc; assert 'mpi4py' not in sys.modules, 'mpi4py was imported'")
    proc = subprocess.run([sys.executable, "-c", code], env=clean_env(), capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr


class FakeRanks(SingleProcess):
    """Rank 0 of `size` ranks, for the checks that run before any collective."""

    def __init__(self, size):
        self.size = size


def test_a_global_batch_the_ranks_do_not_divide_is_refused(tmp_path, capsys):
    # with several ranks a refused run ends the job (abort, exit status 2) after its one line
    config = RunConfig(model=ModelConfig(max_seq_len=16, d_model=16, n_heads=2, d_ff=32, n_layers=1),
                       train=TrainConfig(batch_size=12, grad_accum_steps=2, seq_len=16))
    with pytest.raises(SystemExit) as stop:
        Trainer(config, str(tmp_path / "r"), text="abc " * 200, comm=FakeRanks(4))
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1
    assert re.search(r"train\.batch_size=12 is not divisible by train\.grad_accum_steps=2 x 4 ranks: "
                     r".* multiple of 8$", err), err
    assert not os.path.exists(tmp_path / "r")


@pytest.mark.parametrize("kind", ["lm", "seq2seq"])
def test_evaluation_split_in_shards_gives_the_one_process_numbers(tmp_path, kind, monkeypatch):
    # what the ranks do, in one process: each shard's sums, then the metrics of all the parts
    monkeypatch.syspath_prepend(os.path.dirname(WORKER))
    from small_runs import TEXT, make_config

    config = make_config(kind, 0.0, eval_batches=3)
    trainer = Trainer(config, str(tmp_path / "r"), text=TEXT if kind == "lm" else None, verbose=False)
    whole = trainer.evaluate()
    for ranks in (2, 3, 4):  # 4: one shard has no batch
        parts = [trainer.task.eval_sums(trainer.model, (r, ranks)) for r in range(ranks)]
        split = trainer.task.metrics(parts)
        assert split.keys() == whole.keys()
        for key in whole:
            assert split[key] == pytest.approx(whole[key], rel=1e-12, abs=1e-15), key


# ---------------------------------------------------------------------- 2 ranks against 1 process
@needs_mpi
def test_first_step_gradient_and_30_losses_match_one_process(tmp_path):
    # the same global batch of 4 windows: 1 process runs it at once, each rank 2 windows whose
    # gradients (weight 1/2 each) are summed by the all-reduce -- the same terms summed in another
    # order. float32 (eps 1.2e-7): measured 3e-7 of the largest entry on the first gradient, bound
    # 1e-5; the losses of 30 Adam steps carry that rounding forward (measured 1e-8 relative), bound 1e-5
    spec = dict(kind="lm", train={"grad_clip": 0.0, "max_steps": 1, "eval_batches": 1})
    one, two = run(tmp_path, "g1", 1, **spec), run(tmp_path, "g2", 2, **spec)
    assert one["grad"].dtype == np.float32 and np.any(one["grad"] != 0)
    assert rel_err(two["grad"], one["grad"]) <= 1e-5
    assert abs(two["losses"][0] - one["losses"][0]) <= 1e-6 * abs(one["losses"][0])
    spec = dict(kind="lm", train={"max_steps": 30, "eval_interval": 30, "log_interval": 10})
    one, two = run(tmp_path, "l1", 1, **spec), run(tmp_path, "l2", 2, **spec)
    assert len(two["losses"]) == 30
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5)
    # evaluation: the same numbers as one process (rank 0 evaluates the same weights)
    e1, e2 = (metrics(tmp_path / name)[-1] for name in ("l1", "l2"))
    for key in ("val_loss", "val_acc", "val_bpb"):
        assert e2[key] == pytest.approx(e1[key], rel=1e-5)


@needs_mpi
def test_accumulation_on_two_ranks_matches_one_process(tmp_path):
    # batch 8 = 2 rows x 2 micro-batches x 2 ranks
    spec = dict(kind="lm", train={"batch_size": 8, "max_steps": 10})
    one = run(tmp_path, "a1", 1, **spec)
    two = run(tmp_path, "a2", 2, **{**spec, "train": {**spec["train"], "grad_accum_steps": 2}})
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5)


@needs_mpi
def test_padded_pairs_two_rank_gradient_is_the_one_process_gradient(tmp_path):
    # reverse strings of 1-8 characters: the two halves of a batch count different numbers of
    # target tokens, so each rank's weight n_r / N is not 1/2 (measured: 2e-7 of the largest entry)
    spec = dict(kind="seq2seq", train={"grad_clip": 0.0, "max_steps": 1})
    one, two = run(tmp_path, "p1", 1, **spec), run(tmp_path, "p2", 2, **spec)
    assert rel_err(two["grad"], one["grad"]) <= 1e-5
    assert abs(two["losses"][0] - one["losses"][0]) <= 1e-6 * abs(one["losses"][0])
    spec = dict(kind="seq2seq", train={"max_steps": 10, "eval_batches": 3})
    one, two = run(tmp_path, "q1", 1, **spec), run(tmp_path, "q2", 2, **spec)
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5)
    # evaluation split over the ranks (3 batches: 1 on rank 0, 2 on rank 1) reports the same numbers
    e1, e2 = (metrics(tmp_path / name)[-1] for name in ("q1", "q2"))
    for key in ("val_loss", "val_acc", "val_exact", "val_bleu"):
        assert e2[key] == pytest.approx(e1[key], rel=1e-5)


def stopped(tmp_path, **fault):
    """Run the LM worker on 2 ranks with a `fault` that stops the job; the [step, message] lines
    each rank wrote where it stopped."""
    spec = dict(kind="lm", out=str(tmp_path / "r"), result=str(tmp_path / "r.npz"), **fault)
    proc, _ = launch(spec, 2, timeout=60)
    assert proc.returncode != 0
    out = []
    for r in range(2):
        with open(f"{spec['result']}.stopped-rank{r}") as f:
            out.append(f.read().splitlines())
    return out


def metrics(path):
    with open(os.path.join(path, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ------------------------------------------------------------------------- resume, I/O, faults
@needs_mpi
@pytest.mark.parametrize("kind", ["lm", "seq2seq"])
def test_two_rank_resume_is_bit_for_bit_the_uninterrupted_run(tmp_path, kind):
    # with dropout: each rank's mask stream must come back from the checkpoint too
    spec = dict(kind=kind, dropout=0.1, train={"max_steps": 10})
    whole = run(tmp_path, "whole", 2, **spec)
    first = run(tmp_path, "part", 2, steps=5, **spec)
    state = json.load(open(tmp_path / "part" / "ckpt-000005" / "state.json"))
    assert len(state["rng"]["dropout_ranks"]) == 2
    assert state["rng"]["dropout_ranks"][0] == state["rng"]["dropout"] != state["rng"]["dropout_ranks"][1]
    rest = run(tmp_path, "part", 2, resume=True, **{k: v for k, v in spec.items()})
    assert np.array_equal(np.concatenate([first["losses"], rest["losses"]]), whole["losses"])
    assert np.array_equal(rest["data"], whole["data"])


@needs_mpi
def test_only_rank_0_writes_files(tmp_path):
    # ranks > 0 run with every file write made to fail (distributed_worker.refuse_writes)
    spec = dict(kind="lm", train={"max_steps": 6, "checkpoint_interval": 3, "eval_interval": 3})
    run(tmp_path, "two", 2, rank0_writes_only=True, **spec)
    run(tmp_path, "one", 1, **spec)
    assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one"))
    assert [r["step"] for r in metrics(tmp_path / "two")] == list(range(1, 7))


@needs_mpi
@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_that_raises_ends_the_job(tmp_path, rank):
    spec = dict(kind="lm", out=str(tmp_path / "r"), result=str(tmp_path / "r.npz"), raise_on_rank=rank,
                train={"max_steps": 50})
    start = time.perf_counter()
    proc, result = launch(spec, 2, timeout=60)
    assert proc.returncode != 0 and result is None
    assert "injected failure" in proc.stderr
    assert time.perf_counter() - start < 30  # ended by the abort, not by the 60 s timeout


@needs_mpi
def test_a_non_finite_loss_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    # the loss is summed over the ranks, so rank 1's NaN is every rank's: both stop before step 3
    stops = stopped(tmp_path, nan_on_rank=1, train={"max_steps": 10})
    assert [s[0] for s in stops] == ["2", "2"]
    assert all(s[1].startswith("training stopped at step 3: loss=nan") for s in stops)


@needs_mpi
def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    # kill -INT of one rank's process: the ranks sum their requests after every step
    stops = stopped(tmp_path, sigint_on_rank=1, train={"max_steps": 10})
    run = str(tmp_path / "r")
    assert [s[0] for s in stops] == ["3", "3"]
    assert stops[0][1] == f"training stopped by a signal to another rank at step 3; checkpoint {run}/ckpt-000003"
    assert stops[1][1] == "training stopped by SIGINT at step 3; checkpoint None"  # rank 0 writes
    from fastformer.training.checkpoint import load_checkpoint

    assert load_checkpoint(run).step == 3


@needs_mpi
def test_ranks_of_one_machine_share_its_cores(tmp_path):
    code = ("from fastformer.training.distributed import get_comm; "
            "from fastformer.kernels.process import available_cores, num_threads; c = get_comm(); "
            "assert c.local_size == 2, c.local_size; "
            "assert num_threads() == max(1, available_cores() // 2), num_threads()")
    env = clean_env()
    del env["FASTFORMER_NUM_THREADS"]
    proc = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    env["FASTFORMER_NUM_THREADS"] = "3"  # still overrides
    proc = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-c", code.replace("max(1, available_cores() // 2)",
                                                                                   "3")],
                          env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr


@needs_mpi
def test_weights_that_drift_apart_stop_every_rank(tmp_path):
    stops = stopped(tmp_path, perturb_rank=1, train={"max_steps": 10, "check_sync_interval": 2})
    assert [s[0] for s in stops] == ["2", "2"]
    assert all(s[1].startswith("the ranks' weights drifted apart at step 2: 1 of 2 ranks") for s in stops)
    # in sync (the default runs above, and here with the check on) nothing stops
    run(tmp_path, "ok", 2, kind="lm", train={"max_steps": 4, "check_sync_interval": 1})


@needs_mpi
def test_info_under_mpiexec_shows_the_ranks_once():
    proc = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-m", "fastformer.cli", "info"], env=clean_env(),
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("mpi: 2 ranks, 2 on this node") == 1 and proc.stdout.count("fastformer ") == 1


@needs_mpi
def test_a_one_process_checkpoint_resumed_on_two_ranks_continues_the_run(tmp_path):
    # the data order does not depend on N, so without dropout the 2-rank continuation follows the
    # uninterrupted 1-process run up to float32 reduction order (bound 1e-5 relative); a warning
    # says the other ranks' dropout masks are new
    spec = dict(kind="lm", train={"max_steps": 10})
    whole = run(tmp_path, "whole", 1, **spec)
    first = run(tmp_path, "part", 1, steps=5, **spec)
    proc, rest = launch({"out": str(tmp_path / "part"), "result": str(tmp_path / "rest.npz"), "resume": True,
                         **spec}, 2)
    assert proc.returncode == 0, proc.stderr
    assert "written by 1 process(es), this run has 2" in proc.stderr
    assert int(rest["size"]) == 2 and len(rest["losses"]) == 5
    np.testing.assert_allclose(np.concatenate([first["losses"], rest["losses"]]), whole["losses"], rtol=1e-5)


@needs_mpi
def test_ctrl_c_stops_every_rank_after_the_same_step_with_a_checkpoint(tmp_path):
    # mpiexec passes Ctrl-C on to every rank, which may be at different points of a step: the ranks
    # agree on the step, all take part in its checkpoint (rank 0 writes it), and rank 0 prints the
    # command that resumes on as many ranks
    run = str(tmp_path / "r")
    cmd = [MPIEXEC, "-n", "2", sys.executable, "-m", "fastformer.cli", "train", "--preset", "tiny",
           "--max-steps", "100000", "--set", "model.dropout=0.1", "--out", run]
    proc = subprocess.Popen(cmd, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("training ")  # rank 0 is past the start
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends to mpiexec, which passes it to the ranks
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode != 0
    m = re.search(r"stopped by SIGINT at step (\d+) of 100000; wrote (\S+)\nresume with: (.+)\n", err)
    assert m and err.count("stopped by") == 1, err
    assert m.group(3) == f"mpiexec -n 2 fastformer train --resume --out {run}"
    from fastformer.training.checkpoint import load_checkpoint

    ckpt = load_checkpoint(run)  # complete and verified, the step the ranks agreed on
    assert ckpt.path == m.group(2) and ckpt.step == int(m.group(1)) >= 1
    assert len(ckpt.state["rng"]["dropout_ranks"]) == 2
    assert not [d for d in os.listdir(run) if d.endswith(".tmp")]


@needs_mpi
@pytest.mark.parametrize("source", ["prepared", "reverse"])
def test_the_train_command_on_two_ranks_follows_one_process(tmp_path, source):
    # the command line end to end: a memory-mapped prepared corpus (opened read-only by both
    # ranks) or the reverse task; rank 0 prints each line once; losses as one process (1e-5)
    if source == "prepared":
        words = "the cat sat on a mat while one dog ran to its red ball and every bird sang".split()
        rng = np.random.default_rng(0)
        (tmp_path / "t.txt").write_text("".join(" ".join(rng.choice(words, size=12)) + "\n" for _ in range(300)))
        assert main(["prepare", "--data", str(tmp_path / "t.txt"), "--out", str(tmp_path / "prep")]) == 0
        args = ["--data", str(tmp_path / "prep"), "--set", "train.seq_len=32"]
    else:
        args = ["--task", "reverse"]
    args += ["--max-steps", "6", "--set", "train.batch_size=8", "--set", "train.eval_batches=2",
             "--set", "train.log_interval=1"]
    out = {}
    for n in (1, 2):
        cmd = [sys.executable, "-m", "fastformer.cli", "train", *args, "--out", str(tmp_path / f"run{n}")]
        proc = subprocess.run(([MPIEXEC, "-n", "2"] if n == 2 else []) + cmd, env=clean_env(), capture_output=True,
                              text=True, timeout=TIMEOUT)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.count("training ") == 1 and proc.stdout.count("done: step 6") == 1
        out[n] = metrics(tmp_path / f"run{n}")
    assert "2 ranks" in proc.stdout
    np.testing.assert_allclose([r["loss"] for r in out[2]], [r["loss"] for r in out[1]], rtol=1e-5)
    assert out[2][-1]["val_loss"] == pytest.approx(out[1][-1]["val_loss"], rel=1e-5)


# ------------------------------------------------- a rank refused before and after MPI starts
TINY_MPI = ["--set", "model.d_model=16", "--set", "model.n_heads=2", "--set", "model.d_ff=32",
            "--set", "model.n_layers=1", "--set", "model.max_seq_len=16", "--set", "train.seq_len=16",
            "--set", "train.batch_size=4", "--set", "train.eval_batches=1", "--max-steps", "2"]


def mpmd(tmp_path, rank0, rank1, fault=None):
    """Run `fastformer train` on two ranks with the arguments of each (mpiexec's MPMD form);
    returns (exit status, stderr). `fault` (rank, step, kind) runs that rank under rank_fault.py,
    failing at that step. A job still running at TIMEOUT is killed, ranks included, and fails the
    test: the ranks waited for each other."""
    cli = [[sys.executable, "-m", "fastformer.cli", "train"] for _ in range(2)]
    if fault is not None:
        rank, step, kind = fault
        cli[rank] = [sys.executable, os.path.join(ROOT, "tests", "training", "rank_fault.py"), str(step), kind, "train"]
    cmd = [MPIEXEC, "-n", "1", *cli[0], *rank0, ":", "-n", "1", *cli[1], *rank1]
    env = dict(clean_env(), FASTFORMER_BACKEND="numpy")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, cwd=tmp_path)
    try:
        _, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the job hung: the other rank waited for the one that failed")
    return proc.returncode, err


@needs_mpi
@pytest.mark.parametrize("bad, message", [
    (["--config", "missing.yaml"], "config file 'missing.yaml' does not exist"),
    (["--resume"], "no checkpoint in"),
    (["--set", "train.lrr=1"], "unknown config key train.lrr"),
    (["--no-such-option"], "unrecognized arguments: --no-such-option"),
], ids=["config", "resume", "set", "argv"])
def test_a_rank_refused_before_mpi_starts_ends_the_job(tmp_path, bad, message):
    good = [*TINY_MPI, "--out", "r"]
    code, err = mpmd(tmp_path, good, [*good, *bad])
    assert code != 0 and message in err
    assert not os.path.exists(tmp_path / "r" / "ckpt-000002")


@needs_mpi
@pytest.mark.parametrize("other", [["--seed", "1"], ["--max-steps", "3"], ["--out", "elsewhere"]])
def test_ranks_started_with_different_arguments_are_refused(tmp_path, other):
    code, err = mpmd(tmp_path, [*TINY_MPI, "--out", "r"], [*TINY_MPI, "--out", "r", *other])
    assert code == 2, err
    assert "1 of 2 ranks were started with arguments and config other than rank 0's" in err
    assert not os.path.exists(tmp_path / "r" / "ckpt-000002")


def fastformer_lines(err):
    """What fastformer itself printed on stderr (MPICH adds its own line about MPI_Abort)."""
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("fastformer")]


def released(run, timeout=30):
    """Wait for the run's lock to be free: mpiexec may return while a rank it killed is still exiting."""
    from fastformer.training.runlock import lock_run_dir

    deadline = time.monotonic() + timeout
    while True:
        try:
            return lock_run_dir(run).release()
        except FastformerError:
            assert time.monotonic() < deadline, "a rank of the ended job still holds the run directory"
            time.sleep(0.1)


def run_files(run):
    """{relative path: bytes} of every file in a run directory."""
    out = {}
    for root, _, files in os.walk(run):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.relpath(os.path.join(root, name), run)] = f.read()
    return out


@needs_mpi
@pytest.mark.parametrize("fault, line", [
    ((1, 3, "error"), "fastformer (rank 1 of 2): error: injected failure at step 3"),
    ((0, 3, "eio"), "fastformer (rank 0 of 2): error: 'injected.bin': Input/output error"),
    ((0, 4, "enospc"), "fastformer (rank 0 of 2): error: 'r/ckpt-000004.tmp': No space left on device"),
], ids=["rank1-error", "rank0-read", "rank0-full-disk"])
def test_a_rank_failing_mid_run_ends_the_job_in_one_line_and_keeps_the_last_checkpoint(tmp_path, fault, line):
    from fastformer.training.checkpoint import checkpoint_dirs, load_checkpoint

    args = [*TINY_MPI[:-2], "--max-steps", "6", "--set", "train.checkpoint_interval=2", "--out", "r"]
    start = time.perf_counter()
    code, err = mpmd(tmp_path, args, args, fault)
    assert code == 2 and fastformer_lines(err) == [line], err
    assert time.perf_counter() - start < 60  # ended by the abort, not by the other rank's wait
    run = str(tmp_path / "r")
    assert [os.path.basename(d) for d in checkpoint_dirs(run)] == ["ckpt-000002"]
    assert load_checkpoint(run).step == 2  # whole: every file against its SHA-256
    released(run)
    with pytest.warns(UserWarning, match="written by 2 process"), use_backend("numpy"):  # it continues, on 1 process
        assert main(["train", "--resume", "--out", run]) == 0
    assert load_checkpoint(run).step == 6


@needs_mpi
@pytest.mark.parametrize("bad, message", [
    (["--no-such-option"], "fastformer: error: unrecognized arguments: --no-such-option"),
    (["--set", "train.lrr=1"], "error: unknown config key train.lrr"),
    (["--max-steps", "5"], "error: 1 of 2 ranks were started with arguments and config other than rank 0's"),
], ids=["argv", "set", "other-arguments"])
def test_a_rank_refused_when_the_job_resumes_a_run_leaves_the_run_as_it_was(tmp_path, bad, message):
    run = str(tmp_path / "r")
    with use_backend("numpy"):
        assert main(["train", *TINY_MPI, "--out", run]) == 0
    before = run_files(run)
    resume = ["--resume", "--out", "r", "--max-steps", "4"]
    code, err = mpmd(tmp_path, resume, [*resume, *bad])
    lines = fastformer_lines(err)
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert run_files(run) == before  # nothing written, nothing swept: the checkpoint and its log as they were
