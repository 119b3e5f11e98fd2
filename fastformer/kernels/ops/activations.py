"""GELU (the tanh form of GPT-2, or the exact erf form of torch) and ReLU, each with the bias of
the linear layer before it fused in: y = act(x + bias). The checks, the NumPy reference, the
Numba kernels.

What a forward keeps, on every backend: GELU keeps x and the bias (zeros when there is none)
rather than u = x + bias (the backward recomputes u), ReLU its output (y > 0 exactly where
x + bias > 0). The bf16 GEMM that makes u with the GELU in its epilogue (matmul.py,
`linear_gelu_forward`) keeps u and a zero bias instead: the same u for the backward. Shapes:
x (..., C), bias (C,).
"""

import math
from collections import namedtuple

import numpy as np

from fastformer.errors import FastformerError, check_bool
from fastformer.kernels._jit import ROW_CHUNKS, exp, inline, kernel, prange, rows, sized
from fastformer.kernels.checks import (
    as_float_array,
    as_vector,
    cache_array,
    cache_fields,
    cache_root,
    check_grad,
    kernel_array,
    quiet,
)

GELU_FORMS = ("tanh", "none")
GeluCache = namedtuple("GeluCache", "x bias approximate has_bias")
ReluCache = namedtuple("ReluCache", "y has_bias")
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_erf = np.frompyfunc(math.erf, 1, 1)  # exact erf, element by element (NumPy has no erf ufunc)


# ------------------------------------------------------------------- checks
def activation_inputs(x, bias):
    """(x, bias or None) of y = act(x + bias)."""
    x = as_float_array(x, "x")
    return x, None if bias is None else as_vector(bias, "bias", x.shape[-1], x.dtype)


def _gelu_form(name, approximate):
    """GELU's form, "tanh" or "none"; anything else (an array too) is refused."""
    if not (isinstance(approximate, str) and approximate in GELU_FORMS):
        raise FastformerError(f"{name} must be one of {', '.join(GELU_FORMS)}, got {approximate!r}")
    return approximate


def gelu_inputs(x, bias, approximate):
    """(x, bias or None) of y = gelu(x + bias) in the form `approximate`."""
    _gelu_form("approximate", approximate)
    return activation_inputs(x, bias)


def gelu_grad_inputs(dy, cache):
    """(dy, cache) of gelu_backward; the cache (x, bias, approximate, has_bias) holds a bias of
    shape (C,) even when the forward had none (then zeros)."""
    forward = "gelu_forward"
    x, bias, approximate, has_bias = cache_fields(cache, forward, "x bias approximate has_bias")
    x = kernel_array(cache_root(x, "x", forward))
    bias = kernel_array(cache_array(bias, "bias", forward, x.shape[-1:], x.dtype))
    _gelu_form(f"approximate in the cache of {forward}", approximate)
    has_bias = check_bool(f"has_bias in the cache of {forward}", has_bias)
    return check_grad(dy, "dy", x.shape, x.dtype), (x, bias, approximate, has_bias)


def relu_grad_inputs(dy, cache):
    """(dy, cache) of relu_backward; the cache is (y, has_bias)."""
    y, has_bias = cache_fields(cache, "relu_forward", "y has_bias")
    y = kernel_array(cache_root(y, "y", "relu_forward"))
    has_bias = check_bool("has_bias in the cache of relu_forward", has_bias)
    return check_grad(dy, "dy", y.shape, y.dtype), (y, has_bias)


# ---------------------------------------------------------------- reference
@quiet
def gelu_forward(ops, x, bias=None, approximate="tanh"):
    """y = gelu(x + bias). `approximate` is "tanh" (GPT-2) or "none" (exact erf, as
    torch.nn.functional.gelu). Returns (y, GeluCache)."""
    x, bias = gelu_inputs(x, bias, approximate)
    b = np.zeros(x.shape[-1], x.dtype) if bias is None else bias
    u = x + b
    if approximate == "tanh":
        y = 0.5 * u * (1.0 + np.tanh(_SQRT_2_OVER_PI * (u + 0.044715 * u ** 3)))
    else:
        y = 0.5 * u * (1.0 + _erf(u / math.sqrt(2.0)).astype(u.dtype))
    return y.astype(u.dtype), GeluCache(x, b, approximate, bias is not None)


