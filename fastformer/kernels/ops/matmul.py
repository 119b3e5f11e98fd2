"""Matrix products: the GEMMs of the linear layers, of the fused LM head and of the attention tiles.

Every matrix product of a training step goes through these, so a backend chooses how (and in
which precision) the model multiplies without a change to the layers or the models. float32
and float64 arrays multiply on NumPy's BLAS in their own dtype; float32 arrays may instead
multiply in "bfloat16" (bfloat16 products, float32 sums: gemm_bf16.py), on the Numba backend with
its own kernel where the CPU has AVX-512 BF16, on the reference by rounding the inputs exactly as
that kernel does. `precision=None` is the process's setting (`fastformer.kernels.set_precision`)
for float32 arrays, the dtype's own for float64; `ops.matmul_precisions` lists what a backend
offers, {array dtype: precisions}.

`ops.pack(b)` prepares a right operand used by several products (the LM head's weight across its
chunks): in bfloat16 it is rounded (reference) or packed into the kernel's panels (Numba) once.

Shapes: x (..., Cin), weight (Cin, Cout) (a transposed view of a (Cout, Cin) weight is fine),
bias (Cout,), out (..., Cout).
"""

from typing import NamedTuple, Optional

import numpy as np

from fastformer.errors import FastformerError
from fastformer.kernels.checks import dtype_name, quiet
from fastformer.kernels.ops import activations, gemm_bf16

_setting = {"precision": "float32"}  # of the products of float32 arrays: fastformer.kernels.set_precision


def current_precision():
    """The process's precision of the products of float32 arrays: "float32" or "bfloat16"."""
    return _setting["precision"]


class LinearCache(NamedTuple):
    x2: object  # (N, Cin): the forward's input as rows; on the Numba backend in bfloat16 x2.T packed (PackedA)
    weight: np.ndarray  # (Cin, Cout)
    precision: Optional[str]


class LinearGeluCache(NamedTuple):
    linear: LinearCache  # of f = x @ weight
    gelu: tuple  # activations.GeluCache of g = gelu(f + bias)


def check_precision(ops, precision, dtype):
    """The precision a product of `dtype` arrays runs in: None for the dtype's own (BLAS), else
    "bfloat16". `precision` None takes the process's setting for float32 arrays."""
    dtype = np.dtype(dtype)
    name = dtype_name(dtype)
    if precision is None:
        precision = _setting["precision"] if name == "float32" else None
    elif precision not in ops.matmul_precisions.get(name, ()):
        offered = ops.matmul_precisions.get(name, ())
        raise FastformerError(f"precision must be None or one of {', '.join(map(repr, offered))} for "
                              f"{dtype} arrays on the {ops.name} backend, got {precision!r}")
    return None if precision == name else precision


def require_precision(ops, precision):
    """Refuse, in one line, a precision this backend cannot run here."""
    if precision == "bfloat16":
        gemm_bf16.require_bf16()
    raise FastformerError(f"precision {precision!r} is not offered by the {ops.name} backend")


# ---------------------------------------------------------------- reference
@quiet
def matmul(ops, a, b, out=None, precision=None, bias=None, accumulate=False):
    """a @ b (+ bias) for 2-D float arrays of one dtype (any strides), written into `out` (a view
    NumPy can write, such as a slice of a buffer kept across calls) when given, or added to it
    with `accumulate`; b may be what `pack` returned. Returns out. Callers inside the kernel layer
    pass checked shapes. The sum is rounded as `out + ((a @ b) + bias)`."""
    if check_precision(ops, precision, a.dtype) == "bfloat16":
        product = gemm_bf16.matmul_bf16_reference
    else:
        product = np.matmul
    return _finish(product(a, b, out=None if accumulate else out), out, bias, accumulate)


def _finish(y, out, bias, accumulate):
    """The epilogue of a product y computed without it: y + bias, added into out with `accumulate`."""
    if bias is not None:
        y += bias
    if accumulate and out is not None:
        out += y
        return out
    return y


def pack(ops, b, precision=None):
    """b (K, N) ready to be the right operand of several products: rounded to bfloat16 once when
    the products are, else b itself."""
    if check_precision(ops, precision, b.dtype) == "bfloat16":
        return gemm_bf16.round_to_bf16(b)
    return b


@quiet
def linear_forward(ops, x, weight, bias=None, out=None, precision=None):
    """out = x @ weight + bias, with x (..., Cin), weight (Cin, Cout) as in GPT-2's Conv1D.
    `out`, when given, is a C-contiguous (..., Cout) array to write the result into (a buffer
    kept across steps). Returns (out (..., Cout), LinearCache)."""
    x2 = x.reshape(-1, x.shape[-1])  # (N, Cin)
    N, Cout = x2.shape[0], weight.shape[1]
    _check_out(out, x, N, Cout)
    precision = check_precision(ops, precision, x2.dtype) or dtype_name(x2.dtype)  # fixed now, for the backward too
    y = ops.matmul(x2, weight, out=None if out is None else out.reshape(N, Cout), precision=precision, bias=bias)
    return y.reshape(*x.shape[:-1], Cout), LinearCache(x2, weight, precision)


def _check_out(out, x, N, Cout):
    """linear_forward's `out` for x of N rows: None, or C-contiguous with N * Cout elements."""
    if out is not None and not (out.flags.c_contiguous and out.size == N * Cout):
        raise FastformerError(f"out must be a C-contiguous array of {N * Cout} elements "
                              f"{(*x.shape[:-1], Cout)}, got shape {out.shape}")


