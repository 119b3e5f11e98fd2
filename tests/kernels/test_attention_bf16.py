"""Attention in bfloat16 precision: the Numba backend's register-tile kernels with bfloat16 products
against the reference, which rounds the same operands at the same points (see attention.py) and
multiplies in float32; the precision kept in the cache; the result within bfloat16's error of the
float64 attention.

The kernel and the reference compute p and ds in float32 in different orders (and exp on different
polynomials), so a value that lies within a few float32 steps of the middle of two bfloat16
neighbours may round up on one side and down on the other: a difference of one bfloat16 step in
that operand. The comparisons allow exactly that (`_flip_steps`) on top of 1e-5 of the largest
value, so anything else -- another rounding point, a key or a row lost at a tile's edge -- fails.
"""

import numpy as np
import pytest

from fastformer import FastformerError
from fastformer.kernels import use_precision
from fastformer.kernels.ops import attention as A
from fastformer.kernels.ops import gemm_bf16 as G

needs_bf16 = pytest.mark.skipif(not G.cpu_has_bf16(), reason="this CPU has no AVX-512 BF16: the bfloat16 attention "
                                                             "kernels are not compiled here")
TOL = 1e-5  # of the largest value: float32 summation error


@pytest.fixture(autouse=True)
def bf16_from_one_row(monkeypatch):
    """bfloat16 products at every length here (ATTENTION_BF16_FROM): the tiles' edges at short ones."""
    monkeypatch.setattr(A, "ATTENTION_BF16_FROM", 1)
r = G.round_to_bf16


def _case(rng, B, H, T, S, hs, pad):
    """q (B, H, T, hs), k, v (B, H, S, hs), dout (B, H, T, hs) and a key padding mask: None,
    "random", or "row" (batch row 0 all padding, so its queries attend to nothing)."""
    q, dout = (rng.standard_normal((B, H, T, hs)).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal((B, H, S, hs)).astype(np.float32) for _ in range(2))
    kpm = None
    if pad == "random":
        kpm = rng.random((B, S)) < 0.3
    elif pad == "row":
        kpm = np.zeros((B, S), bool)
        kpm[0] = True
    return q, k, v, kpm, dout


def _flip_steps(x, err):
    """Where float32 x, moved by up to `err` in another order of operations, may round to either
    bfloat16 neighbour: the step that would make (bfloat16's spacing at x); 0 elsewhere."""
    x = x.astype(np.float64)
    nonzero = x != 0
    spacing = np.where(nonzero, 2.0 ** (np.floor(np.log2(np.where(nonzero, np.abs(x), 1.0))) - 7), 0.0)
    to_middle = np.abs(np.abs(x - r(x.astype(np.float32))) - spacing / 2)
    return np.where(nonzero & (to_middle <= err), spacing, 0.0)


def _allowed(want, flips):
    """The bound on |got - want|: TOL of the largest value, plus the operands' possible flips."""
    return TOL * np.abs(want).max() + flips


def _check(name, got, want, bound):
    excess = np.abs(got.astype(np.float64) - want) - bound
    worst = np.unravel_index(np.argmax(excess), excess.shape)
    assert np.isfinite(got).all() == np.isfinite(want).all() and (excess <= 0).all(), (
        f"{name}: {got[worst]} against {want[worst]} at {worst}, {excess[worst]:.3g} past the bound {bound[worst]:.3g}")


def _bounds(q, k, v, dout, cache):
    """The bounds of (out, dq, dk, dv) around the reference's, from its cache: each product's sum
    over the operands that may have rounded the other way (p and ds), times the other operand."""
    scale = np.float32(cache.scale)
    p, _ = A._attention_probs(q, k, cache.causal, cache.key_padding_mask, cache.scale, "bfloat16", cache.lse)
    dp = r(dout) @ r(v).transpose(0, 1, 3, 2)
    D = (dout * cache.out).sum(axis=-1, keepdims=True)
    ds = p * (dp - D) * scale
    fp = _flip_steps(p, 1e-5 * p)
    fds = _flip_steps(ds, 1e-5 * (p * scale * (np.abs(r(dout)) @ np.abs(r(v)).transpose(0, 1, 3, 2) + np.abs(D))))
    out = fp @ np.abs(r(v))
    dq = fds @ np.abs(r(k))
    dk = fds.transpose(0, 1, 3, 2) @ np.abs(r(q))
    dv = fp.transpose(0, 1, 3, 2) @ np.abs(r(dout))
    return out, dq, dk, dv