@quiet
def gelu_backward(ops, dy, cache):
    """Returns (dx, dbias); dbias is None when the forward had no bias."""
    dy, (x, b, approximate, has_bias) = gelu_grad_inputs(dy, cache)
    u = x + b
    if approximate == "tanh":
        # forward: y = 0.5 * u * (1 + tanh(a * (u + 0.044715 u^3)))
        th = np.tanh(_SQRT_2_OVER_PI * (u + 0.044715 * u ** 3))
        dth = (1.0 - th * th) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * u * u)
        dydu = 0.5 * (1.0 + th) + 0.5 * u * dth
    else:
        # forward: y = 0.5 * u * (1 + erf(u / sqrt(2)))
        cdf = 0.5 * (1.0 + _erf(u / math.sqrt(2.0)).astype(u.dtype))
        dydu = cdf + u * np.exp(-0.5 * u * u) / math.sqrt(2.0 * math.pi)
    dx = (dy * dydu).astype(u.dtype)
    dbias = dx.reshape(-1, u.shape[-1]).sum(axis=0) if has_bias else None
    return dx, dbias


@quiet
def relu_forward(ops, x, bias=None):
    """y = max(x + bias, 0), the signature of `gelu_forward` without its form. Returns (y, ReluCache)."""
    u, bias = activation_inputs(x, bias)
    if bias is not None:
        u = u + bias
    y = np.maximum(u, 0).astype(u.dtype)
    return y, ReluCache(y, bias is not None)


@quiet
def relu_backward(ops, dy, cache):
    """Returns (dx, dbias); dbias is None when the forward had no bias."""
    dy, (y, has_bias) = relu_grad_inputs(dy, cache)
    # forward: y = max(u, 0) with u = x + bias  ->  dx = dy where u > 0, dbias = sum over rows of dx
    dx = np.where(y > 0, dy, 0).astype(dy.dtype)
    return dx, (dx.reshape(-1, dx.shape[-1]).sum(axis=0) if has_bias else None)


# -------------------------------------------------------------------- Numba
@inline
def _half_one_plus_tanh(z):
    """(1 + tanh z) / 2 = sigmoid(2 z), from e = exp(-2|z|) <= 1: no cancellation when
    tanh z is near -1 (where 1 + tanh z in float32 loses every digit), no overflow."""
    F = type(z)
    e = exp(F(-2.0) * abs(z))
    r = F(1.0) / (F(1.0) + e)
    pos = F(z >= F(0.0))  # a select, so the loop still vectorises
    return r * (pos + (F(1.0) - pos) * e)


@inline
def _gelu(u, exact):
    F = type(u)
    if exact:  # 0.5 u (1 + erf(u / sqrt 2))
        return F(0.5) * u * (F(1.0) + math.erf(u * F(_INV_SQRT_2)))
    # 0.5 u (1 + tanh(a (u + 0.044715 u^3)))
    return u * _half_one_plus_tanh(F(_SQRT_2_OVER_PI) * (u + F(0.044715) * u * u * u))


@inline
def _gelu_grad(u, exact):
    F = type(u)
    if exact:  # forward: y = 0.5 u (1 + erf(u / sqrt 2))
        cdf = F(0.5) * (F(1.0) + math.erf(u * F(_INV_SQRT_2)))
        return cdf + u * math.exp(F(-0.5) * u * u) * F(_INV_SQRT_2PI)
    # forward: y = u s with s = (1 + tanh z) / 2, z = a (u + 0.044715 u^3)
    #   dy/du = s + u ds/dz dz/du,  ds/dz = (1 - tanh^2 z) / 2 = 2 s (1 - s)
    s = _half_one_plus_tanh(F(_SQRT_2_OVER_PI) * (u + F(0.044715) * u * u * u))
    dz = F(_SQRT_2_OVER_PI) * (F(1.0) + F(3.0 * 0.044715) * u * u)
    return s + u * F(2.0) * s * (F(1.0) - s) * dz


