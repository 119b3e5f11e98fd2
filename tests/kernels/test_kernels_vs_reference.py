"""Every kernel, forward and backward, of each backend other than the reference (Numba: the
`fast_ops` fixture) against the NumPy reference; without such a backend these tests skip. The
tests of one backend's own contract -- the gradient written into `out`, strided inputs and
in-place updates of views, refusals -- run on every backend (`ops`), the reference included.

Tolerances: float64 must agree to TOL64 everywhere; float32 to the per-kernel TOL32 below
(the kernels sum in a different order than NumPy, and the Numba float32 exp/tanh are
polynomials within ~1 ulp). Property tests (hypothesis) cover the awkward shapes and values:
T = 1, odd sizes, head size 1, logits of +-1e4, fully masked rows, every target ignored; the
backend must never produce NaN where the reference has none.
"""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastformer.errors import FastformerError

TOL64 = dict(rtol=1e-10, atol=1e-12)
TOL32 = {  # (rtol, atol) per kernel for float32
    "softmax": dict(rtol=1e-5, atol=1e-7),
    "layernorm": dict(rtol=1e-4, atol=1e-4),  # rows offset by 30: float32 spacing there is 2e-6, times rstd
    "attention": dict(rtol=1e-4, atol=2e-5),
    "cross_entropy": dict(rtol=1e-5, atol=1e-7),
    "linear_cross_entropy": dict(rtol=1e-4, atol=1e-6),  # dh, dweight: GEMMs over the chunk's dlogits
    "gelu": dict(rtol=1e-5, atol=1e-5),  # float32 gelu' differs by a few ulp (another tanh formula), summed in dbias
    "relu": dict(rtol=1e-5, atol=1e-4),  # dbias: up to 300 float32 rows summed in another order
    "embedding": dict(rtol=1e-6, atol=1e-7),
    "adamw": dict(rtol=1e-5, atol=1e-7),
}
DTYPES = [np.float64, np.float32]
PROPERTY = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def close(actual, expected, kernel, dtype):
    """Assert equal within the stated tolerance, and no NaN/inf where the reference is finite."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    tol = TOL64 if np.dtype(dtype) == np.float64 else TOL32[kernel]
    np.testing.assert_allclose(actual, expected, **tol)
    assert np.isfinite(actual[np.isfinite(expected)]).all()


def normal(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


# ------------------------------------------- LM head fused with cross-entropy
@PROPERTY
@given(N=st.integers(1, 40), C=st.integers(1, 9), V=st.integers(1, 60), chunk=st.sampled_from([None, 1, 7, 64]),
       scale=st.sampled_from([1e-2, 1.0, 30.0]), ignored=st.sampled_from(["none", "some", "all"]),
       seed=st.integers(0, 2 ** 16), dtype=st.sampled_from(DTYPES))
def test_linear_cross_entropy(ops, ref, N, C, V, chunk, scale, ignored, seed, dtype):
    """The fused head + cross-entropy, in chunks of any size, against the two unfused reference
    kernels on the (N, V) logits: loss, dh = dlogits @ w and dweight = dlogits^T @ h."""
    rng = np.random.default_rng(seed)
    h, w = normal(rng, (N, C), dtype, scale), normal(rng, (V, C), dtype)
    targets = rng.integers(0, V, size=N)
    if ignored == "some":
        targets[rng.random(N) < 0.5] = -100
    elif ignored == "all":
        targets[:] = -100
    logits = h @ w.T
    loss_ref, cache_ref = ref.cross_entropy_forward(logits, targets)
    dlogits = ref.cross_entropy_backward(1.0, cache_ref)
    loss, cache = ops.linear_cross_entropy_forward(h, w, targets, grad=True, chunk_rows=chunk)
    assert ops.linear_cross_entropy_forward(h, w, targets, chunk_rows=chunk) == (loss, None)  # loss only
    close(loss, loss_ref, "cross_entropy", dtype)
    dh, dw = ops.linear_cross_entropy_backward(1.0, cache)
    close(dh, dlogits @ w, "linear_cross_entropy", dtype)
    close(dw, dlogits.T @ h, "linear_cross_entropy", dtype)
    if ignored == "all":
        assert loss == 0.0 and not dh.any() and not dw.any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_cross_entropy_writes_dweight_and_scales(ops, dtype):
    """dweight lands in the given buffer (whatever it held: it is overwritten), the (B, T, C)
    shape of h comes back on dh, and a dloss other than 1 scales both gradients."""
    rng = np.random.default_rng(0)
    h, w = normal(rng, (2, 150, 5), dtype), normal(rng, (11, 5), dtype)
    targets = rng.integers(0, 11, size=(2, 150))
    buf = np.full_like(w, 7.0)
    _, cache = ops.linear_cross_entropy_forward(h, w, targets, grad=True, dweight=buf, chunk_rows=128)
    dh, dw = cache
    assert dw is buf and dh.shape == h.shape
    _, (dh1, dw1) = ops.linear_cross_entropy_forward(h, w, targets, grad=True, chunk_rows=300)  # one chunk
    close(dw, dw1, "linear_cross_entropy", dtype)
    close(dh, dh1, "linear_cross_entropy", dtype)
    dh2, dw2 = ops.linear_cross_entropy_backward(0.5, (dh1.copy(), dw1.copy()))
    close(dh2, 0.5 * dh1, "linear_cross_entropy", dtype)
    close(dw2, 0.5 * dw1, "linear_cross_entropy", dtype)


def test_linear_cross_entropy_refuses_bad_inputs(ops):
    h, w, t = np.ones((3, 4), np.float32), np.ones((5, 4), np.float32), np.array([0, 1, -100])
    for args, kw, says in [((h, np.ones((5, 3), np.float32), t), {}, "weight must have shape"),
                           ((h, w.astype(np.float64), t), {}, "weight must have dtype float32"),
                           ((h, w, np.array([0, 5, 1])), {}, "targets must lie in [0, 5)"),
                           ((h, w, t[:2]), {}, "targets must have shape"),
                           ((h, w, t), dict(grad=True, dweight=np.ones((4, 5), np.float32)), "dweight must be"),
                           ((h, w, t), dict(chunk_rows=0), "chunk_rows must be an integer >= 1")]:
        with pytest.raises(FastformerError, match=re.escape(says)):
            ops.linear_cross_entropy_forward(*args, **kw)
    with pytest.raises(FastformerError, match="grad=True"):
        ops.linear_cross_entropy_backward(1.0, None)
    _, cache = ops.linear_cross_entropy_forward(h, w, t, grad=True)
    for dloss in (np.nan, np.inf, "x", None):
        with pytest.raises(FastformerError, match="dloss must be a finite number"):
            ops.linear_cross_entropy_backward(dloss, cache)
    with pytest.raises(FastformerError, match="the cache of linear_cross_entropy_forward must be"):
        ops.linear_cross_entropy_backward(1.0, (cache[0], cache[1].astype(np.float64)))


# ---------------------------------------------------------------- softmax
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax(fast_ops, ref, dtype):
    rng = np.random.default_rng(0)
    x = normal(rng, (3, 5, 17), dtype, 3.0)
    x[0, 1, ::2] = -np.inf
    x[1, 2, :] = -np.inf  # a fully masked row gives zeros
    dy = normal(rng, x.shape, dtype)
    y, cache = fast_ops.softmax_forward(x)
    y_ref, cache_ref = ref.softmax_forward(x)
    close(y, y_ref, "softmax", dtype)
    assert (y[0, 1, ::2] == 0).all() and (y[1, 2] == 0).all()
    close(fast_ops.softmax_backward(dy, cache), ref.softmax_backward(dy, cache_ref), "softmax", dtype)


@PROPERTY
@given(rows=st.integers(1, 5), C=st.integers(1, 40), scale=st.sampled_from([1e-3, 1.0, 1e4]),
       seed=st.integers(0, 2 ** 16), dtype=st.sampled_from(DTYPES))
def test_softmax_property(fast_ops, ref, rows, C, scale, seed, dtype):
    rng = np.random.default_rng(seed)
    x = normal(rng, (rows, C), dtype, scale)
    x[rng.random(x.shape) < 0.3] = -np.inf
    dy = normal(rng, x.shape, dtype)
    y, cache = fast_ops.softmax_forward(x)
    y_ref, cache_ref = ref.softmax_forward(x)
    close(y, y_ref, "softmax", dtype)
    close(fast_ops.softmax_backward(dy, cache), ref.softmax_backward(dy, cache_ref), "softmax", dtype)


# -------------------------------------------------------------- layernorm
@PROPERTY
@given(shape=st.sampled_from([(1, 1), (2, 3, 7), (5, 1), (1, 64), (33, 31)]), offset=st.sampled_from([0.0, 30.0]),
       seed=st.integers(0, 2 ** 16), dtype=st.sampled_from(DTYPES))
def test_layernorm(fast_ops, ref, shape, offset, seed, dtype):
    rng = np.random.default_rng(seed)
    x = normal(rng, shape, dtype) + dtype(offset)
    w, b = normal(rng, shape[-1:], dtype), normal(rng, shape[-1:], dtype)
    dy = normal(rng, shape, dtype)
    y, cache = fast_ops.layernorm_forward(x, w, b)
    y_ref, cache_ref = ref.layernorm_forward(x, w, b)
    close(y, y_ref, "layernorm", dtype)
    for g, g_ref in zip(fast_ops.layernorm_backward(dy, cache), ref.layernorm_backward(dy, cache_ref)):
        close(g, g_ref, "layernorm", dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_ds", [False, True])
def test_residual_layernorm(fast_ops, ref, dtype, with_ds):
    rng = np.random.default_rng(1)
    x, r = normal(rng, (3, 5, 24), dtype), normal(rng, (3, 5, 24), dtype)
    w, b = normal(rng, 24, dtype), normal(rng, 24, dtype)
    dy, ds = normal(rng, x.shape, dtype), normal(rng, x.shape, dtype)
    (s, y), cache = fast_ops.residual_layernorm_forward(x, r, w, b)
    (s_ref, y_ref), cache_ref = ref.residual_layernorm_forward(x, r, w, b)
    close(s, s_ref, "layernorm", dtype)
    close(y, y_ref, "layernorm", dtype)
    got = fast_ops.residual_layernorm_backward(dy, ds.copy() if with_ds else None, cache)
    want = ref.residual_layernorm_backward(dy, ds.copy() if with_ds else None, cache_ref)
    for g, g_ref in zip(got, want):
        close(g, g_ref, "layernorm", dtype)


# -------------------------------------------------------------- attention
def _attention_case(rng, B, H, T, S, hs, causal, pad, dtype):
    q = normal(rng, (B, H, T, hs), dtype)
    k, v = normal(rng, (B, H, S, hs), dtype), normal(rng, (B, H, S, hs), dtype)
    kpm = None
    if pad == "random":
        kpm = rng.random((B, S)) < 0.4
    elif pad == "all":  # every key of batch row 0 is padding: its queries attend to nothing
        kpm = np.zeros((B, S), dtype=bool)
        kpm[0] = True
    return q, k, v, kpm


def check_attention(ops, ref, q, k, v, causal, kpm, dtype):
    rng = np.random.default_rng(7)
    out, cache = ops.attention_forward(q, k, v, causal, kpm)
    out_ref, cache_ref = ref.attention_forward(q, k, v, causal, kpm)
    close(out, out_ref, "attention", dtype)
    close(cache[4], cache_ref[4], "attention", dtype)  # lse, -inf on rows with no key
    dout = normal(rng, out.shape, dtype)
    for g, g_ref in zip(ops.attention_backward(dout, cache), ref.attention_backward(dout, cache_ref)):
        close(g, g_ref, "attention", dtype)




@PROPERTY
@given(B=st.integers(1, 2), H=st.integers(1, 3), T=st.integers(1, 9), extra=st.integers(0, 4),
       hs=st.integers(1, 5), causal=st.booleans(), pad=st.sampled_from([None, "random", "all"]),
       seed=st.integers(0, 2 ** 16), dtype=st.sampled_from(DTYPES))
def test_attention_property(fast_ops, ref, B, H, T, extra, hs, causal, pad, seed, dtype):
    rng = np.random.default_rng(seed)
    q, k, v, kpm = _attention_case(rng, B, H, T, T + extra, hs, causal, pad, dtype)
    check_attention(fast_ops, ref, q, k, v, causal, kpm, dtype)


@PROPERTY
@given(B=st.integers(1, 2), H=st.integers(1, 2), T=st.integers(1, 70), extra=st.integers(0, 40),
       hs=st.sampled_from([32, 64]), causal=st.booleans(), pad=st.sampled_from([None, "random", "all"]),
       seed=st.integers(0, 2 ** 16))
def test_attention_on_register_tiles_property(fast_ops, ref, B, H, T, extra, hs, causal, pad, seed):
    """float32 heads of 32 and 64 channels take the register tiles (kernels/_tiles.py): query
    blocks of 8 and 32 rows and key tiles of 32 cut anywhere, extra keys, padding."""
    rng = np.random.default_rng(seed)
    q, k, v, kpm = _attention_case(rng, B, H, T, T + extra, hs, causal, pad, np.float32)
    check_attention(fast_ops, ref, q, k, v, causal, kpm, np.float32)


@pytest.mark.parametrize("causal,pad", [(True, None), (False, "random")])
def test_attention_on_register_tiles_past_the_blas_tiles_crossover(fast_ops, ref, causal, pad):
    """Heads the register tiles take stay on them past ATTENTION_TILED_FROM query rows."""
    from fastformer.kernels.ops import attention as A

    rng = np.random.default_rng(12)
    T = A.ATTENTION_TILED_FROM + 7
    q, k, v, kpm = _attention_case(rng, 1, 1, T, T, 32, causal, pad, np.float32)
    check_attention(fast_ops, ref, q, k, v, causal, kpm, np.float32)


@pytest.mark.parametrize("B,H,T,causal,pad", [(16, 3, 40, True, None), (8, 5, 19, False, "random"),
                                              (17, 2, 9, True, "random")])
def test_attention_register_tiles_take_a_batch_rows_heads_in_units(fast_ops, ref, B, H, T, causal, pad):
    """The float32 tiles stage several heads of one batch row per task (`_head_units`), the last
    unit of a row cut short where its size does not divide H: every head of every row against the
    reference, from separate arrays and from a fused QKV projection's strided views."""
    from fastformer.kernels.ops import attention as A

    G, U = A._head_units(B, H, T, 32)
    assert G > 1 and (G * U > H) == (H == 5)  # units of several heads; (8, 5, 19) cuts its last one short
    rng = np.random.default_rng(B * H + T)
    q, k, v, kpm = _attention_case(rng, B, H, T, T, 32, causal, pad, np.float32)
    check_attention(fast_ops, ref, q, k, v, causal, kpm, np.float32)
    qkv = normal(rng, (B, T, 3 * H * 32), np.float32)
    out, cache = fast_ops.attention_qkv_forward(qkv, H, causal, kpm)
    out_ref, cache_ref = ref.attention_qkv_forward(qkv, H, causal, kpm)
    close(out, out_ref, "attention", np.float32)
    dout = normal(rng, out.shape, np.float32)
    close(fast_ops.attention_qkv_backward(dout, cache), ref.attention_qkv_backward(dout, cache_ref), "attention",
          np.float32)


