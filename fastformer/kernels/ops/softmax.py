"""Softmax over the last axis: its checks, the NumPy reference, the Numba kernels.

-inf is a masked entry and gets exactly 0; a row that is all -inf gives zeros (not NaN); a row
holding a NaN or +inf gives a row of NaN. Shapes: x (..., C), read as N rows of C.
"""

import numpy as np

from fastformer.kernels._jit import exp, kernel, prange, row_max, rows
from fastformer.kernels.checks import as_rows, cache_root, check_grad, kernel_array, quiet


# ------------------------------------------------------------------- checks
def softmax_inputs(x):
    return as_rows(x, "x")


def softmax_grad_inputs(dy, cache):
    """(dy, y) of the softmax backward; the cache is the forward's output y."""
    y = kernel_array(cache_root(cache, "y", "softmax_forward"))
    return check_grad(dy, "dy", y.shape, y.dtype), y


# ---------------------------------------------------------------- reference
@quiet
def softmax_forward(ops, x):
    """Softmax over the last axis. Returns (y, cache); the cache is y."""
    x = softmax_inputs(x)
    m = x.max(axis=-1, keepdims=True)  # NaN when the row holds one: exp(x - m) is then NaN
    m = np.where(m == -np.inf, 0.0, m).astype(x.dtype)
    e = np.exp(x - m)
    s = e.sum(axis=-1, keepdims=True)
    y = e / np.where(s == 0, 1.0, s).astype(x.dtype)
    return y, y


@quiet
def softmax_backward(ops, dy, cache):
    """Returns dx."""
    # forward: y = exp(x - max) / sum(exp(x - max))
    dy, y = softmax_grad_inputs(dy, cache)
    return y * (dy - (dy * y).sum(axis=-1, keepdims=True))


# -------------------------------------------------------------------- Numba
@kernel("void(R[:, ::1], F[:, ::1])")
def _softmax_fwd(x, y):
    N, C = x.shape
    F = x.dtype.type
    for n in prange(N):
        m = row_max(x[n], C)  # +inf when the row holds one: exp(inf - inf) below is NaN
        if m == F(-np.inf):  # an all -inf row: every exp below is exactly 0
            m = F(0.0)
        s = F(0.0)
        for c in range(C):
            e = exp(x[n, c] - m)
            y[n, c] = e
            s += e
        inv = F(1.0) / s if s != F(0.0) else F(1.0)  # s is NaN when the row held a NaN or +inf
        for c in range(C):
            y[n, c] *= inv


@kernel("void(R[:, ::1], R[:, ::1], F[:, ::1])")
def _softmax_bwd(dy, y, dx):
    # forward: y = exp(x - max) / sum(exp(x - max))  ->  dx = y * (dy - sum(dy * y))
    N, C = y.shape
    F = y.dtype.type
    for n in prange(N):
        dot = F(0.0)
        for c in range(C):
            dot += dy[n, c] * y[n, c]
        for c in range(C):
            dx[n, c] = y[n, c] * (dy[n, c] - dot)


def softmax_forward_numba(ops, x):
    x = softmax_inputs(x)
    if x.size == 0:
        return softmax_forward(ops, x)
    y = np.empty_like(x)
    _softmax_fwd(rows(x), rows(y))
    return y, y


def softmax_backward_numba(ops, dy, cache):
    dy, y = softmax_grad_inputs(dy, cache)
    if y.size == 0:
        return softmax_backward(ops, dy, cache)
    dx = np.empty_like(y)
    _softmax_bwd(rows(dy), rows(y), rows(dx))
    return dx
