"""LayerNorm over the last axis, alone and after a residual sum (pre-LN's `s = x + branch; y =
layernorm(s)`): its checks, the NumPy reference, the Numba kernels.

Shapes: x (..., C), read as N rows of C; weight and bias (C,); the cache (x, weight, mean, rstd)
with mean and rstd shaped as x without its last axis.
"""

import math

import numpy as np

from fastformer.errors import FastformerError
from fastformer.kernels._jit import ROW_CHUNKS, inline, kernel, prange, rows, sized
from fastformer.kernels.checks import (
    as_float_array,
    as_rows,
    as_vector,
    cache_array,
    cache_fields,
    cache_root,
    check_eps,
    check_grad,
    kernel_array,
    quiet,
)


# ------------------------------------------------------------------- checks
def layernorm_inputs(x, weight, bias, eps):
    """(x, weight, bias) of a LayerNorm over the last axis C of x."""
    x = as_rows(x, "x")
    check_eps(eps)
    return x, as_vector(weight, "weight", x.shape[-1], x.dtype), as_vector(bias, "bias", x.shape[-1], x.dtype)


def residual_layernorm_inputs(x, branch, weight, bias, eps):
    """(x, branch, weight, bias) of `s = x + branch; y = layernorm(s)`: branch shaped as x."""
    x = as_rows(x, "x")
    branch = as_float_array(branch, "branch", x.dtype)
    if branch.shape != x.shape:
        raise FastformerError(f"branch must have the shape of x {x.shape}, got {branch.shape}")
    check_eps(eps)
    return x, branch, as_vector(weight, "weight", x.shape[-1], x.dtype), as_vector(bias, "bias", x.shape[-1], x.dtype)


def layernorm_cache(cache, forward="layernorm_forward"):
    """The cache (x, weight, mean, rstd) of a LayerNorm over the last axis C of x: weight (C,),
    mean and rstd shaped as x without its last axis, one dtype, all C-contiguous."""
    x, weight, mean, rstd = cache_fields(cache, forward, "x weight mean rstd")
    x = kernel_array(cache_root(x, "x", forward))
    N = x.shape[:-1]
    return (x, kernel_array(cache_array(weight, "weight", forward, x.shape[-1:], x.dtype)),
            kernel_array(cache_array(mean, "mean", forward, N, x.dtype)),
            kernel_array(cache_array(rstd, "rstd", forward, N, x.dtype)))


def layernorm_grad_inputs(dy, cache):
    """(dy, cache) of the LayerNorm backward."""
    cache = layernorm_cache(cache)
    return check_grad(dy, "dy", cache[0].shape, cache[0].dtype), cache


def residual_layernorm_grads(dy, ds, cache):
    """(dy, ds or None, cache) of the residual LayerNorm's backward, dy and ds shaped as its output."""
    cache = layernorm_cache(cache, "residual_layernorm_forward")
    x = cache[0]
    dy = check_grad(dy, "dy", x.shape, x.dtype)
    return dy, None if ds is None else check_grad(ds, "ds", x.shape, x.dtype), cache


# ---------------------------------------------------------------- reference
def layernorm(x, weight, bias, eps):
    """LayerNorm of checked inputs: (y, cache)."""
    mean = x.mean(axis=-1, keepdims=True)
    xc = x - mean
    var = (xc * xc).mean(axis=-1, keepdims=True)
    rstd = (1.0 / np.sqrt(var + eps)).astype(x.dtype)
    y = xc * rstd * weight + bias
    return y, (x, weight, mean[..., 0], rstd[..., 0])


def _layernorm_grads(dy, cache):
    """(dx, dweight, dbias) of LayerNorm for a checked dy."""
    # forward: y = (x - mean) * rstd * weight + bias
    x, weight, mean, rstd = cache
    C = x.shape[-1]
    xhat = (x - mean[..., None]) * rstd[..., None]
    dbias = dy.reshape(-1, C).sum(axis=0)
    dweight = (dy * xhat).reshape(-1, C).sum(axis=0)
    dxhat = dy * weight
    dx = (dxhat - dxhat.mean(axis=-1, keepdims=True)
          - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True)) * rstd[..., None]
    return dx, dweight, dbias


@quiet
def layernorm_forward(ops, x, weight, bias, eps=1e-5):
    """LayerNorm over the last axis C. Returns (y, cache) with cache = (x, weight, mean, rstd)."""
    return layernorm(*layernorm_inputs(x, weight, bias, eps), eps)


@quiet
def layernorm_backward(ops, dy, cache):
    """Returns (dx, dweight, dbias)."""
    return _layernorm_grads(*layernorm_grad_inputs(dy, cache))


@quiet
def residual_layernorm_forward(ops, x, branch, weight, bias, eps=1e-5):
    """The pre-LN step `s = x + branch; y = layernorm(s)`. Returns ((s, y), cache)."""
    x, branch, weight, bias = residual_layernorm_inputs(x, branch, weight, bias, eps)
    s = x + branch
    y, cache = layernorm(s, weight, bias, eps)
    return (s, y), cache


@quiet
def residual_layernorm_backward(ops, dy, ds, cache):
    """`dy` is the gradient of y, `ds` (or None) the gradient reaching s along the residual
    stream. Returns (dsum, dweight, dbias); dsum is the gradient of both x and branch."""
    # forward: s = x + branch; y = layernorm(s)
    dy, ds, cache = residual_layernorm_grads(dy, ds, cache)
    dsum, dweight, dbias = _layernorm_grads(dy, cache)
    if ds is not None:
        dsum += ds
    return dsum, dweight, dbias


