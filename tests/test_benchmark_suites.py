"""The benchmark suites stay runnable: the pytest-benchmark suite runs once here, reduced to the
tiny preset and one timed round, and every asv benchmark module imports and names its benchmarks.
Nothing here checks a speed."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_pytest_benchmark_suite_runs_on_tiny(tmp_path):
    pytest.importorskip("pytest_benchmark")
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
    for b in results:
        assert b["stats"]["rounds"] == 1
        if b["name"].startswith("test_train_step"):
            assert b["extra_info"]["steps_per_s"] > 0
            assert b["extra_info"]["tokens_per_s"] == pytest.approx(32 * 128 * b["extra_info"]["steps_per_s"])
        if b["name"].startswith("test_generate"):
            assert b["extra_info"]["tokens_per_s"] > 0


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
    kernels = {"Softmax", "LayerNorm", "Attention", "CrossEntropy", "Gelu", "AdamW"}
    assert kernels <= set(dir(bench_kernels))