CASES = [  # (B, H, T, S, hs, causal, pad): T and S across the tiles' 8, 32 (and query blocks of 32)
    (2, 2, 1, 1, 32, True, None),
    (1, 3, 7, 7, 32, True, "random"),
    (2, 2, 7, 45, 64, False, "random"),
    (2, 1, 33, 33, 32, True, "row"),
    (1, 2, 33, 70, 64, False, None),
    (2, 2, 130, 130, 32, True, "random"),
    (1, 2, 130, 161, 64, True, None),
    (2, 2, 130, 130, 64, False, "row"),
]


@needs_bf16
@pytest.mark.parametrize("B,H,T,S,hs,causal,pad", CASES)
def test_attention_bf16_kernels_match_the_reference(fast_ops, ref, B, H, T, S, hs, causal, pad):
    """Forward (out, lse) and backward (on the reference's cache, so that both start from one out
    and lse) against the reference's rounding, to float32 summation error."""
    q, k, v, kpm, dout = _case(np.random.default_rng(T * S + hs), B, H, T, S, hs, pad)
    with use_precision("bfloat16"):
        out, cache = fast_ops.attention_forward(q, k, v, causal, kpm)
        want, cache_ref = ref.attention_forward(q, k, v, causal, kpm)
        grads = fast_ops.attention_backward(dout, cache_ref)
        grads_ref = ref.attention_backward(dout, cache_ref)
    assert cache.precision == cache_ref.precision == "bfloat16"
    bounds = _bounds(q, k, v, dout, cache_ref)
    _check("out", out, want, _allowed(want, bounds[0]))
    lse, lse_ref = cache.lse, cache_ref.lse
    assert ((lse == -np.inf) == (lse_ref == -np.inf)).all()
    seen = lse_ref != -np.inf
    np.testing.assert_allclose(lse[seen], lse_ref[seen], rtol=0, atol=TOL * max(1.0, np.abs(lse_ref[seen]).max()))
    for name, got, want, flips in zip(("dq", "dk", "dv"), grads, grads_ref, bounds[1:]):
        _check(name, got, want, _allowed(want, flips))


@needs_bf16
@pytest.mark.parametrize("B,T,H,hs,causal,pad", [(2, 33, 2, 32, True, None), (1, 130, 4, 32, True, "random"),
                                                  (2, 7, 1, 64, False, "row"), (2, 41, 2, 64, False, "random")])
def test_attention_qkv_bf16_kernels_match_the_reference(fast_ops, ref, B, T, H, hs, causal, pad):
    """The fused-QKV forms: the heads read in place from (B, T, 3C), the gradient written into it."""
    C = H * hs
    q, k, v, kpm, dout = _case(np.random.default_rng(T + hs), B, H, T, T, hs, pad)
    qkv = np.concatenate([x.transpose(0, 2, 1, 3).reshape(B, T, C) for x in (q, k, v)], axis=2)
    dout_merged = dout.transpose(0, 2, 1, 3).reshape(B, T, C)
    with use_precision("bfloat16"):
        out, _ = fast_ops.attention_qkv_forward(qkv, H, causal, kpm)
        want, cache_ref = ref.attention_qkv_forward(qkv, H, causal, kpm)
        dqkv = fast_ops.attention_qkv_backward(dout_merged, cache_ref)
        dqkv_ref = ref.attention_qkv_backward(dout_merged, cache_ref)
    b_out, b_dq, b_dk, b_dv = _bounds(q, k, v, dout, cache_ref)
    _check("out", out, want, _allowed(want, b_out.transpose(0, 2, 1, 3).reshape(B, T, C)))
    flips = np.stack((b_dq, b_dk, b_dv)).transpose(1, 3, 0, 2, 4).reshape(B, T, 3 * C)
    _check("dqkv", dqkv, dqkv_ref, _allowed(dqkv_ref, flips))