# -------------------------------------------------------------------- Numba
@inline
def normalize_row(s, w, b, eps, y):
    """y = (s - mean) * rstd * w + b for one row s (C,) that sits in cache; returns (mean, rstd)."""
    C = s.shape[0]
    F = s.dtype.type
    total = F(0.0)
    for c in range(C):
        total += s[c]
    mean = total / F(C)
    var = F(0.0)
    for c in range(C):
        d = s[c] - mean
        var += d * d
    # not 1 / sqrt(...): with "arcp" LLVM computes that from a float32 estimate whose Newton step
    # gives NaN where the variance is 0 or infinite (the reference gives inf and 0)
    rstd = math.sqrt(F(1.0) / (var / F(C) + eps))
    for c in range(C):
        y[c] = (s[c] - mean) * rstd * w[c] + b[c]
    return mean, rstd


@kernel("void(R[:, ::1], R[::1], R[::1], F, F[:, ::1], F[::1], F[::1])", serial_twin=True)
def _layernorm_fwd(x, w, b, eps, y, mean, rstd):
    for n in prange(x.shape[0]):
        mean[n], rstd[n] = normalize_row(x[n], w, b, eps, y[n])


@kernel("void(R[:, ::1], R[:, ::1], R[::1], R[::1], F, F[:, ::1], F[:, ::1], F[::1], F[::1])", serial_twin=True)
def _residual_layernorm_fwd(x, branch, w, b, eps, s, y, mean, rstd):
    N, C = x.shape
    for n in prange(N):
        for c in range(C):
            s[n, c] = x[n, c] + branch[n, c]
        mean[n], rstd[n] = normalize_row(s[n], w, b, eps, y[n])


@kernel("void(R[:, ::1], R[:, ::1], R[::1], R[::1], R[::1], R[:, ::1], boolean, "
        "F[:, ::1], F[:, ::1], F[:, ::1])")
def _layernorm_bwd(dy, x, w, mean, rstd, ds, add_ds, dx, dw_part, db_part):
    # forward: y = xhat * w + b with xhat = (x - mean) * rstd
    #   dx = (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) * rstd  (+ ds, the residual)
    N, C = x.shape
    P = dw_part.shape[0]
    F = x.dtype.type
    for p in prange(P):
        for c in range(C):
            dw_part[p, c] = F(0.0)
            db_part[p, c] = F(0.0)
        for n in range(p * N // P, (p + 1) * N // P):
            mu, rs = mean[n], rstd[n]
            g_mean = F(0.0)
            gx_mean = F(0.0)
            for c in range(C):
                xhat = (x[n, c] - mu) * rs
                g = dy[n, c] * w[c]
                dx[n, c] = g  # dxhat, kept so both loops use the same rounded value
                g_mean += g
                gx_mean += g * xhat
                dw_part[p, c] += dy[n, c] * xhat
                db_part[p, c] += dy[n, c]
            g_mean /= F(C)
            gx_mean /= F(C)
            for c in range(C):
                xhat = (x[n, c] - mu) * rs
                d = (dx[n, c] - g_mean - xhat * gx_mean) * rs
                dx[n, c] = d + ds[n, c] if add_ds else d


def layernorm_forward_numba(ops, x, weight, bias, eps=1e-5):
    x, weight, bias = layernorm_inputs(x, weight, bias, eps)
    if x.size == 0:
        return layernorm_forward(ops, x, weight, bias, eps)
    y = np.empty_like(x)
    mean = np.empty(x.shape[:-1], x.dtype)
    rstd = np.empty(x.shape[:-1], x.dtype)
    sized(_layernorm_fwd, x.size)(rows(x), weight, bias, x.dtype.type(eps), rows(y), mean.reshape(-1),
                                  rstd.reshape(-1))
    return y, (x, weight, mean, rstd)


def layernorm_backward_numba(ops, dy, cache):
    dy, cache = layernorm_grad_inputs(dy, cache)
    return _layernorm_backward(ops, dy, None, cache)


def residual_layernorm_forward_numba(ops, x, branch, weight, bias, eps=1e-5):
    x, branch, weight, bias = residual_layernorm_inputs(x, branch, weight, bias, eps)
    if x.size == 0:
        return residual_layernorm_forward(ops, x, branch, weight, bias, eps)
    s, y = np.empty_like(x), np.empty_like(x)
    mean = np.empty(x.shape[:-1], x.dtype)
    rstd = np.empty(x.shape[:-1], x.dtype)
    sized(_residual_layernorm_fwd, x.size)(rows(x), rows(branch), weight, bias, x.dtype.type(eps),
                                           rows(s), rows(y), mean.reshape(-1), rstd.reshape(-1))
    return (s, y), (s, weight, mean, rstd)


def residual_layernorm_backward_numba(ops, dy, ds, cache):
    return _layernorm_backward(ops, *residual_layernorm_grads(dy, ds, cache))


def _layernorm_backward(ops, dy, ds, cache):
    """dx of layernorm, plus `ds` (the residual stream's gradient) when given, in one pass;
    dy, ds and the cache as the checks return them."""
    x, weight, mean, rstd = cache
    if x.size == 0:
        dx, dw, db = _layernorm_grads(dy, cache)
        return (dx if ds is None else dx + ds), dw, db
    N, C = x.size // x.shape[-1], x.shape[-1]
    P = min(N, ROW_CHUNKS)
    dx = np.empty_like(x)
    dw_part = np.empty((P, C), x.dtype)
    db_part = np.empty((P, C), x.dtype)
    _layernorm_bwd(rows(dy), rows(x), weight, mean.reshape(-1), rstd.reshape(-1), rows(dy if ds is None else ds),
                   ds is not None, rows(dx), dw_part, db_part)
    return dx, dw_part.sum(axis=0), db_part.sum(axis=0)
