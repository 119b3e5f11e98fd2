"""Causal self-attention of new tokens over a key/value cache, for decoding: the keys and values
of the new tokens are written into the cache, then each new query attends to every cached key up
to its own position. Its checks, the NumPy reference and the Numba entry point, which runs the
row kernels of attention.py on the cache in place. Inference only: there is no backward.

Shapes: qkv (B, Tn, 3C) of the new tokens, k_cache and v_cache (B, H, Tmax, hs),
key_padding_mask (B, >= start + Tn) True at padding.
"""

import numpy as np

from fastformer.errors import FastformerError, is_int
from fastformer.kernels.checks import as_float_array, describe, dtype_name, quiet
from fastformer.kernels.ops.attention import _attention, _attention_forward, _attention_scale, check_qkv


# ------------------------------------------------------------------- checks
def cached_attention_inputs(qkv, k_cache, v_cache, start, n_heads, key_padding_mask, scale):
    """The inputs of `attention_cached`: Tn new tokens' qkv (B, Tn, 3C), writeable caches
    (B, H, Tmax, hs) of qkv's dtype, `start` + Tn <= Tmax, and a key_padding_mask (B, >= start + Tn).
    Returns (qkv, (B, Tn, C, hs), end = start + Tn, key_padding_mask[:, :end] as bool or None, scale)."""
    qkv = as_float_array(qkv, "qkv")
    B, T, C, hs = dims = check_qkv(qkv, n_heads)
    Tmax = k_cache.shape[2] if isinstance(k_cache, np.ndarray) and k_cache.ndim == 4 else -1
    expected = (B, n_heads, Tmax, hs)
    if not all(isinstance(c, np.ndarray) and c.shape == expected and c.dtype == qkv.dtype and c.flags.writeable
               for c in (k_cache, v_cache)):
        raise FastformerError(f"k_cache and v_cache must be writeable {qkv.dtype} arrays (B, H, Tmax, hs) = "
                              f"{expected}, got {describe(k_cache)} and {describe(v_cache)}")
    if not is_int(start):
        raise FastformerError(f"start must be an integer, got {start!r}")
    end = start + T
    if not 0 <= start <= end <= Tmax:
        raise FastformerError(f"{T} new tokens at position {start} do not fit a cache of {Tmax} positions")
    if end == 0:
        raise FastformerError("attention needs at least one key, got no new token and start=0")
    if key_padding_mask is not None:
        key_padding_mask = np.asarray(key_padding_mask, dtype=bool)
        if key_padding_mask.ndim != 2 or key_padding_mask.shape[0] != B or key_padding_mask.shape[1] < end:
            raise FastformerError(f"key_padding_mask must have shape (B, >= start + Tn) = ({B}, >= {end}), "
                                  f"got {key_padding_mask.shape}")
        key_padding_mask = np.ascontiguousarray(key_padding_mask[:, :end])
    return qkv, dims, int(end), key_padding_mask, _attention_scale(scale, hs)


# ---------------------------------------------------------------- reference
def write_kv_cache(qkv, k_cache, v_cache, start, n_heads):
    """Split the fused projection of Tn new tokens and store their keys and values in the caches
    (B, H, Tmax, hs) at [start, start + Tn). Returns the queries, a (B, H, Tn, hs) view.
    The inputs are those `cached_attention_inputs` accepted."""
    B, T, C3 = qkv.shape
    q, k, v = qkv.reshape(B, T, 3, n_heads, C3 // (3 * n_heads)).transpose(2, 0, 3, 1, 4)  # each (B, H, Tn, hs)
    k_cache[:, :, start:start + T] = k
    v_cache[:, :, start:start + T] = v
    return q


@quiet
def attention_cached(ops, qkv, k_cache, v_cache, start, n_heads, key_padding_mask=None, scale=None):
    """Causal self-attention of Tn new tokens over a key/value cache, for decoding.

    qkv (B, Tn, 3C) is the fused projection of the tokens at positions start .. start+Tn-1.
    Their keys and values are written into k_cache, v_cache (B, H, Tmax, hs) at
    [start, start + Tn); then new query i attends to the cached keys [0, start + i].
    `key_padding_mask` (B, >= start + Tn) is True at padding. Returns out (B, Tn, C).
    Inference only: there is no backward.
    """
    qkv, (B, T, C, hs), end, kpm, scale = cached_attention_inputs(qkv, k_cache, v_cache, start, n_heads,
                                                                  key_padding_mask, scale)
    q = write_kv_cache(qkv, k_cache, v_cache, start, n_heads)
    k, v = (np.ascontiguousarray(c[:, :, :end]) for c in (k_cache, v_cache))
    out, _ = _attention_forward(np.ascontiguousarray(q), k, v, True, kpm, scale, dtype_name(q.dtype))
    return out.transpose(0, 2, 1, 3).reshape(B, T, C)


# -------------------------------------------------------------------- Numba
def attention_cached_numba(ops, qkv, k_cache, v_cache, start, n_heads, key_padding_mask=None, scale=None):
    qkv, (B, T, C, hs), end, kpm, scale = cached_attention_inputs(qkv, k_cache, v_cache, start, n_heads,
                                                                  key_padding_mask, scale)
    if not (k_cache.flags.aligned and v_cache.flags.aligned):  # the kernel reads them in place
        return attention_cached(ops, qkv, k_cache, v_cache, start, n_heads, kpm, scale)
    q = write_kv_cache(qkv, k_cache, v_cache, start, n_heads)
    k, v = k_cache[:, :, :end], v_cache[:, :, :end]  # strided views: the kernel reads the cache in place
    out = np.empty((B, T, C), qkv.dtype)
    _attention(ops, q, k, v, True, kpm, scale, dtype_name(q.dtype),
               out.reshape(B, T, n_heads, hs).transpose(0, 2, 1, 3))
    return out
