"""Models with quantised inference weights (model.quantize): greedy decoding on the Numba kernels
equals the reference's token for token, logits stay close to float32's, training is refused."""

import numpy as np
import pytest

import fastformer
from fastformer import FastformerError
from fastformer.generation.search import greedy_decode
from fastformer.kernels.ops import quantized as Q
from fastformer.models.config import LMConfig
from fastformer.models.lm import TransformerLM
from fastformer.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer

FORMATS = [pytest.param(f, marks=pytest.mark.skipif(not Q.format_runs_natively(f), reason=f"no {f} instruction"))
           for f in ("bf16", "int8")]
# of the largest float32 logit; measured on the language model below: int8 7.7e-2, bf16 2.0e-2
# (its std-0.3 weights make wide activations, the hard case for one int8 scale a row)
LOGIT_TOLERANCE = {"bf16": 4e-2, "int8": 1.5e-1}


def _peaked(model, seed=0):
    """Weights of std 0.3 instead of GPT-2's 0.02: a random model then prefers distinct tokens, so
    greedy decoding has something to get wrong."""
    rng = np.random.default_rng(seed)
    for p in model.params.values():
        if p.ndim == 2:
            p[...] = rng.standard_normal(p.shape) * 0.3
    return model


@pytest.fixture
def lm():
    cfg = LMConfig(vocab_size=97, d_model=64, n_heads=4, n_layers=2, d_ff=256, max_seq_len=64)
    return _peaked(TransformerLM(cfg, seed=1))


@pytest.fixture
def s2s():
    cfg = Seq2SeqConfig(src_vocab_size=31, tgt_vocab_size=37, max_src_len=12, max_tgt_len=24, d_model=48,
                        n_heads=4, d_ff=96, n_encoder_layers=2, n_decoder_layers=2)
    return _peaked(Seq2SeqTransformer(cfg, seed=2))


def _both(fn):
    out = {}
    for name in ("numpy", "numba"):
        with fastformer.use_backend(name):
            out[name] = fn()
    return out["numpy"], out["numba"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows", [1, 3])
def test_lm_greedy_decoding_matches_the_reference(lm, fmt, rows):
    pytest.importorskip("numba")
    lm.quantize(fmt)
    prompt = np.arange(1, 6)[None].repeat(rows, axis=0) + np.arange(rows)[:, None]
    ref, fast = _both(lambda: lm.generate(prompt, 40))
    np.testing.assert_array_equal(fast, ref)
    with fastformer.use_backend("numba"):
        lm.quantize("fp32")
        fp32 = lm.generate(prompt, 40)
    assert (fp32[:, 5:10] == ref[:, 5:10]).all()  # they may part later, not at once
    assert len(np.unique(ref[:, 5:])) > 3  # the decoding is not a degenerate repetition


@pytest.mark.parametrize("fmt", FORMATS)
def test_lm_logits_are_close_to_float32(lm, fmt):
    ids = np.random.default_rng(0).integers(0, 97, (2, 20))
    with fastformer.use_backend("numba"):
        fp32 = lm.forward(ids)
        got = lm.quantize(fmt).forward(ids)
        state = lm.init_state(2)
        stepped = np.concatenate([lm.step(ids[:, :12], state)] + [lm.step(ids[:, t:t + 1], state)
                                                                  for t in range(12, 20)], axis=1)
    err = np.abs(got - fp32).max() / np.abs(fp32).max()
    assert 0 < err < LOGIT_TOLERANCE[fmt]
    np.testing.assert_allclose(stepped, got, rtol=1e-3, atol=1e-3 * np.abs(got).max())


@pytest.mark.parametrize("fmt", FORMATS)
def test_seq2seq_greedy_decoding_matches_the_reference(s2s, fmt):
    pytest.importorskip("numba")
    src = np.random.default_rng(1).integers(3, 31, (3, 10))
    with fastformer.use_backend("numba"):
        fp32_logits = s2s.forward(src, None, src[:, :8] % 37, None)
        s2s.quantize(fmt)
        logits = s2s.forward(src, None, src[:, :8] % 37, None)
    assert 0 < np.abs(logits - fp32_logits).max() / np.abs(fp32_logits).max() < LOGIT_TOLERANCE[fmt]
    (ref, ref_scores), (fast, fast_scores) = _both(lambda: greedy_decode(s2s, src, max_len=20))
    assert ref == fast and sum(map(len, ref)) > 10
    np.testing.assert_allclose(fast_scores, ref_scores, rtol=1e-5)


def test_quantised_models_do_not_train_and_fp32_restores(lm, s2s):
    ids = np.arange(10)[None] % 97
    before = lm.forward(ids)
    lm.quantize("int8")
    with pytest.raises(FastformerError, match="quantised to int8 .* do not train: call model.quantize"):
        lm.loss_and_grads(ids, ids)
    s2s.quantize("bf16")
    with pytest.raises(FastformerError, match="quantised to bf16"):
        s2s.loss_and_grads(ids[:, :5] % 31, None, ids[:, :5] % 37, None, ids[:, :5] % 37)
    lm.quantize("fp32")
    assert lm.quantized is None and lm.weight_format == "fp32"
    np.testing.assert_array_equal(lm.forward(ids), before)
    lm.loss_and_grads(ids, ids)


def test_load_state_dict_quantises_the_new_weights(lm):
    ids = np.arange(10)[None]
    other = _peaked(TransformerLM(lm.config, seed=5), seed=9)
    with fastformer.use_backend("numpy"):
        want = other.quantize("int8").forward(ids)
        lm.quantize("int8").load_state_dict(other.state_dict())
        np.testing.assert_array_equal(lm.forward(ids), want)


def test_refusals(lm):
    with pytest.raises(FastformerError, match="unknown weight format 'int4': valid values are fp32, bf16, int8"):
        lm.quantize("int4")
    m64 = TransformerLM(lm.config, seed=0, dtype=np.float64)
    with pytest.raises(FastformerError, match="quantises a float32 model, this one is float64"):
        m64.quantize("int8")
