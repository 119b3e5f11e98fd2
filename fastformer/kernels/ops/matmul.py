"""Matrix products: the GEMMs of the linear layers, of the fused LM head and of the attention tiles.

Every matrix product of a training step goes through these, so a backend chooses how (and in
which precision) the model multiplies without a change to the layers or the models. Both
backends run them on NumPy's BLAS in the arrays' own dtype today; a backend that brings its own
GEMM binds its own `matmul` (and, if it keeps packed weights, its own linear pair) and lists
what it offers in `ops.matmul_precisions`, {array dtype: precisions}. `precision=None` is the
arrays' own dtype, which every backend offers.

Shapes: x (..., Cin), weight (Cin, Cout) (a transposed view of a (Cout, Cin) weight is fine),
bias (Cout,), out (..., Cout).
"""

from typing import NamedTuple, Optional

import numpy as np

from fastformer.errors import FastformerError


class LinearCache(NamedTuple):
    x2: np.ndarray  # (N, Cin): the forward's input as rows
    weight: np.ndarray  # (Cin, Cout)
    precision: Optional[str]


def check_precision(ops, precision, dtype):
    """`precision` when the backend's GEMM offers it for arrays of `dtype` (None: the dtype's own)."""
    if precision is None:
        return None
    offered = ops.matmul_precisions.get(np.dtype(dtype).name, ())
    if precision not in offered:
        raise FastformerError(f"precision must be None or one of {', '.join(map(repr, offered))} for "
                              f"{np.dtype(dtype)} arrays on the {ops.name} backend, got {precision!r}")
    return precision


def matmul(ops, a, b, out=None, precision=None):
    """a @ b for 2-D float arrays of one dtype (any strides), written into `out` (a view NumPy can
    write, such as a slice of a buffer kept across calls) when given. Returns the product.
    Callers inside the kernel layer pass checked shapes."""
    if precision is not None:
        check_precision(ops, precision, a.dtype)
    return np.matmul(a, b, out=out)


def linear_forward(ops, x, weight, bias=None, out=None, precision=None):
    """out = x @ weight + bias, with x (..., Cin), weight (Cin, Cout) as in GPT-2's Conv1D.
    `out`, when given, is a C-contiguous (..., Cout) array to write the result into (a buffer
    kept across steps). Returns (out (..., Cout), LinearCache)."""
    x2 = x.reshape(-1, x.shape[-1])  # (N, Cin)
    N, Cout = x2.shape[0], weight.shape[1]
    if out is not None and not (out.flags.c_contiguous and out.size == N * Cout):
        raise FastformerError(f"out must be a C-contiguous array of {N * Cout} elements "
                              f"{(*x.shape[:-1], Cout)}, got shape {out.shape}")
    precision = check_precision(ops, precision, x2.dtype)
    y = ops.matmul(x2, weight, out=None if out is None else out.reshape(N, Cout), precision=precision)  # (N, Cout)
    if bias is not None:
        y += bias
    return y.reshape(*x.shape[:-1], Cout), LinearCache(x2, weight, precision)


def linear_backward(ops, dout, cache, dweight, dbias=None):
    """Writes dweight (Cin, Cout) and dbias (Cout,), when given, in place (views of the gradient
    buffer); returns dx shaped like the forward's x."""
    # forward: out = x @ weight + bias
    x2, weight, precision = cache
    d2 = dout.reshape(-1, weight.shape[1])  # (N, Cout)
    ops.matmul(x2.T, d2, out=dweight, precision=precision)  # dweight = x^T dout
    if dbias is not None:
        d2.sum(axis=0, out=dbias)
    return ops.matmul(d2, weight.T, precision=precision).reshape(*dout.shape[:-1], weight.shape[0])  # dout W^T
