"""Full training steps (forward, backward, AdamW) on each preset's batch (32 x 128)."""

from conftest import run

from fastformer.cli import bench


def test_train_step(benchmark, backend, preset):
    benchmark.group = f"train_step {preset}"
    _, step = bench.make_train_step(preset, backend)
    median_s = run(benchmark, step, backend, preset)
    benchmark.extra_info["steps_per_s"] = 1.0 / median_s
    B, T = bench.batch_shape(preset)
    benchmark.extra_info["tokens_per_s"] = B * T / median_s
