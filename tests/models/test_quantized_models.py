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


def _close_but_for_rounding_flips(got, want):
    """float32 differences in layernorm and attention (1 ulp) can move an activation across a
    rounding boundary of int8 or bfloat16, which moves it by a quantum (measured: 0.35% of the
    largest logit, on one row of 15 cases): most values agree to float32 rounding, all loosely."""
    err = np.abs(got - want) / np.abs(want).max()
    assert err.max() < 1e-2 and np.mean(err < 1e-5) > 0.75


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("L,C,H,F,V,B", [(2, 12, 3, 20, 37, 3), (1, 40, 2, 130, 300, 1), (2, 64, 4, 256, 97, 5)])
def test_fused_decode_step_matches_the_reference(fast_ops, ref, fmt, L, C, H, F, V, B):
    """The fused step's quantised products against the reference step (ops.linear_quantized on
    the same packed slots), shapes off every tile edge; and against the composed step."""
    cfg = LMConfig(vocab_size=V, max_seq_len=12, d_model=C, n_heads=H, d_ff=F, n_layers=L, tie_embeddings=False)
    m = TransformerLM(cfg, seed=1)
    rng = np.random.default_rng(5)
    m.flat.data[:] = rng.normal(0, 0.4, m.flat.size)
    m.quantize(fmt)
    w = m.packed_weights()
    assert w.quant.format == fmt and w.quant.qoffsets.shape == (len(w.offsets), 2)
    cache = m.init_state(B)
    cache.k[...] = rng.normal(size=cache.k.shape)
    cache.v[...] = rng.normal(size=cache.v.shape)
    cache.padding[0, :2] = True
    ids, pos, start = rng.integers(0, V, B), rng.integers(0, 12, B), 5
    k2, v2 = cache.k.copy(), cache.v.copy()
    got = fast_ops.gpt2_decode_step(w, ids, pos, cache.k, cache.v, cache.padding, start)
    want = ref.gpt2_decode_step(w, ids, pos, k2, v2, cache.padding, start)
    _close_but_for_rounding_flips(got, want)
    _close_but_for_rounding_flips(cache.k, k2)
    with fastformer.use_backend(fast_ops.name):
        seq = rng.integers(0, V, (1, 7))
        c0 = m.init_state(1)
        m.step(seq[:, :6], c0)
        assert m.decode_path(1, 1, c0) == "fused"
        fused = m.step(seq[:, 6:], c0)[:, 0]
        composed = m.forward(seq)[:, 6]
    _close_but_for_rounding_flips(fused, composed)


def test_fused_step_refuses_a_bad_quantised_table(lm):
    with fastformer.use_backend("numpy") as ops:
        lm.quantize("int8")
        w = lm.packed_weights()
        cache = lm.init_state(1)
        args = (np.array([1]), np.array([0]), cache.k, cache.v, cache.padding, 0)
        with pytest.raises(FastformerError, match="weights.quant must hold .* inside them"):
            ops.gpt2_decode_step(w._replace(quant=w.quant._replace(qoffsets=w.quant.qoffsets + 10 ** 6)), *args)
        with pytest.raises(FastformerError, match="weights.quant must hold"):
            ops.gpt2_decode_step(w._replace(quant=w.quant._replace(words=w.quant.words[:-1])), *args)
        with pytest.raises(FastformerError, match="format bf16 or int8"):
            ops.gpt2_decode_step(w._replace(quant="int8"), *args)


@pytest.mark.parametrize("fmt", FORMATS)
def test_composed_decoding_of_a_sinusoidal_model_matches_the_reference(fmt):
    """Sinusoidal positions decode through the blocks (not the fused kernel): the quantised
    products of Context.weights, step by step, give the reference's tokens."""
    pytest.importorskip("numba")
    cfg = LMConfig(vocab_size=61, d_model=32, n_heads=2, n_layers=2, d_ff=64, max_seq_len=40, positions="sinusoidal")
    m = _peaked(TransformerLM(cfg, seed=3)).quantize(fmt)
    assert m.decode_path(1, 1, m.init_state(1)) == "composed"
    # sampled, seeded: a random model of this kind repeats one token when greedy
    ref, fast = _both(lambda: m.generate(np.arange(1, 5), 30, temperature=1.0, seed=0))
    np.testing.assert_array_equal(fast, ref)
    assert len(np.unique(ref[4:])) > 3