def test_attention_register_tiles_are_the_path_taken_and_read_strided_heads(fast_ops, ref, monkeypatch):
    """Guards the property above: hs = 32 float32 runs the tile kernels (and the fused QKV views,
    whose rows are 3C apart, are read in place), other shapes the row kernels."""
    from fastformer.kernels._tiles import tiles_run
    from fastformer.kernels.ops import attention as A

    if not tiles_run():
        pytest.skip("the tiles are compiled code: not under NUMBA_DISABLE_JIT")
    taken, on_tiles = [], A._on_tiles
    monkeypatch.setattr(A, "_on_tiles", lambda *arrays: taken.append(on_tiles(*arrays)) or taken[-1])
    rng = np.random.default_rng(11)
    assert on_tiles(np.zeros((1, 1, 1, 32), np.float32)) and not on_tiles(np.zeros((1, 1, 1, 4), np.float32))
    assert not on_tiles(np.zeros((1, 1, 1, 32)))  # float64: the row kernels
    qkv = rng.standard_normal((2, 19, 3 * 64)).astype(np.float32)
    out, cache = fast_ops.attention_qkv_forward(qkv, 2, True)
    out_ref, cache_ref = ref.attention_qkv_forward(qkv, 2, True)
    close(out, out_ref, "attention", np.float32)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    close(fast_ops.attention_qkv_backward(dout, cache), ref.attention_qkv_backward(dout, cache_ref), "attention",
          np.float32)
    assert taken == [True, True]  # the forward and the backward


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal,pad,T,S", [(False, None, 5, 5), (True, None, 7, 7), (True, "random", 4, 9),
                                            (False, "random", 3, 6), (True, "all", 5, 5), (True, "random", 10, 10)])
