"""Full training steps (forward, backward, AdamW) on a 32 x 128 batch."""

from conftest import run

from fastformer.cli import bench


def test_train_step(benchmark, backend, preset):
    benchmark.group = f"train_step {preset}"
    _, step = bench.make_train_step(preset, backend)
    median_s = run(benchmark, step, backend, preset)
    benchmark.extra_info["steps_per_s"] = 1.0 / median_s
    benchmark.extra_info["tokens_per_s"] = bench.BATCH * bench.SEQ_LEN / median_s