@needs_bf16
def test_the_backward_multiplies_in_the_precision_of_its_forward(fast_ops, ref):
    """The precision is fixed at the forward: a backward run after the setting changed back to
    float32 still rounds, and a float32 forward's backward does not under bfloat16."""
    q, k, v, kpm, dout = _case(np.random.default_rng(3), 2, 2, 40, 40, 32, "random")
    with use_precision("bfloat16"):
        _, cache16 = fast_ops.attention_forward(q, k, v, True, kpm)
        _, ref16 = ref.attention_forward(q, k, v, True, kpm)
    _, cache32 = fast_ops.attention_forward(q, k, v, True, kpm)
    _, ref32 = ref.attention_forward(q, k, v, True, kpm)
    assert cache32.precision == ref32.precision == "float32"
    bounds = _bounds(q, k, v, dout, ref16)
    grads, grads_ref = fast_ops.attention_backward(dout, ref16), ref.attention_backward(dout, ref16)
    for name, got, want, flips in zip(("dq", "dk", "dv"), grads, grads_ref, bounds[1:]):
        _check(name, got, want, _allowed(want, flips))
    with use_precision("bfloat16"):
        grads32 = fast_ops.attention_backward(dout, cache32)
    for got, want in zip(grads32, ref.attention_backward(dout, ref32)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)  # the float32 tiles' tolerance


@needs_bf16
@pytest.mark.parametrize("causal", [True, False])
def test_attention_in_bf16_is_within_bfloat16_error_of_float64(fast_ops, ref, causal):
    """bfloat16 products are close to the float64 attention, and not equal to the float32 one."""
    q, k, v, kpm, dout = _case(np.random.default_rng(9), 2, 2, 70, 70, 32, "random")
    with use_precision("bfloat16"):
        out, cache = fast_ops.attention_forward(q, k, v, causal, kpm)
        grads = fast_ops.attention_backward(dout, cache)
    wide = [x.astype(np.float64) for x in (q, k, v, dout)]
    want, cache64 = ref.attention_forward(*wide[:3], causal, kpm)
    grads64 = ref.attention_backward(wide[3], cache64)
    out32, _ = fast_ops.attention_forward(q, k, v, causal, kpm)
    assert not np.array_equal(out, out32)
    for got, w in zip((out, *grads), (want, *grads64)):
        err = np.abs(got - w).max() / np.abs(w).max()
        assert 1e-5 < err < 2e-2, err


@needs_bf16
@pytest.mark.parametrize("causal,pad", [(True, "random"), (False, None), (True, "row")])
def test_the_blas_tiles_round_as_the_reference(fast_ops, ref, tiled, causal, pad):
    """Heads on the BLAS tiles (attention_tiled.py, here in blocks of 3) take the cache's precision:
    their backward rounds the reference's operands (to float32 summation error, as above); their
    forward rounds p before it is normalised, so it agrees to bfloat16 error only."""
    q, k, v, kpm, dout = _case(np.random.default_rng(8), 2, 2, 11, 13, 8, pad)
    with use_precision("bfloat16"):
        out, cache = fast_ops.attention_forward(q, k, v, causal, kpm)
        want, cache_ref = ref.attention_forward(q, k, v, causal, kpm)
    grads = fast_ops.attention_backward(dout, cache_ref)  # float32 in force now: the cache's precision rules
    grads_ref = ref.attention_backward(dout, cache_ref)
    assert cache.precision == "bfloat16"
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-2 * np.abs(want).max())
    for name, got, w, flips in zip(("dq", "dk", "dv"), grads, grads_ref, _bounds(q, k, v, dout, cache_ref)[1:]):
        _check(name, got, w, _allowed(w, flips))


