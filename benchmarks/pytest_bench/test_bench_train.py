"""Full training steps (forward, backward, AdamW) on each preset's batch (32 x 128)."""

import pytest
from conftest import run

from fastformer.cli import bench


def test_train_step(benchmark, backend, preset):
    benchmark.group = f"train_step {preset}"
    _, step = bench.make_train_step(preset, backend)
    median_s = run(benchmark, step, backend, preset)
    benchmark.extra_info["steps_per_s"] = 1.0 / median_s
    B, T = bench.batch_shape(preset)
    benchmark.extra_info["tokens_per_s"] = B * T / median_s


def test_train_step_bf16(benchmark, preset):
    """The step above with train.precision=bf16 on the Numba backend (a CPU with AVX-512 BF16)."""
    from fastformer.kernels.ops.gemm_bf16 import cpu_has_bf16

    if not cpu_has_bf16():
        pytest.skip("this CPU has no AVX-512 BF16")
    benchmark.group = f"train_step {preset}"
    _, step = bench.make_train_step(preset, "numba", precision="bf16")
    median_s = run(benchmark, step, "numba", preset)
    benchmark.extra_info["steps_per_s"] = 1.0 / median_s
    B, T = bench.batch_shape(preset)
    benchmark.extra_info["tokens_per_s"] = B * T / median_s
