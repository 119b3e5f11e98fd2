"""Generation: batch 1, greedy, 128 new tokens after a 16-token prompt."""

from conftest import run

from fastformer.cli import bench


def test_generate(benchmark, backend, preset):
    benchmark.group = f"generate {preset}"
    _, _, gen = bench.make_generate(preset, backend)
    median_s = run(benchmark, gen, backend, preset)
    assert gen().shape == (1, bench.GEN_PROMPT + bench.GEN_NEW)
    benchmark.extra_info["tokens_per_s"] = bench.GEN_NEW / median_s