@pytest.mark.parametrize("tiles", [False, True])
def test_attention(fast_ops, ref, request, tiles, dtype, causal, pad, T, S):
    """The backend's attention -- its row kernels, or on BLAS tiles -- forward and backward,
    against the reference's plain one."""
    if tiles:
        request.getfixturevalue("tiled")
    rng = np.random.default_rng(3)
    q, k, v, kpm = _attention_case(rng, 2, 3, T, S, 4, causal, pad, dtype)
    check_attention(fast_ops, ref, q, k, v, causal, kpm, dtype)


@PROPERTY
@given(B=st.integers(1, 2), H=st.integers(1, 3), T=st.integers(1, 12), extra=st.integers(0, 5),
       hs=st.integers(1, 5), causal=st.booleans(), pad=st.sampled_from([None, "random", "all"]),
       seed=st.integers(0, 2 ** 16), dtype=st.sampled_from(DTYPES))
def test_attention_tiled_property(ref, B, H, T, extra, hs, causal, pad, seed, dtype):
    """The tiled form with the NumPy block steps (the steps' specification) equals the plain
    reference attention, in blocks of 4."""
    from fastformer.kernels.ops import attention_tiled as tiled

    rng = np.random.default_rng(seed)
    q, k, v, kpm = _attention_case(rng, B, H, T, T + extra, hs, causal, pad, dtype)
    out_ref, cache = ref.attention_forward(q, k, v, causal, kpm)
    dout = normal(rng, out_ref.shape, dtype)
    saved, tiled.ATTENTION_BLOCK = tiled.ATTENTION_BLOCK, 4
    try:
        out = np.empty_like(q)
        lse = tiled.attention_tiled(ref, q, k, v, causal, kpm, cache.scale, cache.precision, out,
                                    steps=tiled.NUMPY_STEPS)
        grads = [np.empty_like(a) for a in (q, k, v)]
        tiled.attention_tiled_grads(ref, dout, (*cache[:4], lse, *cache[5:]), *grads, steps=tiled.NUMPY_STEPS)
    finally:
        tiled.ATTENTION_BLOCK = saved
    close(out, out_ref, "attention", dtype)
    close(lse, cache[4], "attention", dtype)
    for g, g_ref in zip(grads, ref.attention_backward(dout, cache)):
        close(g, g_ref, "attention", dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,hs", [(2, 3), (3, 1)])
@pytest.mark.parametrize("tiles", [False, True])
def test_attention_qkv_matches_split_heads(ops, ref, request, tiles, dtype, H, hs):
    """The fused-QKV entry point equals attention_forward on the split heads (reference); with
    tiles, a backend's tiled form reads and writes the strided heads in place."""
    if tiles:
        if ops.name == "numpy":
            pytest.skip("the reference has no tiled path to select")
        request.getfixturevalue("tiled")
    rng = np.random.default_rng(4)
    B, T, C = 2, 8, H * hs
    qkv = normal(rng, (B, T, 3 * C), dtype)
    kpm = np.zeros((B, T), dtype=bool)
    kpm[1, :2] = True
    out, cache = ops.attention_qkv_forward(qkv, H, causal=True, key_padding_mask=kpm)
    q, k, v = (np.ascontiguousarray(a) for a in qkv.reshape(B, T, 3, H, hs).transpose(2, 0, 3, 1, 4))
    heads, cache_ref = ref.attention_forward(q, k, v, True, kpm)
    close(out, heads.transpose(0, 2, 1, 3).reshape(B, T, C), "attention", dtype)
    dout = normal(rng, out.shape, dtype)
    dq, dk, dv = ref.attention_backward(dout.reshape(B, T, H, hs).transpose(0, 2, 1, 3), cache_ref)
    want = np.stack((dq, dk, dv)).transpose(1, 3, 0, 2, 4).reshape(B, T, 3 * C)
    close(ops.attention_qkv_backward(dout, cache), want, "attention", dtype)


# ---------------------------------------------------------- cross-entropy
@PROPERTY
@given(N=st.integers(1, 12), V=st.integers(1, 50), scale=st.sampled_from([1e-3, 1.0, 1e4]),
       ignored=st.sampled_from(["none", "some", "all"]), seed=st.integers(0, 2 ** 16),
       dtype=st.sampled_from(DTYPES))
def test_cross_entropy(fast_ops, ref, N, V, scale, ignored, seed, dtype):
    rng = np.random.default_rng(seed)
    logits = normal(rng, (N, V), dtype, scale)
    targets = rng.integers(0, V, size=N)
    if ignored == "some":
        targets[rng.random(N) < 0.5] = -100
    elif ignored == "all":
        targets[:] = -100
    loss, cache = fast_ops.cross_entropy_forward(logits, targets)
    loss_ref, cache_ref = ref.cross_entropy_forward(logits, targets)
    assert np.isfinite(loss)
    close(loss, loss_ref, "cross_entropy", dtype)
    for dloss in (1.0, 0.5):
        close(fast_ops.cross_entropy_backward(dloss, cache), ref.cross_entropy_backward(dloss, cache_ref),
              "cross_entropy", dtype)
    if ignored == "all":
        assert loss == 0.0 and not fast_ops.cross_entropy_backward(1.0, cache).any()


def test_cross_entropy_3d_and_custom_ignore(ops):
    """Against the formula, in float64: the mean over kept positions of logsumexp - the target's
    logit; gradient (softmax - one_hot) / kept, zero at ignored positions."""
    rng = np.random.default_rng(5)
    logits = normal(rng, (2, 3, 11), np.float32)
    targets = np.array([[1, 7, 0], [10, 7, 3]])
    loss, cache = ops.cross_entropy_forward(logits, targets, ignore_index=7)
    x = logits.astype(np.float64)
    keep = targets != 7  # (2, 3)
    lse = np.log(np.exp(x).sum(-1))  # (2, 3)
    picked = np.take_along_axis(x, np.where(keep, targets, 0)[..., None], -1)[..., 0]
    close(loss, (lse - picked)[keep].mean(), "cross_entropy", np.float32)
    grad = np.exp(x - lse[..., None])
    grad[keep, targets[keep]] -= 1.0
    grad *= keep[..., None] / keep.sum()
    close(ops.cross_entropy_backward(1.0, cache), grad, "cross_entropy", np.float32)


@PROPERTY
@given(shape=st.sampled_from([(1, 1), (5, 17), (2, 3, 11), (4, 300)]), scale=st.sampled_from([1.0, 1e4]),
       ignored=st.sampled_from(["none", "some", "all"]), seed=st.integers(0, 2 ** 16),
       dtype=st.sampled_from(DTYPES))
def test_cross_entropy_out(ops, ref, shape, scale, ignored, seed, dtype):
    """The gradient written into `out` -- a separate array, or the logits themselves -- is the
    gradient the backward returns without it, and the loss is unchanged."""
    rng = np.random.default_rng(seed)
    logits = normal(rng, shape, dtype, scale)
    targets = rng.integers(0, shape[-1], size=shape[:-1])
    if ignored == "some":
        targets[rng.random(shape[:-1]) < 0.5] = -100
    elif ignored == "all":
        targets[...] = -100
    loss, cache = ops.cross_entropy_forward(logits, targets)
    want = ops.cross_entropy_backward(1.0, cache)
    loss_ref, cache_ref = ref.cross_entropy_forward(logits, targets)
    out = np.full_like(logits, np.nan)
    loss_out, cache_out = ops.cross_entropy_forward(logits, targets, out=out)
    assert loss_out == loss
    assert ops.cross_entropy_backward(1.0, cache_out) is out
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(ops.cross_entropy_backward(0.5, cache_out), ops.cross_entropy_backward(0.5, cache))
    inplace = logits.copy()
    loss_in, cache_in = ops.cross_entropy_forward(inplace, targets, out=inplace)
    assert loss_in == loss and cache_in is inplace
    np.testing.assert_array_equal(inplace, want)
    close(loss_in, loss_ref, "cross_entropy", dtype)
    if np.dtype(dtype) == np.float32 and scale > 1.0:
        # the reference's exp(x - lse) carries the rounding of lse itself, ulp(1e4) = 1e-3 in
        # float32: its probabilities are only that accurate relative to each other
        np.testing.assert_allclose(inplace, ref.cross_entropy_backward(1.0, cache_ref),
                                   rtol=4 * np.finfo(np.float32).eps * scale, atol=1e-7)
    else:
        close(inplace, ref.cross_entropy_backward(1.0, cache_ref), "cross_entropy", dtype)


def test_cross_entropy_out_overlapping_logits(ops, ref):
    """`out` that overlaps the logits without being them (shifted by a row) still gets the gradient."""
    rng = np.random.default_rng(7)
    N, V = 6, 13
    logits = normal(rng, (N, V), np.float64)
    targets = rng.integers(0, V, size=N)
    targets[2] = -100
    loss_ref, cache_ref = ref.cross_entropy_forward(logits, targets)
    buf = np.concatenate([logits.reshape(-1), np.zeros(V)])
    loss, cache = ops.cross_entropy_forward(buf[:N * V].reshape(N, V), targets, out=buf[V:].reshape(N, V))
    close(loss, loss_ref, "cross_entropy", np.float64)
    close(buf[V:].reshape(N, V), ref.cross_entropy_backward(1.0, cache_ref), "cross_entropy", np.float64)


def test_cross_entropy_out_must_match_logits(ops):
    logits = np.zeros((4, 6), np.float32)
    targets = np.zeros(4, np.int64)
    for bad in (np.zeros((4, 5), np.float32), np.zeros((4, 6), np.float64), np.zeros((6, 4), np.float32).T,
                [[0.0] * 6] * 4):
        with pytest.raises(ValueError, match="out must be a writeable C-contiguous float32 array of shape"):
            ops.cross_entropy_forward(logits, targets, out=bad)
    frozen = np.zeros_like(logits)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="out must be a writeable"):
        ops.cross_entropy_forward(logits, targets, out=frozen)


