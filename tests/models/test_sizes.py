"""The memory checks that refuse a model, a training run or a decoding batch before allocating
it, from its shapes alone (count_parameters itself: tests/models/test_count_parameters.py)."""

import json
from unittest import mock

import numpy as np
import pytest

from fastformer import FastformerError, Seq2SeqTransformer, TransformerLM
from fastformer.errors import available_memory, check_memory, check_number, load_json
from fastformer.models.config import LMConfig, Seq2SeqConfig, check_decoding_memory, count_parameters, training_memory
from fastformer.models.hf import lm_config_from_gpt2
from fastformer.training.config import RunConfig, TrainConfig, check_training_memory


def test_a_model_too_large_is_refused_before_allocation():
    huge = LMConfig(max_seq_len=10 ** 12)  # 64 * 10**12 position weights: 256 TB of float32
    assert count_parameters(huge) == count_parameters(LMConfig()) + (10 ** 12 - 128) * 64
    with pytest.raises(FastformerError, match=r"the model \(64,000,000,\d{3},\d{3} parameters.*needs about "
                                              r"512,000\.\d\d GB of memory, but only"):
        TransformerLM(huge)
    with mock.patch("fastformer.errors.available_memory", return_value=10 ** 6):  # 1 MB: even the defaults fail
        with pytest.raises(FastformerError, match="make the model smaller"):
            Seq2SeqTransformer(Seq2SeqConfig())
    cfg = {"model_type": "gpt2", "vocab_size": 259, "n_positions": 32, "n_embd": 16, "n_head": 2, "n_layer": 10 ** 6}
    with pytest.raises(FastformerError, match=r"the GPT-2 of hf/config.json \(.* parameters"):
        lm_config_from_gpt2(cfg, "hf/config.json")  # refused from the shapes: nothing built


def test_training_memory_grows_with_the_batch_and_is_checked_against_what_is_available():
    cfg = LMConfig(max_seq_len=128)
    small, large = training_memory(cfg, 32, 128), training_memory(cfg, 64, 128)
    assert 4 * 4 * count_parameters(cfg) < small < large < 2 * small
    run = RunConfig(model=cfg, train=TrainConfig(batch_size=100_000, seq_len=128))
    with mock.patch("fastformer.errors.available_memory", return_value=8 << 30):
        with pytest.raises(FastformerError, match=r"micro-batches of 100000 x 128 tokens needs about 17\d\.\d\d GB "
                                                  r"of memory, but only 8\.59 GB is available: .*grad_accum_steps"):
            check_training_memory(run)
        # accumulation over micro-batches, or ranks, shrink the activations that must fit at once
        fits = RunConfig(model=cfg, train=TrainConfig(batch_size=32, seq_len=128))
        assert check_training_memory(fits) == training_memory(cfg, 32, 128)
        assert check_training_memory(fits, ranks=4) == training_memory(cfg, 8, 128)


def test_decoding_memory():
    cfg = LMConfig()
    check_decoding_memory(cfg, 4)
    with pytest.raises(FastformerError, match="decoding 10,000,000 sequences at once needs about .* fewer texts"):
        check_decoding_memory(cfg, 10 ** 7)
    with pytest.raises(FastformerError, match="decoding 10,000,000 sequences"):
        TransformerLM(LMConfig(d_model=8, n_heads=2, d_ff=8, n_layers=1)).init_state(10 ** 7)


def test_available_memory_and_check_memory():
    have = available_memory()
    assert have is None or have > 0
    assert check_memory("a little", 1024) == 1024
    with mock.patch("fastformer.errors.available_memory", return_value=1 << 20):
        with pytest.raises(FastformerError, match=r"^x needs about 2\.10 MB of memory, but only 1\.05 MB is "
                                                  r"available: smaller$"):
            check_memory("x", 2 << 20, "smaller")
    with mock.patch("fastformer.errors.available_memory", return_value=None):  # unknown: not refused
        assert check_memory("x", 10 ** 18) == 10 ** 18


