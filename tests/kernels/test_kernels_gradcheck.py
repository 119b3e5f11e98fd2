"""Every kernel's backward against central finite differences in float64, on every backend."""

import numpy as np
import pytest
from conftest import numerical_grad

RTOL, ATOL = 1e-6, 1e-8


def check(analytic, numeric):
    np.testing.assert_allclose(analytic, numeric, rtol=RTOL, atol=ATOL)


def test_softmax_backward(ops):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5))
    x[1, 2] = -np.inf  # masked entry
    w = rng.normal(size=x.shape)
    y, cache = ops.softmax_forward(x)
    dx = ops.softmax_backward(w, cache)
    free = np.isfinite(x)
    num = numerical_grad(lambda: float((ops.softmax_forward(x)[0] * w).sum()), x)
    check(dx[free], num[free])
    assert y[1, 2] == 0.0 and dx[1, 2] == 0.0


def test_layernorm_backward(ops):
    rng = np.random.default_rng(1)
    x, w, b = rng.normal(size=(2, 3, 7)), rng.normal(size=7), rng.normal(size=7)
    dy = rng.normal(size=x.shape)
    f = lambda: float((ops.layernorm_forward(x, w, b)[0] * dy).sum())  # noqa: E731
    _, cache = ops.layernorm_forward(x, w, b)
    dx, dw, db = ops.layernorm_backward(dy, cache)
    check(dx, numerical_grad(f, x))
    check(dw, numerical_grad(f, w))
    check(db, numerical_grad(f, b))


def test_residual_layernorm_backward(ops):
    rng = np.random.default_rng(2)
    x, r = rng.normal(size=(2, 4, 6)), rng.normal(size=(2, 4, 6))
    w, b = rng.normal(size=6), rng.normal(size=6)
    dy, ds = rng.normal(size=x.shape), rng.normal(size=x.shape)

    def f():
        (s, y), _ = ops.residual_layernorm_forward(x, r, w, b)
        return float((y * dy).sum() + (s * ds).sum())

    (s, y), cache = ops.residual_layernorm_forward(x, r, w, b)
    np.testing.assert_allclose(s, x + r)
    dsum, dw, db = ops.residual_layernorm_backward(dy, ds.copy(), cache)
    check(dsum, numerical_grad(f, x))
    check(dsum, numerical_grad(f, r))
    check(dw, numerical_grad(f, w))
    check(db, numerical_grad(f, b))


@pytest.mark.parametrize("tiles", [False, True])
@pytest.mark.parametrize("causal,padded,T,S", [(False, False, 5, 5), (True, False, 5, 5),
                                               (True, True, 4, 6), (False, True, 3, 5)])
def test_attention_backward(ops, causal, padded, T, S, tiles, monkeypatch):
    if tiles:  # a backend's attention on BLAS tiles, in blocks of 2 (the reference keeps its plain form)
        from fastformer.kernels.ops import attention, attention_tiled

        if ops.name == "numpy":
            pytest.skip("the reference has no tiled path to select")
        monkeypatch.setattr(attention_tiled, "ATTENTION_BLOCK", 2)
        monkeypatch.setattr(attention, "ATTENTION_TILED_FROM", 1)
    rng = np.random.default_rng(3)
    B, H, hs = 2, 2, 3
    q, k, v = rng.normal(size=(B, H, T, hs)), rng.normal(size=(B, H, S, hs)), rng.normal(size=(B, H, S, hs))
    kpm = None
    if padded:
        kpm = np.zeros((B, S), dtype=bool)
        kpm[1, :2] = True  # left padding in row 1
    do = rng.normal(size=(B, H, T, hs))
    f = lambda: float((ops.attention_forward(q, k, v, causal, kpm)[0] * do).sum())  # noqa: E731
    out, cache = ops.attention_forward(q, k, v, causal, kpm)
    dq, dk, dv = ops.attention_backward(do, cache)
    assert np.isfinite(out).all() and np.isfinite(dq).all()
    check(dq, numerical_grad(f, q))
    check(dk, numerical_grad(f, k))
    check(dv, numerical_grad(f, v))