# ------------------------------------------------------------------- GELU
@PROPERTY
@given(shape=st.sampled_from([(1, 1), (3, 5), (2, 3, 17), (4, 64)]), approximate=st.sampled_from(["tanh", "none"]),
       with_bias=st.booleans(), scale=st.sampled_from([0.1, 3.0, 30.0]), seed=st.integers(0, 2 ** 16),
       dtype=st.sampled_from(DTYPES))
def test_gelu(fast_ops, ref, shape, approximate, with_bias, scale, seed, dtype):
    rng = np.random.default_rng(seed)
    x = normal(rng, shape, dtype, scale)
    b = normal(rng, shape[-1:], dtype) if with_bias else None
    dy = normal(rng, shape, dtype)
    y, cache = fast_ops.gelu_forward(x, b, approximate)
    y_ref, cache_ref = ref.gelu_forward(x, b, approximate)
    close(y, y_ref, "gelu", dtype)
    dx, db = fast_ops.gelu_backward(dy, cache)
    dx_ref, db_ref = ref.gelu_backward(dy, cache_ref)
    close(dx, dx_ref, "gelu", dtype)
    if with_bias:
        close(db, db_ref, "gelu", dtype)
    else:
        assert db is None


# ------------------------------------------------------------------- ReLU
@PROPERTY
@given(shape=st.sampled_from([(1, 1), (3, 5), (2, 3, 17), (4, 64), (300, 70)]), with_bias=st.booleans(),
       seed=st.integers(0, 2 ** 16), dtype=st.sampled_from(DTYPES))
