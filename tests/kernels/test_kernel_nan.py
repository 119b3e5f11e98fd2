"""NaN, infinity and read-only inputs: the rules of kernels/ops/__init__.py's docstring, on every backend, and
the same results from the reference and Numba (`fast_ops` against `ref`)."""

import numpy as np
import pytest

from fastformer.errors import FastformerError
from fastformer.kernels import checks

DTYPES = [np.float32, np.float64]
# NumPy warns where the reference computes inf - inf or 0 * inf; Numba does not warn
pytestmark = pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning", "ignore:overflow:RuntimeWarning",
                                        "ignore:divide by zero:RuntimeWarning")


def same(a, b):
    """Equal within float32 rounding, with NaN and inf in the same places."""
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert np.array_equal(np.isnan(a), np.isnan(b)) and np.array_equal(np.isinf(a), np.isinf(b))


# ---------------------------------------------------------------- softmax
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_rows_with_nan_or_inf_are_nan_rows(ops, dtype):
    x = np.array([[1, np.nan, 2, 0], [1, np.inf, 2, 0], [np.nan] * 4, [-np.inf, 0, 1, -np.inf],
                  [-np.inf] * 4, [1, 2, 3, 4]], dtype)
    y, cache = ops.softmax_forward(x)
    assert np.isnan(y[:3]).all()
    assert y[3, 0] == 0 and y[3, 3] == 0 and np.isclose(y[3].sum(), 1)  # -inf is a masked entry
    assert (y[4] == 0).all()  # all masked: zeros, not NaN
    np.testing.assert_allclose(y[5], np.exp(x[5] - 4) / np.exp(x[5] - 4).sum(), rtol=1e-6)
    dx = ops.softmax_backward(np.ones_like(x), cache)
    assert np.isnan(dx[:3]).all() and np.isfinite(dx[3:]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_nan_rows_match_the_reference(fast_ops, ref, dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 33)).astype(dtype)  # wide rows: the vectorised loops
    x[3, 7], x[5, 32], x[8, 0] = np.nan, np.inf, -np.inf
    x[9] = -np.inf
    same(fast_ops.softmax_forward(x)[0], ref.softmax_forward(x)[0])


# -------------------------------------------------------------- attention
def _qkv(rng, dtype, B=2, H=2, T=5, hs=4):
    return [rng.standard_normal((B, H, T, hs)).astype(dtype) for _ in range(3)]


