"""Kernel micro-benchmarks at each preset's training shapes (see fastformer.bench.make_kernel_call)."""

import pytest
from conftest import run

from fastformer.cli import bench


@pytest.mark.parametrize("op", bench.KERNEL_OPS)
def test_kernel(benchmark, op, backend, preset):
    benchmark.group = f"kernel {op}"
    run(benchmark, bench.make_kernel_call(op, preset, backend), backend, preset)
    benchmark.extra_info["shapes"] = bench.kernel_shapes(preset)
