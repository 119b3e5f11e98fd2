"""pytest-benchmark suite of fastformer: training steps, generation and kernels, by backend and
preset. Run from the repository root:

    pytest benchmarks/pytest_bench --benchmark-only
    pytest benchmarks/pytest_bench --benchmark-only -k "tiny and numba"   # a subset

FASTFORMER_BENCH_ROUNDS (default 5) sets the timed rounds; the NumPy backend on medium, seconds
per training step, gets at most 2. Every benchmark first runs one untimed warm-up round, which
also compiles (or loads) the Numba kernels.
"""

import os

import pytest

from fastformer.training.config import PRESETS as _PRESETS

BACKENDS = ["numpy", "numba"]
PRESETS = list(_PRESETS)


def rounds(backend, preset):
    n = int(os.environ.get("FASTFORMER_BENCH_ROUNDS", "5"))
    if n < 1:
        raise ValueError(f"FASTFORMER_BENCH_ROUNDS must be a positive integer, got {n}")
    return min(n, 2) if (backend, preset) == ("numpy", "medium") else n


def run(benchmark, fn, backend, preset):
    """Time fn() with one warm-up round; returns the median seconds per call."""
    benchmark.pedantic(fn, rounds=rounds(backend, preset), iterations=1, warmup_rounds=1)
    return benchmark.stats.stats.median


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(params=PRESETS)
def preset(request):
    return request.param
