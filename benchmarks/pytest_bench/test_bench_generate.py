"""Generation: batch 1, greedy, 128 new tokens after a 16-token prompt."""

import pytest
from conftest import run

from fastformer.cli import bench


def test_generate(benchmark, backend, preset):
    benchmark.group = f"generate {preset}"
    _, _, gen = bench.make_generate(preset, backend)
    median_s = run(benchmark, gen, backend, preset)
    assert gen().shape == (1, bench.GEN_PROMPT + bench.GEN_NEW)
    benchmark.extra_info["tokens_per_s"] = bench.GEN_NEW / median_s


@pytest.mark.parametrize("weights", ["bf16", "int8"])
def test_generate_weights(benchmark, preset, weights):
    """The generation above on the Numba backend with the model's weights quantised (model.quantize)."""
    from fastformer.kernels.ops.quantized import format_runs_natively

    if not format_runs_natively(weights):
        pytest.skip(f"this CPU cannot run {weights} weights")
    benchmark.group = f"generate {preset}"
    _, _, gen = bench.make_generate(preset, "numba", weights=weights)
    median_s = run(benchmark, gen, "numba", preset)
    benchmark.extra_info["tokens_per_s"] = bench.GEN_NEW / median_s