def test_relu(fast_ops, ref, shape, with_bias, seed, dtype):
    rng = np.random.default_rng(seed)
    x = normal(rng, shape, dtype)
    x.reshape(-1)[::7] = 0.0  # exact zeros: the gradient there is 0, as in torch
    b = normal(rng, shape[-1:], dtype) if with_bias else None
    dy = normal(rng, shape, dtype)
    y, cache = fast_ops.relu_forward(x, b)
    y_ref, cache_ref = ref.relu_forward(x, b)
    np.testing.assert_array_equal(y, y_ref)  # one add and a max: exact on both backends
    dx, db = fast_ops.relu_backward(dy, cache)
    dx_ref, db_ref = ref.relu_backward(dy, cache_ref)
    np.testing.assert_array_equal(dx, dx_ref)
    if with_bias:
        close(db, db_ref, "relu", dtype)
    else:
        assert db is None


# -------------------------------------------------------------- embedding
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [1, 3, 40])
def test_embedding(fast_ops, ref, dtype, C):
    rng = np.random.default_rng(6)
    w = normal(rng, (9, C), dtype)
    ids = rng.integers(0, 9, size=(4, 13))
    ids[0, :5] = 2  # repeated ids: the scatter-add must sum them all
    out, cache = fast_ops.embedding_forward(w, ids)
    np.testing.assert_array_equal(out, w[ids])
    dout = normal(rng, out.shape, dtype)
    _, cache_ref = ref.embedding_forward(w, ids)
    close(fast_ops.embedding_backward(dout, cache), ref.embedding_backward(dout, cache_ref), "embedding", dtype)
    acc, acc_ref = np.ones_like(w), np.ones_like(w)
    fast_ops.embedding_backward(dout, cache, dweight=acc)
    ref.embedding_backward(dout, cache_ref, dweight=acc_ref)
    close(acc, acc_ref, "embedding", dtype)


