"""Dropout and the head reshapes, shared by every block.

The math of a layer, its matrix products included (`ops.linear_forward`, `ops.linear_backward`),
lives in `fastformer.kernels`; what stays here is dropout and moving attention heads between
(B, T, C) and (B, H, T, hs).
"""

import numpy as np


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
