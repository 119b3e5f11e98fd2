"""The matrix products of the kernel interface: the linear pair and `matmul`, on every backend."""

import numpy as np
import pytest
from conftest import numerical_grad

from fastformer import FastformerError


def test_linear_forward_writes_into_out(ops):
    rng = np.random.default_rng(4)
    x, w, b = rng.normal(size=(2, 3, 4)), rng.normal(size=(4, 5)), rng.normal(size=5)
    out = np.full((2, 3, 5), np.nan)
    y, _ = ops.linear_forward(x, w, b, out=out)
    np.testing.assert_allclose(out, x @ w + b, rtol=1e-12)
    assert np.shares_memory(y, out)
    with pytest.raises(FastformerError, match="out must be a C-contiguous array of 30 elements"):
        ops.linear_forward(x, w, b, out=np.zeros((5, 6)).T)


@pytest.mark.parametrize("transposed", [False, True])
def test_linear_backward_against_finite_differences(ops, transposed):
    """dx, dweight and dbias of x @ W + b in float64; W a (Cout, Cin) array read transposed as
    torch.nn.Linear stores it, its gradient written through the same transposed view."""
    rng = np.random.default_rng(5)
    x, b = rng.normal(size=(2, 3, 4)), rng.normal(size=5)
    stored = rng.normal(size=(5, 4) if transposed else (4, 5))
    w = stored.T if transposed else stored
    dy = rng.normal(size=(2, 3, 5))
    y, cache = ops.linear_forward(x, w, b)
    grad_stored, db = np.zeros_like(stored), np.zeros(5)
    dx = ops.linear_backward(dy, cache, grad_stored.T if transposed else grad_stored, db)

    def f():
        return float((ops.linear_forward(x, stored.T if transposed else stored, b)[0] * dy).sum())

    np.testing.assert_allclose(dx, numerical_grad(f, x), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(grad_stored, numerical_grad(f, stored), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(db, numerical_grad(f, b), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_precision_is_the_arrays_own_or_refused(ops, dtype):
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(3, 4)).astype(dtype), rng.normal(size=(4, 2)).astype(dtype)
    own = np.dtype(dtype).name
    np.testing.assert_array_equal(ops.matmul(a, b, precision=own), ops.matmul(a, b))
    y, cache = ops.linear_forward(a, b, precision=own)
    assert cache.precision == own
    with pytest.raises(FastformerError, match=f"precision must be None or one of '{own}'.* for {own} arrays on "
                                              f"the {ops.name} backend, got 'float16'"):
        ops.linear_forward(a, b, precision="float16")


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_matmul_epilogue_adds_bias_and_accumulates(ops, precision):
    """out = a @ b + bias, and out += a @ b + bias, rounded as out + ((a @ b) + bias) on every
    backend and precision; whole 8 x 32 tiles of the bf16 kernel and cut ones both."""
    if precision not in ops.matmul_precisions["float32"]:
        pytest.skip(f"{precision} is not offered by the {ops.name} backend on this CPU")
    rng = np.random.default_rng(7)
    a, b, bias = (rng.normal(size=s).astype(np.float32) for s in ((37, 20), (20, 70), (70,)))
    product = ops.matmul(a, b, precision=precision)
    y = ops.matmul(a, b, precision=precision, bias=bias)
    np.testing.assert_array_equal(y, product + bias)
    start = rng.normal(size=(37, 70)).astype(np.float32)
    out = start.copy()
    got = ops.matmul(a, b, out=out, precision=precision, bias=bias, accumulate=True)
    assert got is out
    np.testing.assert_array_equal(out, start + (product + bias))
    out = start.copy()
    ops.matmul(a, b, out=out, precision=precision, accumulate=True)
    np.testing.assert_array_equal(out, start + product)