# ------------------------------------------------------------------ AdamW
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("step", [1, 10])
def test_adamw(fast_ops, ref, dtype, step):
    rng = np.random.default_rng(8)
    arrays = [normal(rng, 1001, dtype), normal(rng, 1001, dtype), normal(rng, 1001, dtype, 0.1),
              (rng.random(1001) * 0.1).astype(dtype)]
    mine, theirs = [a.copy() for a in arrays], [a.copy() for a in arrays]
    kw = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=step)
    fast_ops.adamw_update(*mine, **kw)
    ref.adamw_update(*theirs, **kw)
    for a, b in zip(mine, theirs):
        close(a, b, "adamw", dtype)


def test_adamw_non_contiguous_updates_in_place(ops):
    """Strided views are updated in place (not copies), by the AdamW step written out in float64,
    and the entries between them are left alone."""
    rng = np.random.default_rng(9)
    arrays = [normal(rng, (6, 8), np.float32) for _ in range(4)]
    arrays[3] = np.abs(arrays[3])
    views = [a[:, ::2] for a in arrays]
    between = [a[:, 1::2].copy() for a in arrays]
    p, g, m, v = (a.astype(np.float64) for a in views)
    lr, wd, step, b1, b2, eps = 1e-2, 0.1, 2, 0.9, 0.999, 1e-8
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    p = p * (1 - lr * wd) - lr / (1 - b1 ** step) * m / (np.sqrt(v / (1 - b2 ** step)) + eps)
    ops.adamw_update(*views, lr=lr, weight_decay=wd, step=step)
    for got, want in zip((views[0], views[2], views[3]), (p, m, v)):
        close(got, want, "adamw", np.float32)
    for a, b in zip(arrays, between):
        np.testing.assert_array_equal(a[:, 1::2], b)


