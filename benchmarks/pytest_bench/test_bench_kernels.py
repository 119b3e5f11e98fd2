"""Kernel micro-benchmarks at each preset's training shapes (see fastformer.bench.make_kernel_call)."""

import pytest
from conftest import run

from fastformer.cli import bench


@pytest.mark.parametrize("op", bench.KERNEL_OPS)
def test_kernel(benchmark, op, backend, preset):
    benchmark.group = f"kernel {op}"
    run(benchmark, bench.make_kernel_call(op, preset, backend), backend, preset)
    benchmark.extra_info["shapes"] = bench.kernel_shapes(preset)


@pytest.mark.parametrize("op", ["attention_forward", "attention_backward"])
@pytest.mark.parametrize("seq_len", [1024, 4096])
def test_long_attention(benchmark, op, backend, seq_len):
    """Attention at the medium preset's width over long rows, the step's tokens kept."""
    benchmark.group = f"kernel {op} T={seq_len}"
    run(benchmark, bench.make_kernel_call(op, "medium", backend, seq_len=seq_len), backend, "medium")
    benchmark.extra_info["shapes"] = bench.kernel_shapes("medium", seq_len)
