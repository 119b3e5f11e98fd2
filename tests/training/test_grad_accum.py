"""Gradient accumulation (train.grad_accum_steps): the config check, a step in micro-batches
against the one-batch step, runs against grad_accum_steps=1, and exact resume."""

import pytest

from fastformer.cli.commands import main
from fastformer.errors import FastformerError
from fastformer.training.config import TrainConfig, apply_overrides, preset


# ------------------------------------------------------------------------------- config
@pytest.mark.parametrize("kwargs, message", [
    (dict(grad_accum_steps=0), r"^train\.grad_accum_steps must be an integer >= 1, got 0$"),
    (dict(grad_accum_steps=True), r"^train\.grad_accum_steps must be an integer >= 1, got True$"),
    (dict(grad_accum_steps=2.0), r"^train\.grad_accum_steps must be an integer >= 1, got 2\.0$"),
    (dict(batch_size=10, grad_accum_steps=3),
     r"^train\.batch_size=10 is not divisible by train\.grad_accum_steps=3: .* \(e\.g\. 9 or 12\)$"),
    (dict(batch_size=2, grad_accum_steps=3), r"^train\.batch_size=2 is not divisible .* \(e\.g\. 3\)$"),
])
def test_bad_values_are_refused(kwargs, message):
    with pytest.raises(FastformerError, match=message):
        TrainConfig(**kwargs)


def test_good_values_and_the_default():
    assert TrainConfig().grad_accum_steps == 1
    assert TrainConfig(batch_size=12, grad_accum_steps=3).grad_accum_steps == 3
    assert TrainConfig(batch_size=4, grad_accum_steps=4).grad_accum_steps == 4  # one row per micro-batch
    c = apply_overrides(preset("tiny"), ["train.grad_accum_steps=4"])
    assert c.train.grad_accum_steps == 4 and isinstance(c.train.grad_accum_steps, int)
    with pytest.raises(FastformerError, match=r"train\.grad_accum_steps must be int, got 'true'"):
        apply_overrides(preset("tiny"), ["train.grad_accum_steps=true"])


@pytest.mark.parametrize("value, message", [
    ("3", "train.batch_size=32 is not divisible by train.grad_accum_steps=3: "),
    ("0", "train.grad_accum_steps must be an integer >= 1, got 0"),
    ("false", "config key train.grad_accum_steps must be int, got 'false'"),
])
def test_cli_refuses_bad_values_with_one_line(tmp_path, capsys, value, message):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--set", f"train.grad_accum_steps={value}"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()  # refused before any work