@pytest.fixture(params=[False, True], ids=["rows", "tiles"])
def tiles(request):
    """Attention by a backend's row kernels, then on BLAS tiles (conftest's `tiled`)."""
    if request.param:
        request.getfixturevalue("tiled")
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_a_nan_query_gives_a_nan_row_and_leaves_the_others(fast_ops, ref, tiles, dtype, causal):
    rng = np.random.default_rng(1)
    q, k, v = _qkv(rng, dtype)
    kpm = np.zeros((2, 5), bool)
    kpm[1, :2] = True
    clean = ref.attention_forward(q, k, v, causal, kpm)[0]
    q[0, 1, 2, 3] = np.nan
    for ops in (ref, fast_ops):
        out, cache = ops.attention_forward(q, k, v, causal, kpm)
        assert np.isnan(out[0, 1, 2]).all() and np.isnan(cache[4][0, 1, 2])  # the row and its lse
        rest = np.ones(out.shape, bool)
        rest[0, 1, 2] = False
        np.testing.assert_allclose(out[rest], clean[rest], rtol=1e-5, atol=1e-6)
        dq, dk, dv = ops.attention_backward(np.ones_like(out), cache)
        assert np.isnan(dq[0, 1, 2]).all() and np.isfinite(dq[1]).all() and np.isfinite(dk[1]).all()
    same(fast_ops.attention_forward(q, k, v, causal, kpm)[0], ref.attention_forward(q, k, v, causal, kpm)[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_nan_at_a_padded_or_future_key_changes_nothing(fast_ops, tiles, dtype):
    """-inf masking survives: a key a query may not see has no say, even when it is NaN."""
    rng = np.random.default_rng(2)
    q, k, v = _qkv(rng, dtype)
    kpm = np.zeros((2, 5), bool)
    kpm[:, 0] = True
    clean, _ = fast_ops.attention_forward(q, k, v, True, kpm)
    k[:, :, 0] = np.nan  # padded for every query
    k[:, :, 4] = np.inf  # the future of every query but the last
    out, _ = fast_ops.attention_forward(q, k, v, True, kpm)
    np.testing.assert_allclose(out[:, :, :4], clean[:, :, :4], rtol=1e-6)
    assert np.isnan(out[:, :, 4]).all()  # the last query sees the inf key: a NaN row


@pytest.mark.parametrize("dtype", DTYPES)
def test_fully_masked_queries_still_give_zeros(fast_ops, ref, tiles, dtype):
    q, k, v = _qkv(np.random.default_rng(3), dtype)
    kpm = np.zeros((2, 5), bool)
    kpm[1] = True
    for ops in (ref, fast_ops):
        out, cache = ops.attention_forward(q, k, v, False, kpm)
        assert (out[1] == 0).all() and (cache[4][1] == -np.inf).all()
        dq, dk, dv = ops.attention_backward(np.ones_like(out), cache)
        assert (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()


@pytest.mark.parametrize("scale", [np.nan, np.inf, -np.inf, -1.0, 0.0])
def test_a_scale_that_is_not_a_finite_positive_number_is_refused(ops, scale):
    q = np.ones((1, 1, 2, 2), np.float32)
    with pytest.raises(FastformerError, match=r"scale must be a (finite )?number > 0, got"):
        ops.attention_forward(q, q, q, scale=scale)
    with pytest.raises(FastformerError, match=r"scale must be a (finite )?number > 0, got"):
        ops.attention_qkv_forward(np.ones((1, 2, 6), np.float32), 1, scale=scale)


# ----------------------------------------------------------- cross-entropy
@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_nan_rows(fast_ops, ref, dtype):
    logits = np.array([[1, 2, 3], [np.nan, 0, 0], [np.inf, 0, 0], [np.nan, np.inf, 1]], dtype)
    for targets in ([0, 1, 2, -100], [0, -100, -100, -100]):
        results = []
        for ops in (ref, fast_ops):
            loss, cache = ops.cross_entropy_forward(logits, np.array(targets))
            results.append((loss, ops.cross_entropy_backward(1.0, cache)))
        (loss, grad), (loss_fast, grad_fast) = results
        same(grad_fast, grad)
        same(np.float64(loss_fast), np.float64(loss))
        counted = np.array(targets) != -100
        assert np.isnan(grad[1:][counted[1:]]).all()
        assert (grad[~counted] == 0).all()  # an ignored row: zero gradient, whatever it holds
        assert np.isnan(loss) == counted[1:].any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_head_nan_rows(fast_ops, ref, dtype):
    """The LM head fused with the cross-entropy: a counted row of h holding NaN makes the loss
    NaN; an ignored one leaves the loss alone and its dh row 0; both backends alike."""
    rng = np.random.default_rng(5)
    h, w = rng.standard_normal((6, 4)).astype(dtype), rng.standard_normal((9, 4)).astype(dtype)
    h[2, 1] = np.nan
    for targets, nan_loss in (([0, 1, -100, 3, 4, 5], False), ([0, 1, 2, 3, 4, 5], True)):
        results = [ops.linear_cross_entropy_forward(h, w, np.array(targets), grad=True) for ops in (ref, fast_ops)]
        (loss, (dh, _)), (loss_fast, (dh_fast, _)) = results
        assert np.isnan(loss) == np.isnan(loss_fast) == nan_loss
        same(dh_fast, dh)
        if not nan_loss:
            assert (dh[2] == 0).all() and np.isfinite(dh).all()


# --------------------------------------------------------------- LayerNorm
@pytest.mark.parametrize("dtype", DTYPES)
def test_layernorm_zero_and_infinite_variance(fast_ops, ref, dtype):
    """rstd at the ends of its range: a constant row with eps = 0 (rstd = inf, y = NaN) and an
    infinite eps or variance (rstd = 0, y = bias). Fast-math's reciprocal square root gave NaN
    for both on Numba."""
    x = np.array([[2, 2, 2, 2], [1, 2, 3, 4], [3e38, -3e38, 1, 0]], dtype)
    w, b = np.full(4, 2.0, dtype), np.arange(4, dtype=dtype)
    for eps in (0.0, 1e-5, np.inf):
        y_ref, cache = ref.layernorm_forward(x, w, b, eps)
        y, cache_fast = fast_ops.layernorm_forward(x, w, b, eps)
        same(y, y_ref)
        same(cache_fast[3], cache[3])
    assert (fast_ops.layernorm_forward(x, w, b, np.inf)[0] == b).all()


# ------------------------------------------------------------- read-only
def test_read_only_inputs_are_used_in_place():
    """A read-only or memory-mapped input is not copied by the checks (the kernels' signatures
    take read-only arrays); only an unaligned or strided one is."""
    x = np.ones((3, 4), np.float32)
    x.flags.writeable = False
    assert checks.as_float_array(x, "x") is x
    buf = np.frombuffer(np.ones(12, np.float32).tobytes(), np.float32).reshape(3, 4)
    assert checks.as_float_array(buf, "x") is buf
    ids = np.frombuffer(np.arange(4, dtype=np.int64).tobytes(), np.int64)
    assert checks.as_int_array(ids, "ids") is ids
    odd = np.zeros(4 * 12 + 1, np.uint8)[1:].view(np.float32).reshape(3, 4)
    assert not odd.flags.aligned and checks.as_float_array(odd, "x").flags.aligned


def test_read_only_arrays_on_every_kernel(ops, ref, tmp_path):
    """The reported refusal: np.memmap(mode="r"), np.frombuffer and writeable=False inputs."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 8)).astype(np.float32)
    path = tmp_path / "x.bin"
    x.tofile(path)
    frozen = x.copy()
    frozen.flags.writeable = False
    for ro in (np.memmap(path, np.float32, "r", shape=x.shape), np.frombuffer(x.tobytes(), np.float32).reshape(3, 8),
               frozen):
        w, b = ro[0], ro[1]
        same(ops.softmax_forward(ro)[0], ref.softmax_forward(x)[0])
        same(ops.layernorm_forward(ro, w, b)[0], ref.layernorm_forward(x, x[0], x[1])[0])
        same(ops.gelu_forward(ro, w)[0], ref.gelu_forward(x, x[0])[0])
        same(ops.embedding_forward(ro, np.array([2, 0]))[0], x[[2, 0]])
        _, cache = ops.cross_entropy_forward(ro, np.array([1, 2, 3]))
        same(ops.cross_entropy_backward(1.0, cache), ref.cross_entropy_backward(1.0, ref.cross_entropy_forward(
            x, np.array([1, 2, 3]))[1]))
        q = ro.reshape(1, 1, 3, 8)
        same(ops.attention_forward(q, q, q, True)[0], ref.attention_forward(q.copy(), q.copy(), q.copy(), True)[0])
        p, m, v = np.zeros(8, np.float32), np.zeros(8, np.float32), np.zeros(8, np.float32)
        ops.adamw_update(p, ro[0], m, v, lr=0.1)
        assert np.isfinite(p).all() and (p != 0).any()


def test_no_floating_point_warning_on_nan_and_inf(ops):
    """NaN and infinity in the inputs give the NaN rules' results silently on both backends: the
    reference no longer prints NumPy's RuntimeWarnings where the Numba kernels say nothing."""
    import warnings

    x = np.array([[np.nan, 1.0, np.inf], [-np.inf, -np.inf, -np.inf]], np.float32)
    w, b, t = np.ones(3, np.float32), np.zeros(3, np.float32), np.array([0, 1])
    q = x[None, None]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.softmax_backward(np.ones_like(x), ops.softmax_forward(x)[1])
        ops.cross_entropy_backward(1.0, ops.cross_entropy_forward(x, t)[1])
        ops.layernorm_backward(np.ones_like(x), ops.layernorm_forward(x, w, b)[1])
        for form in ("tanh", "none"):
            ops.gelu_backward(np.ones_like(x), ops.gelu_forward(x, approximate=form)[1])
        ops.attention_backward(np.ones((1, 1, 2, 3), np.float32), ops.attention_forward(q, q, q)[1])
        ops.adamw_update(x.copy(), x.copy(), x.copy(), np.abs(x), lr=0.1)
        ops.linear_cross_entropy_forward(x, x, t, grad=True)
        ops.linear_backward(np.ones((2, 2), np.float32), ops.linear_forward(x, x.T)[1], np.empty((3, 2), np.float32))
