"""Embedding: a gather of rows, and its backward, a scatter-add into the weight's gradient (added
into a given buffer for tied weights). The checks, the NumPy reference, the Numba kernels.

Shapes: weight (V, C), ids (...) each in [0, V), out (..., C).
"""

import numpy as np

from fastformer.errors import FastformerError, is_int
from fastformer.kernels._jit import jit_writable, kernel, prange, sized
from fastformer.kernels.checks import (
    FLOAT_DTYPES,
    as_float_array,
    as_int_array,
    cache_fields,
    check_grad,
    check_index_range,
    describe,
)

COLUMN_BLOCK = 16  # columns per task in the scatter-add: one 64-byte cache line of float32


# ------------------------------------------------------------------- checks
def embedding_inputs(weight, ids):
    """(weight (V, C), ids int64 with every id in [0, V))."""
    weight = as_float_array(weight, "weight")
    if weight.ndim != 2:
        raise FastformerError(f"weight must have shape (V, C), got {weight.shape}")
    ids = as_int_array(ids, "ids")
    check_index_range(ids, "ids", weight.shape[0])
    return weight, ids


def embedding_grad_inputs(dout, cache, dweight):
    """(dout (*ids.shape, C), ids, shape, dtype) of the embedding's backward from the cache
    (ids, (V, C), dtype), every id in [0, V); `dweight`, when given, must be a writeable array of
    the weight's shape and dtype (any strides: it is added into)."""
    forward = "embedding_forward"
    ids, shape, dtype = cache_fields(cache, forward, "ids shape dtype")
    if not (isinstance(shape, tuple) and len(shape) == 2 and all(is_int(n) and n >= 0 for n in shape)):
        raise FastformerError(f"shape in the cache of {forward} must be the weight's shape (V, C), got {shape!r}")
    if not (isinstance(dtype, (np.dtype, type)) and dtype in FLOAT_DTYPES):
        raise FastformerError(f"dtype in the cache of {forward} must be the weight's dtype, float32 or float64, "
                              f"got {dtype!r}")
    shape, dtype = (int(shape[0]), int(shape[1])), np.dtype(dtype)
    ids = as_int_array(ids, f"ids in the cache of {forward}")
    check_index_range(ids, f"ids in the cache of {forward}", shape[0])
    dout = check_grad(dout, "dout", (*ids.shape, shape[1]), dtype)
    if dweight is not None and not (isinstance(dweight, np.ndarray) and dweight.shape == shape
                                    and dweight.dtype == dtype and dweight.flags.writeable):
        raise FastformerError(f"dweight must be a writeable {np.dtype(dtype)} array of the weight's shape "
                              f"{shape}, got {describe(dweight)}")
    return dout, ids, shape, dtype


# ---------------------------------------------------------------- reference
def embedding_forward(ops, weight, ids):
    """Gather rows: out[..., :] = weight[ids[...], :] for weight (V, C). Returns (out, cache)."""
    weight, ids = embedding_inputs(weight, ids)
    return weight[ids], (ids, weight.shape, weight.dtype)


def embedding_backward(ops, dout, cache, dweight=None):
    """Scatter-add of `dout` into the rows named by the forward's ids. When `dweight` is
    given the gradient is added into it in place (for tied weights); returns dweight."""
    # forward: out = weight[ids]
    dout, ids, shape, dtype = embedding_grad_inputs(dout, cache, dweight)
    if dweight is None:
        dweight = np.zeros(shape, dtype=dtype)
    np.add.at(dweight, ids.reshape(-1), dout.reshape(-1, shape[1]))
    return dweight


# -------------------------------------------------------------------- Numba
@kernel("void(R[:, ::1], readonly(int64)[::1], F[:, ::1])", serial_twin=True)
def _embedding_fwd(w, ids, out):
    N, C = out.shape
    for n in prange(N):
        row = ids[n]
        for c in range(C):
            out[n, c] = w[row, c]


@kernel("void(R[:, ::1], readonly(int64)[::1], F[:, ::1])")
def _embedding_bwd(dout, ids, dw):
    # forward: out[n] = w[ids[n]]  ->  dw[ids[n]] += dout[n]. Each task owns a block of columns
    # and walks every row in order, so repeated ids never race and the sum order is fixed.
    N, C = dout.shape
    for blk in prange((C + COLUMN_BLOCK - 1) // COLUMN_BLOCK):
        c0 = blk * COLUMN_BLOCK
        c1 = min(C, c0 + COLUMN_BLOCK)
        for n in range(N):
            row = ids[n]
            for c in range(c0, c1):
                dw[row, c] += dout[n, c]


def embedding_forward_numba(ops, weight, ids):
    weight, ids = embedding_inputs(weight, ids)
    C = weight.shape[1]
    out = np.empty((*ids.shape, C), weight.dtype)
    if ids.size and C:
        sized(_embedding_fwd, out.size)(weight, ids.reshape(-1), out.reshape(-1, C))
    return out, (ids, weight.shape, weight.dtype)


def embedding_backward_numba(ops, dout, cache, dweight=None):
    dout, ids, shape, dtype = embedding_grad_inputs(dout, cache, dweight)
    if dweight is None:
        dweight = np.zeros(shape, dtype=dtype)
    elif not jit_writable(dweight):
        return embedding_backward(ops, dout, cache, dweight)  # accumulate into any view
    if ids.size and shape[1]:
        _embedding_bwd(dout.reshape(-1, shape[1]), ids.reshape(-1), dweight)
    return dweight