@needs_bf16
@pytest.mark.parametrize("causal", [True, False])
def test_nan_rules_hold_in_bf16(fast_ops, ref, causal):
    """As in float32 (test_kernel_nan.py): a NaN query gives a NaN row and lse (and dq row) and
    leaves the other rows' bits alone; a NaN or inf key that a query may not see has no say in
    the forward."""
    q, k, v, _, dout = _case(np.random.default_rng(6), 2, 2, 37, 37, 32, None)
    kpm = np.zeros((2, 37), bool)
    kpm[:, 0] = True
    with use_precision("bfloat16"):
        clean, _ = fast_ops.attention_forward(q, k, v, causal, kpm)
        q[0, 1, 20, 3] = np.nan
        k[:, :, 0] = np.nan  # padded for every query
        k[:, :, 36] = np.inf  # seen by the last query only (when causal)
        for ops in (ref, fast_ops):
            out, cache = ops.attention_forward(q, k, v, causal, kpm)
            assert np.isnan(out[0, 1, 20]).all() and np.isnan(cache.lse[0, 1, 20])
            seen_inf = np.zeros(out.shape[:3], bool)
            seen_inf[:, :, 36 if causal else slice(None)] = True
            assert np.isnan(out[seen_inf]).all()
            rest = ~seen_inf
            rest[0, 1, 20] = False
            if ops is fast_ops:
                np.testing.assert_array_equal(out[rest], clean[rest])
            assert np.isnan(ops.attention_backward(dout, cache)[0][0, 1, 20]).all()


def test_a_bf16_cache_is_refused_where_the_cpu_has_no_bf16(monkeypatch, fast_ops, ref):
    """The bfloat16 kernels are never compiled on a CPU without the instructions (LLVM would
    abort the process): a bfloat16 cache is refused in one line; float32 runs as before."""
    if not A._on_tiles(np.zeros((1, 1, 1, 32), np.float32)):
        pytest.skip("the register tiles are compiled code: not under NUMBA_DISABLE_JIT")
    q, k, v, kpm, dout = _case(np.random.default_rng(4), 1, 2, 9, 9, 32, None)
    with use_precision("bfloat16"):
        _, cache = ref.attention_forward(q, k, v, True, kpm)
    monkeypatch.setattr(G, "cpu_has_bf16", lambda: False)
    with pytest.raises(FastformerError, match="bfloat16 needs a CPU with AVX-512 BF16"):
        fast_ops.attention_backward(dout, cache)
    out, cache32 = fast_ops.attention_forward(q, k, v, True, kpm)
    assert cache32.precision == "float32"


def test_the_cache_precision_is_checked(ops):
    q, k, v, _, dout = _case(np.random.default_rng(5), 1, 1, 3, 3, 32, None)
    _, cache = ops.attention_forward(q, k, v, True)
    with pytest.raises(FastformerError, match="precision in the cache of attention_forward must be one of "
                                              "'float32', 'bfloat16' for float32 arrays, got 'fp16'"):
        ops.attention_backward(dout, cache._replace(precision="fp16"))
    _, cache64 = ops.attention_forward(*(x.astype(np.float64) for x in (q, k, v)), True)
    with pytest.raises(FastformerError, match="must be one of 'float64' for float64 arrays"):
        ops.attention_backward(dout.astype(np.float64), cache64._replace(precision="bfloat16"))


@pytest.mark.parametrize("rows", [8, 64])
def test_fewer_rows_than_attention_bf16_from_multiply_in_float32_on_both_backends(fast_ops, ref, monkeypatch, rows):
    """Short sequences keep float32 products in bf16 precision (their packing costs what bf16
    saves), the reference too: the two agree to float32 error."""
    monkeypatch.setattr(A, "ATTENTION_BF16_FROM", 65)
    q, k, v, _, _ = _case(np.random.default_rng(3), 1, 2, rows, rows, 32, None)
    with use_precision("bfloat16"):
        got, cache = fast_ops.attention_forward(q, k, v, causal=True)
        want, cache_ref = ref.attention_forward(q, k, v, causal=True)
    expected = "float32" if rows < 65 else "bfloat16"
    assert cache.precision == cache_ref.precision == expected
    if rows < 65:
        np.testing.assert_allclose(got, want, rtol=0, atol=TOL * np.abs(want).max())
