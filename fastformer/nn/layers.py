"""Layers built from BLAS matmuls and NumPy reshapes, shared by every model.

The memory-bound math (softmax, layernorm, attention, GELU, ...) lives in `fastformer.kernels`;
what stays here is the linear layer (one GEMM on a 2-D view), dropout, and moving attention
heads between (B, T, C) and (B, H, T, hs). Backward functions write weight gradients straight
into the caller's gradient views, so a step allocates no gradient arrays.
"""

import numpy as np

from fastformer.errors import FastformerError


def linear_forward(x, weight, bias=None, out=None):
    """out = x @ weight + bias, with x (..., Cin), weight (Cin, Cout) as in GPT-2's Conv1D.
    `out`, when given, is a C-contiguous (..., Cout) array to write the result into (a buffer
    kept across steps). Returns (out (..., Cout), cache)."""
    x2 = x.reshape(-1, x.shape[-1])  # (N, Cin)
    if out is not None and not (out.flags.c_contiguous and out.size == x2.shape[0] * weight.shape[1]):
        raise FastformerError(f"out must be a C-contiguous array of {x2.shape[0] * weight.shape[1]} elements "
                         f"{(*x.shape[:-1], weight.shape[1])}, got shape {out.shape}")
    y = np.matmul(x2, weight, out=None if out is None else out.reshape(x2.shape[0], weight.shape[1]))  # (N, Cout)
    if bias is not None:
        y += bias
    return y.reshape(*x.shape[:-1], weight.shape[1]), (x2, weight)


def linear_backward(dout, cache, dweight, dbias=None):
    """Writes dweight (and dbias) in place; returns dx shaped like the forward's x."""
    # forward: out = x @ weight + bias
    x2, weight = cache
    d2 = dout.reshape(-1, weight.shape[1])  # (N, Cout)
    np.matmul(x2.T, d2, out=dweight)
    if dbias is not None:
        d2.sum(axis=0, out=dbias)
    return np.matmul(d2, weight.T).reshape(*dout.shape[:-1], weight.shape[0])


def dropout_forward(x, p, rng):
    """Inverted dropout with probability p drawn from the generator `rng`; identity when p is 0.
    Returns (out, mask) with mask None when nothing was dropped."""
    if p == 0.0:
        return x, None
    mask = (rng.random(x.shape, dtype=x.dtype) >= p).astype(x.dtype) / x.dtype.type(1.0 - p)
    return x * mask, mask


def dropout_backward(dout, mask):
    # forward: out = x * mask
    return dout if mask is None else dout * mask


def split_heads(x, n_parts, H):
    """(B, T, n_parts * C) -> (n_parts, B, H, T, hs), contiguous: fused QKV into heads."""
    B, T, C3 = x.shape
    hs = C3 // (n_parts * H)
    return np.ascontiguousarray(x.reshape(B, T, n_parts, H, hs).transpose(2, 0, 3, 1, 4))


def merge_heads(x):
    """(n_parts, B, H, T, hs) or (B, H, T, hs) -> (B, T, n_parts * H * hs): the inverse of split_heads."""
    if x.ndim == 4:
        x = x[None]
    n, B, H, T, hs = x.shape
    return np.ascontiguousarray(x.transpose(1, 3, 0, 2, 4)).reshape(B, T, n * H * hs)