@pytest.mark.parametrize("ignored", [0, 3, 6])
def test_cross_entropy_backward(ops, ignored):
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(2, 3, 5)) * 3
    targets = rng.integers(0, 5, size=(2, 3))
    targets.reshape(-1)[:ignored] = -100
    f = lambda: ops.cross_entropy_forward(logits, targets)[0]  # noqa: E731
    loss, cache = ops.cross_entropy_forward(logits, targets)
    dlogits = ops.cross_entropy_backward(1.0, cache)
    check(dlogits, numerical_grad(f, logits))
    if ignored == 6:
        assert loss == 0.0 and not dlogits.any()


@pytest.mark.parametrize("ignored, chunk", [(0, None), (2, 2), (6, 4)])
def test_linear_cross_entropy_backward(ops, ignored, chunk):
    rng = np.random.default_rng(5)
    h, w = rng.normal(size=(2, 3, 4)), rng.normal(size=(5, 4))
    targets = rng.integers(0, 5, size=(2, 3))
    targets.reshape(-1)[:ignored] = -100
    f = lambda: ops.linear_cross_entropy_forward(h, w, targets, chunk_rows=chunk)[0]  # noqa: E731
    _, cache = ops.linear_cross_entropy_forward(h, w, targets, grad=True, chunk_rows=chunk)
    dh, dw = ops.linear_cross_entropy_backward(1.0, cache)
    check(dh, numerical_grad(f, h))
    check(dw, numerical_grad(f, w))


@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gelu_backward(ops, approximate, with_bias):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 4)) * 2
    b = rng.normal(size=4) if with_bias else None
    dy = rng.normal(size=x.shape)
    f = lambda: float((ops.gelu_forward(x, b, approximate)[0] * dy).sum())  # noqa: E731
    _, cache = ops.gelu_forward(x, b, approximate)
    dx, db = ops.gelu_backward(dy, cache)
    check(dx, numerical_grad(f, x))
    if with_bias:
        check(db, numerical_grad(f, b))
    else:
        assert db is None


@pytest.mark.parametrize("with_bias", [False, True])
def test_relu_backward(ops, with_bias):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(3, 2, 5)) * 2
    x[np.abs(x) < 1e-3] = 0.5  # keep finite differences away from the kink at 0
    b = rng.normal(size=5) if with_bias else None
    dy = rng.normal(size=x.shape)
    f = lambda: float((ops.relu_forward(x, b)[0] * dy).sum())  # noqa: E731
    y, cache = ops.relu_forward(x, b)
    np.testing.assert_array_equal(y, np.maximum(x + (0 if b is None else b), 0))
    dx, db = ops.relu_backward(dy, cache)
    check(dx, numerical_grad(f, x))
    if with_bias:
        check(db, numerical_grad(f, b))
    else:
        assert db is None


def test_embedding_backward(ops):
    rng = np.random.default_rng(6)
    w = rng.normal(size=(7, 3))
    ids = np.array([[1, 1, 6], [0, 1, 3]])
    dout = rng.normal(size=(2, 3, 3))
    f = lambda: float((ops.embedding_forward(w, ids)[0] * dout).sum())  # noqa: E731
    out, cache = ops.embedding_forward(w, ids)
    np.testing.assert_array_equal(out, w[ids])
    check(ops.embedding_backward(dout, cache), numerical_grad(f, w))
    acc = np.ones_like(w)
    ops.embedding_backward(dout, cache, dweight=acc)  # accumulates in place
    check(acc - 1.0, numerical_grad(f, w))


def test_adamw_matches_formula(ops):
    rng = np.random.default_rng(7)
    p, g = rng.normal(size=50), rng.normal(size=50)
    m, v = rng.normal(size=50) * 0.1, rng.random(50) * 0.1
    p0, m0, v0 = p.copy(), m.copy(), v.copy()
    lr, b1, b2, eps, wd, t = 1e-2, 0.9, 0.95, 1e-8, 0.1, 3
    ops.adamw_update(p, g, m, v, lr=lr, beta1=b1, beta2=b2, eps=eps, weight_decay=wd, step=t)
    m1 = b1 * m0 + (1 - b1) * g
    v1 = b2 * v0 + (1 - b2) * g * g
    p1 = p0 * (1 - lr * wd) - lr * (m1 / (1 - b1 ** t)) / (np.sqrt(v1 / (1 - b2 ** t)) + eps)
    np.testing.assert_allclose(m, m1, rtol=1e-12)
    np.testing.assert_allclose(v, v1, rtol=1e-12)
    np.testing.assert_allclose(p, p1, rtol=1e-12)