@kernel("void(R[:, ::1], R[::1], boolean, F[:, ::1])", serial_twin=True)
def _gelu_fwd(x, bias, exact, y):
    N, C = x.shape
    for n in prange(N):
        for c in range(C):
            y[n, c] = _gelu(x[n, c] + bias[c], exact)


@kernel("void(R[:, ::1], R[:, ::1], R[::1], boolean, F[:, ::1], F[:, ::1])")
def _gelu_bwd(dy, x, bias, exact, dx, db_part):
    # forward: y = gelu(u) with u = x + bias  ->  dx = dy * gelu'(u), dbias = sum over rows of dx
    N, C = x.shape
    P = db_part.shape[0]
    F = x.dtype.type
    for p in prange(P):
        for c in range(C):
            db_part[p, c] = F(0.0)
        for n in range(p * N // P, (p + 1) * N // P):
            for c in range(C):
                g = dy[n, c] * _gelu_grad(x[n, c] + bias[c], exact)
                dx[n, c] = g
                db_part[p, c] += g


@kernel("void(R[:, ::1], R[::1], F[:, ::1])", serial_twin=True)
def _relu_fwd(x, bias, y):
    N, C = x.shape
    F = x.dtype.type
    for n in prange(N):
        for c in range(C):
            y[n, c] = max(x[n, c] + bias[c], F(0.0))


@kernel("void(R[:, ::1], R[:, ::1], F[:, ::1], F[:, ::1])")
def _relu_bwd(dy, y, dx, db_part):
    # forward: y = max(u, 0) with u = x + bias  ->  dx = dy where y > 0, dbias = sum over rows of dx
    N, C = y.shape
    P = db_part.shape[0]
    F = y.dtype.type
    for p in prange(P):
        for c in range(C):
            db_part[p, c] = F(0.0)
        for n in range(p * N // P, (p + 1) * N // P):
            for c in range(C):
                g = dy[n, c] if y[n, c] > F(0.0) else F(0.0)
                dx[n, c] = g
                db_part[p, c] += g


def _bias_activation_backward(backward, dy, saved, args, has_bias):
    """(dx, dbias or None) of y = act(x + bias) from `backward`(dy, saved, *args, dx, db_part),
    `saved` being the array the forward kept (shaped like x, not empty), dy checked against it,
    dbias summed over row chunks."""
    N, C = saved.size // saved.shape[-1], saved.shape[-1]
    dx = np.empty_like(saved)
    db_part = np.empty((min(N, ROW_CHUNKS), C), saved.dtype)
    backward(rows(dy), rows(saved), *args, rows(dx), db_part)
    return dx, (db_part.sum(axis=0) if has_bias else None)


def gelu_forward_numba(ops, x, bias=None, approximate="tanh"):
    x, bias = gelu_inputs(x, bias, approximate)
    if x.size == 0:
        return gelu_forward(ops, x, bias, approximate)
    b = np.zeros(x.shape[-1], x.dtype) if bias is None else bias
    y = np.empty_like(x)
    sized(_gelu_fwd, x.size)(rows(x), b, approximate == "none", rows(y))
    return y, GeluCache(x, b, approximate, bias is not None)


def gelu_backward_numba(ops, dy, cache):
    dy, (x, b, approximate, has_bias) = gelu_grad_inputs(dy, cache)
    if x.size == 0:
        return gelu_backward(ops, dy, cache)
    return _bias_activation_backward(_gelu_bwd, dy, x, (b, approximate == "none"), has_bias)


def relu_forward_numba(ops, x, bias=None):
    x, bias = activation_inputs(x, bias)
    if x.size == 0:
        return relu_forward(ops, x, bias)
    b = np.zeros(x.shape[-1], x.dtype) if bias is None else bias
    y = np.empty_like(x)
    sized(_relu_fwd, x.size)(rows(x), b, rows(y))
    return y, ReluCache(y, bias is not None)  # y > 0 exactly where x + bias > 0


def relu_backward_numba(ops, dy, cache):
    dy, (y, has_bias) = relu_grad_inputs(dy, cache)
    if y.size == 0:
        return relu_backward(ops, dy, cache)
    return _bias_activation_backward(_relu_bwd, dy, y, (), has_bias)