@pytest.mark.parametrize("bounds, allowed", [
    ({}, "a number"), (dict(finite=True), "a finite number"),
    (dict(low=0), "a number >= 0"), (dict(low=0, low_open=True), "a number > 0"),
    (dict(high=1), "a number <= 1"), (dict(high=1, high_open=True), "a number < 1"),
    (dict(low=0, high=1, low_open=True), "a number in (0, 1]"),
    (dict(low_open=True, high_open=True, finite=True), "a finite number"),  # open ends of no bound: none
])
def test_check_number_names_exactly_the_bounds_it_was_given(bounds, allowed):
    from fastformer.kernels.checks import check_finite

    outside = [2.0] if "high" in bounds else [-1.0] if "low" in bounds else []
    for value in ("x", float("nan"), *outside):
        with pytest.raises(FastformerError) as e:
            check_number("a", value, **bounds)
        assert str(e.value) == f"a must be {allowed}, got {value!r}"
    # the kernels' finite checks say it in the same words, with or without a lower bound
    for low, words in ((None, "a finite number"), (0, "a finite number >= 0")):
        with pytest.raises(FastformerError) as e:
            check_finite("scale", float("inf"), low)
        assert str(e.value) == f"scale must be {words}, got inf"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), np.float32("inf")])
def test_check_number_refuses_non_finite_values_where_asked(value):
    with pytest.raises(FastformerError, match=r"^lr must be a finite number >= 0, got"):
        check_number("lr", value, low=0, finite=True)
    with pytest.raises(FastformerError, match=r"^a must be a finite number, got"):
        check_number("a", value, finite=True)
    assert check_number("a", -1e300, finite=True) == -1e300
    if value == value:  # an infinity, where it means something (a layernorm eps: rstd = 0)
        assert check_number("eps", abs(value), low=0) == float("inf")
    else:
        with pytest.raises(FastformerError, match=r"^eps must be a number >= 0, got nan"):
            check_number("eps", value, low=0)


def test_load_json_names_the_file(tmp_path):
    p = tmp_path / "f.json"
    for raw, message in ((b'{"a": ', r"f.json is not valid JSON \(corrupt or truncated\)"),
                         (b"\xff{}", r"f.json is not UTF-8 text \(byte 0: invalid start byte\)"),
                         (b"[" * 100_000 + b"]" * 100_000, "f.json is nested too deeply")):
        p.write_bytes(raw)
        with pytest.raises(FastformerError, match=f"^thing .*{message}"):
            load_json(str(p), "thing")
    p.write_text(json.dumps({"a": [1]}))
    assert load_json(str(p)) == {"a": [1]}


def test_configs_in_budget_without_the_command_line():
    from fastformer.models.sizes import BUDGET_ASPECT, configs_in_budget, default_heads

    found = configs_in_budget(LMConfig(), 2_000_000, 3_000_000)
    assert found and [n for n, _ in found] == sorted(n for n, _ in found)
    for n, c in found:
        assert 2_000_000 <= n <= 3_000_000 and n == count_parameters(c)
        assert c.d_ff == 4 * c.d_model and c.n_heads == default_heads(c.d_model)
        assert BUDGET_ASPECT[0] <= c.d_model / c.n_layers <= BUDGET_ASPECT[1]
    pinned = configs_in_budget(LMConfig(), 2_000_000, 3_000_000, pinned={"n_layers"})
    assert pinned and all(c.n_layers == LMConfig().n_layers for _, c in pinned)
    seq2seq = configs_in_budget(Seq2SeqConfig(), 1_000_000, 2_000_000)
    assert seq2seq and all(c.n_encoder_layers == c.n_decoder_layers for _, c in seq2seq)
    fixed = configs_in_budget(Seq2SeqConfig(), 1_000_000, 2_000_000, pinned={"n_decoder_layers"})
    assert fixed and all(c.n_decoder_layers == Seq2SeqConfig().n_decoder_layers for _, c in fixed)
    assert default_heads(768) == 12 and default_heads(100) == 2


def test_a_reading_of_available_memory_is_reused_only_briefly_and_for_small_requests(monkeypatch):
    from fastformer import errors

    reads = []
    monkeypatch.setattr(errors, "_read_available_memory", lambda: reads.append(1) or 8 << 30)
    monkeypatch.setattr(errors, "_reading", (-float("inf"), None))
    clock = [100.0]
    monkeypatch.setattr(errors.time, "monotonic", lambda: clock[0])
    assert available_memory() == 8 << 30 and len(reads) == 1
    assert available_memory(1 << 20) == 8 << 30 and len(reads) == 1  # small, and under a second old
    available_memory(2 << 30)  # a quarter of what was available: read again
    assert len(reads) == 2
    clock[0] += 2.0  # two seconds later: read again, however small
    available_memory(1)
    assert len(reads) == 3
    assert check_memory("x", 1 << 20) == 1 << 20 and len(reads) == 3