# ------------------------------------------------------------- bad inputs
def test_non_contiguous_inputs_are_converted(ops, ref):
    """Strided inputs give what the reference gives for their contiguous copies."""
    rng = np.random.default_rng(10)
    x = normal(rng, (6, 10), np.float32)[:, ::2]  # (6, 5), strided
    xc, xt = np.ascontiguousarray(x), np.ascontiguousarray(x.T)
    w, b = np.ones(5, np.float32), np.zeros(5, np.float32)
    close(ops.layernorm_forward(x, w, b)[0], ref.layernorm_forward(xc, w, b)[0], "layernorm", np.float32)
    close(ops.softmax_forward(x.T)[0], ref.softmax_forward(xt)[0], "softmax", np.float32)
    close(ops.gelu_forward(x.T)[0], ref.gelu_forward(xt)[0], "gelu", np.float32)


@pytest.mark.parametrize("bad", [np.arange(6).reshape(2, 3), np.ones((2, 3), np.float16)])
def test_wrong_dtype_is_refused(ops, bad):
    with pytest.raises(ValueError, match="x must be a float32 or float64 array"):
        ops.softmax_forward(bad)
    with pytest.raises(ValueError, match="float32 or float64"):
        ops.gelu_forward(bad)


def test_mixed_dtypes_are_refused(ops):
    x = np.ones((2, 4), np.float32)
    with pytest.raises(ValueError, match="weight must have dtype float32"):
        ops.layernorm_forward(x, np.ones(4), np.zeros(4, np.float32))


def test_wrong_shapes_are_refused(ops):
    x = np.ones((2, 4), np.float32)
    with pytest.raises(ValueError, match="weight"):
        ops.layernorm_forward(x, np.ones(3, np.float32), np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="qkv must have shape"):
        ops.attention_qkv_forward(np.ones((2, 3, 10), np.float32), 2)


# ------------------------------------------------- Python path of the kernels
def test_kernels_without_jit():
    """Run this file's example tests once more with NUMBA_DISABLE_JIT=1: the kernels then run
    as plain Python, which checks the same source and lets coverage see inside them."""
    pytest.importorskip("numba")
    env = dict(os.environ, NUMBA_DISABLE_JIT="1", PYTHONPATH=os.pathsep.join(sys.path))
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
           "-k", "numba and not property and not without_jit"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert " passed" in r.stdout
