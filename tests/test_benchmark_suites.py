"""The benchmark suites stay runnable: the pytest-benchmark suite runs once here, reduced to the
tiny preset and one timed round, and every asv benchmark module imports and names its benchmarks;
they all time the presets of fastformer.training.config. Nothing here checks a speed."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from conftest import BACKENDS

from fastformer.training.config import preset

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = preset("tiny")


def test_pytest_benchmark_suite_runs_on_tiny(tmp_path):
    pytest.importorskip("pytest_benchmark")
    pytest.importorskip("numba")  # the suite times both backends
    out = tmp_path / "bench.json"
    env = dict(os.environ, FASTFORMER_BENCH_ROUNDS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/pytest_bench", "--benchmark-only", "-k", "tiny",
                           "-q", "-p", "no:cacheprovider", f"--benchmark-json={out}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())["benchmarks"]
    names = {b["name"] for b in results}
    for backend in ("numpy", "numba"):
        assert f"test_train_step[{backend}-tiny]" in names
        assert f"test_generate[{backend}-tiny]" in names
        assert f"test_kernel[{backend}-tiny-attention_backward]" in names
        assert f"test_kernel[{backend}-tiny-lm_head_cross_entropy]" in names
    from fastformer.kernels.ops.gemm_bf16 import cpu_has_bf16

    for precision in ("fp32", "bf16") if cpu_has_bf16() else ("fp32",):
        assert f"test_gemm[tiny-head-{precision}]" in names
        assert f"test_linear_backward[tiny-ffn_in-{precision}]" in names
    if cpu_has_bf16():
        assert "test_train_step_bf16[tiny]" in names
    from fastformer.kernels.ops.quantized import format_runs_natively

    for weights in ("bf16", "int8"):
        if format_runs_natively(weights):
            assert f"test_generate_weights[tiny-{weights}]" in names
    for b in results:
        assert b["stats"]["rounds"] == 1
        if b["name"].startswith("test_train_step"):
            assert b["extra_info"]["steps_per_s"] > 0
            tokens = TINY.train.batch_size * TINY.train.seq_len  # the preset's batch
            assert b["extra_info"]["tokens_per_s"] == pytest.approx(tokens * b["extra_info"]["steps_per_s"])
        if b["name"].startswith("test_generate"):
            assert b["extra_info"]["tokens_per_s"] > 0
        if b["name"].startswith("test_gemm"):
            assert b["extra_info"]["gflops_per_s"] > 0


def test_asv_suite_discovers_every_benchmark():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from asv_bench import bench_generate, bench_kernels, bench_train
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert {"time_train_step", "peakmem_train_step", "track_steps_per_sec", "track_tokens_per_sec"} \
        <= set(dir(bench_train.TrainStep))
    assert bench_train.TrainStep.track_steps_per_sec.unit == "steps/s"
    assert bench_train.TrainStep.params == (["numpy", "numba"], ["tiny", "small", "medium"])
    assert bench_generate.Generate.track_tokens_per_sec.unit == "tokens/s"
    assert bench_generate.GenerateWeights.params == (["tiny", "small", "medium"], ["fp32", "bf16", "int8"])
    kernels = {"Softmax", "LayerNorm", "Attention", "LongAttention", "CrossEntropy", "LMHeadCrossEntropy", "Gelu",
               "AdamW"}
    assert list(bench_kernels.LongAttention.params) == [["numpy", "numba"], [1024, 4096]]
    assert kernels <= set(dir(bench_kernels))
    assert bench_kernels.Gemm.params[1] == ["fp32", "bf16"] and bench_kernels.Gemm.track_gflops.unit == "GFLOP/s"
    assert bench_kernels.LinearBackward.params == (["qkv", "ffn_in", "ffn_out"], ["fp32", "bf16"])
    assert bench_train.TrainStepBF16.params == (["tiny", "small", "medium"],)


def test_bench_command_reports_every_figure(capsys):
    from fastformer import cli, use_backend

    with use_backend("numpy"):  # the command selects its backend for the process: restore it after
        cli.main(["bench", "--preset", "tiny", "--backend", "numpy", "--steps", "1", "--json"])
    r = json.loads(capsys.readouterr().out)
    assert r["backend"] == "numpy" and r["steps"] == 1
    # the preset's model (with the benchmarks' 4096 ids) and batch
    assert r["config"] == dict(dataclasses.asdict(TINY.model), vocab_size=4096)
    assert (r["batch"], r["seq_len"]) == (TINY.train.batch_size, TINY.train.seq_len)
    assert r["tokens_per_s"] == pytest.approx(r["batch"] * r["seq_len"] * r["steps_per_s"])
    # model FLOPs counted from the weights' shapes: a multiply-add per weight, the tied LM head and
    # the T x T scores and p v of each layer, per token; 2 FLOPs each; backward twice the forward
    from fastformer import LMConfig, TransformerLM

    weights = TransformerLM(LMConfig(**r["config"])).state_dict()
    C, T = r["config"]["d_model"], r["seq_len"]
    macs = (sum(w.size for n, w in weights.items() if n.startswith("transformer.h.") and w.ndim == 2)
            + weights["transformer.wte.weight"].size + r["config"]["n_layers"] * 2 * T * C)
    assert r["model_flops_per_step"] == 3 * 2 * macs * r["batch"] * T
    assert 0 < r["fraction_of_gemm_peak"] < 1  # no step beats this machine's largest GEMM
    assert r["peak_rss_mb"] > 0 and r["first_step_s"] > 0

    with use_backend("numpy"):
        cli.main(["bench", "--preset", "tiny", "--backend", "numpy", "--steps", "1"])
    lines = capsys.readouterr().out.splitlines()
    labels = [line.split()[0] for line in lines[1:]]
    assert labels[:8] == ["steps/s", "tokens/s", "model", "achieved", "peak", "first", "threads", "BLAS"]
    assert labels[-1] == "CPU"
    if os.environ.get("OPENBLAS_CORETYPE"):
        assert f"OPENBLAS_CORETYPE={os.environ['OPENBLAS_CORETYPE']}" in lines[-1]


def test_bench_command_takes_the_batch_shape(capsys):
    """--batch and --seq-len replace the preset's shape; a sequence longer than the preset's
    context gets positions of its own; bad values are refused by name."""
    from fastformer import cli, use_backend

    with use_backend("numpy"):
        cli.main(["bench", "--preset", "tiny", "--backend", "numpy", "--steps", "1", "--json", "--batch", "2",
                  "--seq-len", str(2 * TINY.model.max_seq_len)])
    r = json.loads(capsys.readouterr().out)
    assert (r["batch"], r["seq_len"]) == (2, 2 * TINY.model.max_seq_len)
    assert r["config"]["max_seq_len"] == 2 * TINY.model.max_seq_len
    assert r["tokens_per_s"] == pytest.approx(2 * r["seq_len"] * r["steps_per_s"])
    with use_backend("numpy"):
        assert cli.main(["bench", "--preset", "tiny", "--backend", "numpy", "--batch", "0"]) == 2
    assert "batch must be an integer >= 1, got 0" in capsys.readouterr().err


def test_compare_torch_runs_every_contender_on_tiny():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("numba")
    from fastformer.kernels.process import cpu_has_bf16

    bf16 = cpu_has_bf16()  # then fastformer's bf16 training and torch's autocast take their turns too
    proc = subprocess.run([sys.executable, "benchmarks/compare_torch.py", "--presets", "tiny", "--rounds", "1",
                           "--steps", "1", "--gen-rounds", "1", "--no-compile", "--baseline", ROOT]
                          + (["--bf16"] if bf16 else []), cwd=ROOT, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("tiny")]
    # training, bf16 training, then generation: in the environment as set, and again without its
    # OpenBLAS pin if it has one
    tables = 2 if any(k in os.environ for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")) else 1
    per_table = 3 if bf16 else 2
    assert len(rows) == per_table * tables and proc.stdout.count("=== ") == tables, proc.stdout[-3000:]
    train, gen = rows[0], rows[per_table - 1]
    # numpy, numba, eager as users run it, eager with fastformer's process settings; compile left out
    assert all(float(v) > 0 for v in train[1:5]) and train[5:7] == ["-", "-"]
    assert all(float(v) > 0 for v in gen[1:4])  # numpy, numba, transformers
    if bf16:  # fastformer bf16, eager under autocast, compile left out
        assert float(rows[1][1]) > 0 and float(rows[1][2]) > 0 and rows[1][3] == "-", rows[1]
    rss = proc.stdout.split("peak RSS (MB) of each contender's process:")[1].splitlines()[1]
    assert rss.split()[0] == "tiny" and "numba/torch eager" in rss, rss
    blas = proc.stdout.split("BLAS in each contender's process:")[1].splitlines()
    assert any("torch eager" in line and "torch:" in line for line in blas), blas  # torch's own BLAS named
    assert any(line.strip().startswith("numba") and "kernels" in line for line in blas), blas
    # --baseline: this checkout against itself, run as two more contenders each in their own process
    base = proc.stdout.split("this checkout against --baseline")[1].splitlines()[2:4]
    assert [line.split()[:2] for line in base] == [["train", "tiny"], ["generate", "tiny"]], base
    # numba, numba bf16 (trained only with --bf16), numpy: each rate, its baseline's and their ratio
    train_cells, gen_cells = (line.split()[2:] for line in base)
    assert len(train_cells) == len(gen_cells) == 9 and gen_cells[3:6] == ["-", "-", "-"], base
    numeric = train_cells + gen_cells[:3] + gen_cells[6:] if bf16 else \
        train_cells[:3] + train_cells[6:] + gen_cells[:3] + gen_cells[6:]
    assert all(float(v.rstrip("x")) > 0 for v in numeric), base
    assert bf16 or train_cells[3:6] == ["-", "-", "-"], base


@pytest.mark.parametrize("part, contender, rows", [("train", "torch eager", None),
                                                   ("train", "torch eager + fastformer's settings", None),
                                                   ("generate", "transformers", None), ("generate", "transformers", 2)])
def test_torch_contenders_never_import_fastformer(tmp_path, part, contender, rows):
    """A PyTorch contender runs from the files compare_torch writes, with fastformer unimportable."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import compare_torch
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    compare_torch.write_inputs(part, "tiny", str(tmp_path), (rows, None, None))  # rows: prompts, sampled
    code = ("import runpy, sys; sys.modules['fastformer'] = None; "  # any import of fastformer fails
            f"sys.argv = ['torch_contenders.py', {part!r}, {contender!r}, '1', {str(tmp_path)!r}]; "
            f"runpy.run_path({str(ROOT / 'benchmarks' / 'torch_contenders.py')!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], input="1\n", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ready, timed = (json.loads(line) for line in proc.stdout.splitlines())
    assert "ready" in ready, ready
    assert "torch:" in ready["blas"] and "kernels" in ready["blas"], ready  # which BLAS and kernel set ran
    assert len(timed["times"]) == 1 and timed["times"][0] > 0 and timed["peak_rss_mb"] > 0
    if part == "generate":
        assert ready["ready"] < 1e-3  # transformers' prompt logits are fastformer's


@pytest.mark.parametrize("backend", BACKENDS)
def test_profile_step_rows_do_not_overlap(backend):
    """Every row is time no other row holds: the kernel rows add up to no more than the step (a
    kernel called inside another -- the NumPy reference's residual layernorm calls its layernorm
    -- once counted twice), and the GEMMs lie inside the linear and LM-head rows that run them."""
    proc = subprocess.run([sys.executable, "benchmarks/profile_step.py", "--preset", "tiny", "--steps", "1",
                           "--backend", backend], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    total = float(lines[0].split(":")[1].split()[0])
    rows = {line[:30].strip(): float(line[30:].split()[0]) for line in lines[1:-1]}
    other = rows.pop("other")
    assert {"linear_forward", "linear_backward", "linear_cross_entropy_forward", "attention_qkv_forward",
            "adamw_update"} <= set(rows)
    rounding = 0.05 * (len(rows) + 2)  # every figure is rounded to 0.1 ms
    assert min(rows.values()) >= 0
    assert other >= -rounding, f"the rows add up to more than the step: {rows}, other {other}, step {total}"
    gemms = float(lines[-1].split(":")[1].split()[0])
    in_gemm_rows = rows["linear_forward"] + rows["linear_backward"] + rows["linear_cross_entropy_forward"]
    assert 0 < gemms <= in_gemm_rows + rounding


def test_attention_bf16_benchmark_runs():
    """benchmarks/attention_bf16.py times both precisions of the register tiles (where the CPU
    has AVX-512 BF16; elsewhere it says so and stops)."""
    from fastformer.kernels.process import cpu_has_bf16

    proc = subprocess.run([sys.executable, "benchmarks/attention_bf16.py", "--shapes", "1x2x40x32", "--rounds", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    if not cpu_has_bf16():
        assert proc.returncode != 0 and "no AVX-512 BF16" in proc.stderr
        return
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [line.split()[1] for line in proc.stdout.splitlines()[2:4]] == ["float32", "bfloat16"]
    assert "bf16 speed-up" in proc.stdout


def test_decode_crossover_times_prompts_both_ways():
    """benchmarks/decode_crossover.py --prompt: a row for each format, length and row count, each
    naming the faster path (the figures behind models.lm.FUSED_PROMPT_MAX_TOKENS)."""
    pytest.importorskip("numba")
    proc = subprocess.run([sys.executable, "benchmarks/decode_crossover.py", "--preset", "tiny", "--prompt", "--rows",
                           "1", "2", "--tokens", "3", "--weights", "fp32", "--rounds", "1", "--steps", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines()[2:]]
    assert [r[:3] for r in rows] == [["fp32", "1", "3"], ["fp32", "2", "3"]]
    assert all(r[5] in ("fused", "composed") and float(r[3]) > 0 and float(r[4]) > 0 for r in rows)


def _benchmark_module(name):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_weights_quality_counts_agreement():
    """Identical rows and leading agreement of greedy continuations, and prompts taken from the
    validation ids at evenly spread offsets, first and last included."""
    wq = _benchmark_module("weights_quality")
    ref = np.array([[1, 2, 3, 4], [1, 2, 3, 4], [5, 6, 7, 8]])
    other = np.array([[1, 2, 3, 4], [1, 9, 3, 4], [0, 6, 7, 8]])
    assert wq.agreement(ref, ref) == (1.0, 4.0)
    assert wq.agreement(ref, other) == (pytest.approx(1 / 3), pytest.approx((4 + 1 + 0) / 3))
    prompts = wq.prompts_from(np.arange(100), 4, 10)
    assert prompts.shape == (4, 10) and prompts[0, 0] == 0 and prompts[-1, -1] == 99
    assert list(prompts[:, 0]) == [0, 30, 60, 90]


def _native_formats():
    pytest.importorskip("numba")
    from fastformer.kernels.ops.quantized import format_runs_natively

    return [f for f in ("fp32", "bf16", "int8") if format_runs_natively(f)]


@pytest.mark.parametrize("rows, sampled", [(1, False), (1, True), (2, True)])
def test_compare_decode_fastformer_part_runs_on_tiny(rows, sampled):
    """compare_decode's fastformer contender: 128 new tokens of the benchmark prompt in every format
    the CPU runs, greedy (the tokens reported) or sampled copies of the prompt."""
    cd = _benchmark_module("compare_decode")
    from fastformer import use_backend
    from fastformer.cli import bench

    for fmt in _native_formats():
        with use_backend("numba"):
            fn, ready = cd.fastformer_call(fmt, "tiny", rows, sampled)
            out = fn()
        assert out.shape == (rows, bench.GEN_PROMPT + bench.GEN_NEW)
        assert len(ready["tokens"]) == bench.GEN_NEW
        if not sampled:
            assert ready["tokens"] == out[0, bench.GEN_PROMPT:].tolist()  # greedy: every call the same
        else:  # the seeded draws: every call the same too, and not the greedy tokens
            assert ready["tokens"] == fn()[0, bench.GEN_PROMPT:].tolist()
            assert ready["tokens"] != cd.fastformer_call(fmt, "tiny", 1, False)[1]["tokens"]


def test_compare_decode_ctranslate2_makes_fastformers_greedy_tokens(tmp_path):
    """CTranslate2 converts fastformer's Hugging Face export and, in a process where fastformer cannot
    be imported, decodes greedily in float32 the tokens fastformer does."""
    pytest.importorskip("ctranslate2")
    pytest.importorskip("transformers")
    pytest.importorskip("torch")
    cd = _benchmark_module("compare_decode")
    cd.write_inputs("tiny", str(tmp_path), 1, False)
    contenders = str(ROOT / "benchmarks" / "decode_contenders.py")
    subprocess.run([sys.executable, contenders, "convert", str(tmp_path)], check=True, capture_output=True,
                   timeout=300)
    code = ("import runpy, sys; sys.modules['fastformer'] = None; "
            f"sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); "
            f"sys.argv = ['decode_contenders.py', 'ctranslate2 fp32', '1', {str(tmp_path)!r}]; "
            f"runpy.run_path({contenders!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], input="1\n", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ready, timed = (json.loads(line) for line in proc.stdout.splitlines())
    assert len(timed["times"]) == 1 and timed["times"][0] > 0
    from fastformer import use_backend

    with use_backend("numba"):
        _, mine = cd.fastformer_call("fp32", "tiny", 1, False)
    assert ready["ready"]["tokens"] == mine["tokens"]