@quiet
def linear_backward(ops, dout, cache, dweight, dbias=None):
    """Writes dweight (Cin, Cout) and dbias (Cout,), when given, in place (views of the gradient
    buffer); returns dx shaped like the forward's x. The products run in the forward's precision."""
    # forward: out = x @ weight + bias
    x2, weight, precision = cache
    d2 = dout.reshape(-1, weight.shape[1])  # (N, Cout)
    ops.matmul(x2.T, d2, out=dweight, precision=precision)  # dweight = x^T dout
    if dbias is not None:
        d2.sum(axis=0, out=dbias)
    return ops.matmul(d2, weight.T, precision=precision).reshape(*dout.shape[:-1], weight.shape[0])  # dout W^T


@quiet
def linear_gelu_forward(ops, x, weight, bias=None, approximate="tanh", precision=None):
    """g = gelu(x @ weight + bias): a linear layer whose bias is the GELU's after it (a feed-forward
    block's first layer). Returns (g (..., Cout), LinearGeluCache): the caches of linear_forward and
    gelu_forward, so the backward is theirs (gelu_backward, then linear_backward)."""
    f, linear = ops.linear_forward(x, weight, precision=precision)
    g, gelu = ops.gelu_forward(f, bias, approximate=approximate)
    return g, LinearGeluCache(linear, gelu)


# -------------------------------------------------------------------- Numba
def matmul_numba(ops, a, b, out=None, precision=None, bias=None, accumulate=False):
    """As the reference, bfloat16 on the kernel of gemm_bf16.py, its epilogue in the kernel."""
    if isinstance(b, gemm_bf16.PackedB) or check_precision(ops, precision, a.dtype) == "bfloat16":
        return gemm_bf16.matmul_bf16(a, b, out=out, bias=bias, accumulate=accumulate and out is not None)
    return _finish(np.matmul(a, b, out=None if accumulate else out), out, bias, accumulate)


def linear_forward_numba(ops, x, weight, bias=None, out=None, precision=None):
    """As the reference. In bfloat16 x is packed in one pass as the left operand of this product
    and, transposed, of the backward's dweight = x^T dout (`gemm_bf16.pack_a_and_at`), and the
    cache keeps that packed x^T (half x's bytes) instead of x: the backward does not read x from
    memory again."""
    x2 = x.reshape(-1, x.shape[-1])  # (N, Cin)
    if check_precision(ops, precision, x2.dtype) != "bfloat16" or x2.size == 0 or weight.shape[1] == 0:
        return linear_forward(ops, x, weight, bias, out, precision)
    N, Cout = x2.shape[0], weight.shape[1]
    _check_out(out, x, N, Cout)
    x_as_a, x_t = gemm_bf16.pack_a_and_at(x2)
    y = gemm_bf16.matmul_bf16(x_as_a, weight, out=None if out is None else out.reshape(N, Cout), bias=bias)
    return y.reshape(*x.shape[:-1], Cout), LinearCache(x_t, weight, "bfloat16")


def linear_backward_numba(ops, dout, cache, dweight, dbias=None):
    """As the reference. In bfloat16 dout is read once: one pass packs it as the right operand of
    dweight = x^T dout and the left one of dx = dout W^T, and sums its columns into dbias, where
    the reference's way would read it three times (two packers and the sum). x^T comes packed
    from the forward (`linear_forward_numba`), or is packed here from a cache that holds x."""
    x2, weight, precision = cache
    packed = isinstance(x2, gemm_bf16.PackedA)  # x^T, packed by the forward (never empty)
    d2 = dout.reshape(-1, weight.shape[1])  # (N, Cout)
    if not packed and (check_precision(ops, precision, x2.dtype) != "bfloat16" or d2.size == 0):
        return linear_backward(ops, dout, cache, dweight, dbias)
    d_as_a, d_as_b = gemm_bf16.pack_a_and_b(d2, sums=dbias)
    gemm_bf16.matmul_bf16(x2 if packed else x2.T, d_as_b, out=dweight)  # dweight = x^T dout
    return gemm_bf16.matmul_bf16(d_as_a, weight.T).reshape(*dout.shape[:-1], weight.shape[0])  # dout W^T


def linear_gelu_forward_numba(ops, x, weight, bias=None, approximate="tanh", precision=None):
    """As the reference. In bfloat16 the bias and the GELU are the GEMM's epilogue: its tasks write
    u = x @ weight + bias and then, while their rows are still in cache, g = gelu(u). The GELU's
    cache keeps u and a zero bias where the reference's keeps x @ weight and the bias: the
    backward's u + bias is the same float32 value either way."""
    x2 = x.reshape(-1, x.shape[-1])  # (N, Cin)
    N, Cout = x2.shape[0], weight.shape[1]
    if check_precision(ops, precision, x2.dtype) != "bfloat16" or x2.size == 0 or Cout == 0:
        return linear_gelu_forward(ops, x, weight, bias, approximate, precision)
    _, bias = activations.gelu_inputs(np.empty((0, Cout), x2.dtype), bias, approximate)  # f's checks, before the GEMM
    u, g = np.empty((N, Cout), x2.dtype), np.empty((N, Cout), x2.dtype)
    x_as_a, x_t = gemm_bf16.pack_a_and_at(x2)  # as linear_forward_numba
    gemm_bf16.matmul_bf16(x_as_a, weight, out=u, bias=bias, gelu_out=g, approximate=approximate)
    shape = (*x.shape[:-1], Cout)
    gelu = activations.GeluCache(u.reshape(shape), np.zeros(Cout, x2.dtype), approximate, bias is not None)
    return g.reshape(shape), LinearGeluCache(LinearCache(x_t, weight, "bfloat16"), gelu)


def pack_numba(ops, b, precision=None):
    """As the reference; bfloat16 operands packed into the kernel's panels."""
    if check_precision(ops, precision, b.dtype) == "bfloat16":
        return gemm_bf16.pack_b(b)
    return b
