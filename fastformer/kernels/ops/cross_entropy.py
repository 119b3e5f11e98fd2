"""Cross-entropy of logits against integer targets, and the LM head fused with it: the checks,
the NumPy reference, the Numba kernels.

The loss is the mean over the counted targets (those that are not `ignore_index`); if every
target is ignored the loss is 0.0 and the gradient zero. A counted row holding a NaN or +inf
gives a NaN loss and a NaN gradient row; an ignored row gives 0 and a zero gradient whatever it
holds. The forward writes the gradient of the mean loss as it goes, while the logits are in
cache, so the backward only scales it.

The fused head (`linear_cross_entropy_forward`) never makes the (N, V) logits: rows go through
in chunks, each chunk's logits made by one GEMM of the kernel interface (`ops.matmul`), turned
into its loss and gradient in place, and with grad=True consumed at once by two more GEMMs into
dh and dweight. The Numba backend runs groups of chunks side by side on the task pool.

Shapes: logits (..., V) read as N rows, targets (...), h (..., C), weight (V, C).
"""

import math

import numpy as np

from fastformer.errors import FastformerError, check_bool, check_int, is_int
from fastformer.kernels._jit import exp, inline, kernel, prange, row_max, rows, serial
from fastformer.kernels.checks import (
    FLOAT_DTYPES,
    IGNORE_INDEX,
    aligned,
    as_float_array,
    as_int_array,
    as_rows,
    cache_array,
    cache_fields,
    cache_root,
    check_index_range,
    check_out,
    describe,
    kernel_array,
    quiet,
)
from fastformer.kernels.ops.matmul import check_precision
from fastformer.kernels.tasks import run_tasks, task_threads

HEAD_CHUNK_BYTES = 8 << 20  # logits per chunk of the fused LM head, per thread: in L3 beside the other's
HEAD_CHUNK_MIN_ROWS = 256  # fewer rows make dweight's GEMM (K = rows) and its sum memory-bound
# In bfloat16, where the products take half the time, a narrow model's chunk keeps its logits in L2
# instead: each chunk then adds its (V, C) share into dweight once more, which costs less than the
# logits' passes through L3 while C is small: training steps alternated both ways (V = 4096, two
# threads) gained at tiny (C = 64) and small (128), not at medium (256).
HEAD_CHUNK_BYTES_BF16 = 2 << 20
HEAD_BF16_L2_WIDTH = 128  # the widest C (h's columns) that takes HEAD_CHUNK_BYTES_BF16
HEAD_CHUNK_MIN_ROWS_BF16 = 64
_INT64_MAX = np.iinfo(np.int64).max


def head_chunk_rows(V, dtype, C=None, precision=None):
    """Rows per chunk of `linear_cross_entropy_forward` for a vocabulary of V: a chunk's (rows, V)
    logits take about HEAD_CHUNK_BYTES, and never fewer than HEAD_CHUNK_MIN_ROWS rows; in
    "bfloat16" products with h of C <= HEAD_BF16_L2_WIDTH columns, HEAD_CHUNK_BYTES_BF16 and
    HEAD_CHUNK_MIN_ROWS_BF16 rows."""
    size = V * np.dtype(dtype).itemsize
    if precision == "bfloat16" and C is not None and C <= HEAD_BF16_L2_WIDTH:
        return max(HEAD_CHUNK_MIN_ROWS_BF16, HEAD_CHUNK_BYTES_BF16 // size)
    return max(HEAD_CHUNK_MIN_ROWS, HEAD_CHUNK_BYTES // size)


# ------------------------------------------------------------------- checks
def check_targets(logits, targets, ignore_index):
    """Integer targets for logits (..., V); returns (t (N,) int64, counted (N,) bool)."""
    V = logits.shape[-1]
    if targets.shape != logits.shape[:-1]:
        raise FastformerError(f"targets must have shape {logits.shape[:-1]} (logits without the last axis), "
                              f"got {targets.shape}")
    t = targets.reshape(-1)
    counted = t != ignore_index
    bad = counted & ((t < 0) | (t >= V))
    if bad.any():
        raise FastformerError(f"targets must lie in [0, {V}) or equal ignore_index={ignore_index}, got {t[bad][0]}")
    return t, counted


def cross_entropy_inputs(logits, targets, ignore_index, out):
    """(logits, t (N,) int64, counted (N,) bool) of `cross_entropy_forward`; `out`, when given,
    is checked as the array the gradient is written into."""
    logits = as_rows(logits, "logits")
    if out is not None:
        check_out(out, logits, "out")
    return (logits, *check_targets(logits, as_int_array(targets, "targets"), check_ignore_index(ignore_index)))


def check_ignore_index(ignore_index):
    """The target id a cross-entropy leaves out: an integer that fits int64."""
    if not is_int(ignore_index):
        raise FastformerError(f"ignore_index must be an integer, got {ignore_index!r}")
    if not -_INT64_MAX - 1 <= ignore_index <= _INT64_MAX:
        raise FastformerError(f"ignore_index must fit int64, got {ignore_index}")
    return ignore_index


def check_dloss(dloss):
    """dloss, the gradient reaching a loss, as a finite float."""
    number = isinstance(dloss, (int, float, np.integer, np.floating)) and not isinstance(dloss, (bool, np.bool_))
    try:
        value = float(dloss) if number else math.nan
    except OverflowError:  # an int beyond the float range
        value = math.inf
    if not math.isfinite(value):
        raise FastformerError(f"dloss must be a finite number, got {dloss!r}")
    return value


def cross_entropy_grad_inputs(dloss, cache):
    """(dloss, cache) of cross_entropy_backward: the cache is the float gradient array the forward
    wrote, or the reference's (logits, targets, counted, lse, n) with every counted target in range."""
    dloss = check_dloss(dloss)
    forward = "cross_entropy_forward"
    if isinstance(cache, np.ndarray):  # the gradient written by the forward
        if cache.dtype not in FLOAT_DTYPES:
            raise FastformerError(f"cache must be the float32 or float64 gradient {forward} returned, "
                                  f"got {describe(cache)}")
        return dloss, aligned(cache)
    logits, t, counted, lse, n = cache_fields(cache, forward, "logits targets counted lse n")
    logits = kernel_array(cache_root(logits, "logits", forward))
    V = logits.shape[-1]
    if V == 0:
        raise FastformerError(f"logits in the cache of {forward} must have a non-empty last axis, got {logits.shape}")
    N = logits.size // V
    t = cache_array(t, "targets", forward, (N,), np.int64)
    counted = cache_array(counted, "counted", forward, (N,), bool)
    check_index_range(t, f"targets in the cache of {forward}", V, allowed=counted)
    lse = cache_array(lse, "lse", forward, (N,), logits.dtype)
    return dloss, (logits, t, counted, lse, check_int(f"n in the cache of {forward}", n, minimum=0))


def linear_cross_entropy_grad_inputs(dloss, cache):
    """(dloss, (dh, dweight)) of linear_cross_entropy_backward: the cache of a forward with
    grad=True, two writeable float arrays of one dtype."""
    dloss = check_dloss(dloss)
    if cache is None:
        raise FastformerError("linear_cross_entropy_backward needs the cache of a forward with grad=True")
    if not (isinstance(cache, tuple) and len(cache) == 2 and all(isinstance(a, np.ndarray) for a in cache)
            and cache[0].dtype in FLOAT_DTYPES and cache[1].dtype == cache[0].dtype
            and cache[1].ndim == 2 and cache[0].shape[-1] == cache[1].shape[1]
            and all(a.flags.writeable for a in cache)):
        raise FastformerError(f"the cache of linear_cross_entropy_forward must be (dh (..., C), dweight (V, C)), "
                              f"writeable float arrays of one dtype, got {describe(cache)}")
    return dloss, cache


def linear_cross_entropy_inputs(h, weight, targets, ignore_index, grad, dweight):
    """(h (..., C), weight (V, C), t (N,) int64, counted (N,) bool) of
    `linear_cross_entropy_forward`; `dweight`, when given with grad, is checked as the (V, C)
    array the weight's gradient is written into."""
    check_bool("grad", grad)
    h = as_float_array(h, "h")
    weight = as_float_array(weight, "weight", h.dtype)
    if weight.ndim != 2 or weight.shape[1] != h.shape[-1] or weight.shape[0] == 0:
        raise FastformerError(f"weight must have shape (V >= 1, C={h.shape[-1]}) for h {h.shape}, got {weight.shape}")
    if dweight is not None:
        check_out(dweight, weight, "dweight")
    targets, ignore_index = as_int_array(targets, "targets"), check_ignore_index(ignore_index)
    V = weight.shape[0]
    logits = np.broadcast_to(np.zeros((), h.dtype), (*h.shape[:-1], V))  # the logits' shape, no memory
    t, counted = check_targets(logits, targets, ignore_index)
    return h, weight, t, counted


# ---------------------------------------------------------------- reference
@quiet
def cross_entropy_forward(ops, logits, targets, ignore_index=IGNORE_INDEX, out=None):
    """Mean cross-entropy of softmax(logits) against integer targets, over the tokens whose
    target is not `ignore_index`. logits (..., V >= 1), targets (...). If every target is
    ignored the loss is 0.0 and the gradient is zero. Returns (loss: float, cache).

    With `out` (a writeable C-contiguous array of the shape and dtype of logits, which may be
    `logits` itself) the gradient of the mean loss is written into it during the forward and
    the cache is `out`: the gradient needs no array of its own, and
    `cross_entropy_backward(1.0, cache)` returns `out`. `logits` is overwritten when it is `out`.
    """
    logits, t, counted = cross_entropy_inputs(logits, targets, ignore_index, out)
    V = logits.shape[-1]
    x = logits.reshape(-1, V)
    m = x.max(axis=-1)
    lse = m + np.log(np.exp(x - m[:, None]).sum(axis=-1))  # (N,)
    n = int(counted.sum())
    tc = np.where(counted, t, 0)
    nll = np.where(counted, lse - x[np.arange(len(t)), tc], 0.0)
    loss = float(nll.sum() / n) if n else 0.0
    cache = (logits, t, counted, lse, n)
    if out is None:
        return loss, cache
    out[...] = cross_entropy_backward(ops, 1.0, cache)  # computed before logits is overwritten
    return loss, out


@quiet
def cross_entropy_backward(ops, dloss, cache):
    """Returns dlogits, shaped like logits; when the forward had `out` and dloss is 1, that
    array itself."""
    # forward: loss = sum_counted (lse - x[target]) / n
    dloss, cache = cross_entropy_grad_inputs(dloss, cache)
    if isinstance(cache, np.ndarray):  # the gradient of the mean loss, written by the forward
        return cache if dloss == 1.0 else cache * cache.dtype.type(dloss)
    logits, t, counted, lse, n = cache
    V = logits.shape[-1]
    x = logits.reshape(-1, V)
    dx = np.exp(x - lse[:, None])
    dx[np.arange(len(t)), np.where(counted, t, 0)] -= 1.0
    dx *= x.dtype.type(dloss / max(n, 1))
    dx[~counted] = 0.0  # an ignored row's gradient is 0, even where its logits are not finite
    return dx.reshape(logits.shape)


def _cross_entropy_rows(x, t, ignore_index, inv_n):
    """nll (R,) float64 of logits rows x (R, V) against t (R,), and x overwritten by the
    gradient of the mean loss, (softmax(x) - onehot(t)) * inv_n (zero on ignored rows)."""
    counted = t != ignore_index
    tc = np.where(counted, t, 0)
    rows = np.arange(len(t))
    m = x.max(axis=-1, keepdims=True)
    np.subtract(x, m, out=x)
    xt = x[rows, tc]
    np.exp(x, out=x)
    total = x.sum(axis=-1)
    nll = np.where(counted, np.log(total) - xt, 0.0)
    x *= (inv_n / total)[:, None].astype(x.dtype)
    x[rows, tc] -= np.where(counted, inv_n, 0).astype(x.dtype)
    x[~counted] = 0  # an ignored row's gradient is 0, even where its logits are not finite
    return nll


def linear_cross_entropy_forward(ops, h, weight, targets, ignore_index=IGNORE_INDEX, grad=False, dweight=None,
                                 chunk_rows=None):
    """Mean cross-entropy of the LM head's logits = h @ weight.T against integer targets,
    without an (N, V) logits array: the rows go through in chunks of `chunk_rows` (default
    `head_chunk_rows`); one GEMM makes a chunk's logits, which become its loss and, in the
    same place, its gradient while they are in cache, and with grad=True two more GEMMs
    consume that gradient at once into dh and the (accumulated) dweight.

    h (..., C), weight (V, C), targets (...): ignore_index and the mean over counted tokens
    as in `cross_entropy_forward`. With grad=True the cache is (dh (..., C), dweight (V, C))
    of the mean loss, dweight written into `dweight` when given (a gradient buffer);
    `linear_cross_entropy_backward(dloss, cache)` returns them. With grad=False (an
    evaluation) the cache is None. Returns (loss: float, cache).
    """
    return _linear_cross_entropy(ops, h, weight, targets, ignore_index, grad, dweight, chunk_rows,
                                 _cross_entropy_rows, workers=1)


@quiet
def _linear_cross_entropy(ops, h, weight, targets, ignore_index, grad, dweight, chunk_rows, rows_loss, workers):
    """linear_cross_entropy_forward with each chunk's loss and gradient made by `rows_loss`, the
    chunks in `workers` contiguous groups run side by side on the task pool."""
    h, w, t, counted = linear_cross_entropy_inputs(h, weight, targets, ignore_index, grad, dweight)
    h2 = h.reshape(-1, h.shape[-1])  # (N, C)
    N, V = h2.shape[0], w.shape[0]
    n = int(counted.sum())
    inv_n = h2.dtype.type(1.0 / max(n, 1))
    precision = check_precision(ops, None, h2.dtype)
    chunk = head_chunk_rows(V, h2.dtype, h2.shape[1], precision) if chunk_rows is None else check_int("chunk_rows",
                                                                                                    chunk_rows)
    starts = list(range(0, N, chunk))
    nll = np.zeros(N, np.float64)
    dh = np.empty_like(h2) if grad else None  # (N, C)
    dw = (np.zeros_like(w) if dweight is None else dweight) if grad else None  # (V, C)
    if grad and N == 0:
        dw[...] = 0
    # each group but the first sums its share of dweight in an array of its own, added in at the
    # end (so dweight's last bits depend on the thread count, as a threaded GEMM's may)
    workers = max(1, min(workers, len(starts)))
    groups = [g.tolist() for g in np.array_split(np.array(starts, np.int64), workers)]
    parts = [dw] + [np.empty_like(w) for _ in groups[1:]] if grad else [None] * workers
    wt, wn = ops.pack(w.T), (ops.pack(w) if grad else None)  # once for every chunk's products
    run_tasks([(_head_chunks, (ops, rows_loss, h2, wt, wn, V, t, ignore_index, inv_n, chunk, group, nll, dh, part))
               for group, part in zip(groups, parts)])
    for part in parts[1:] if grad else ():
        dw += part
    loss = float(nll.sum() / n) if n else 0.0
    return loss, ((dh.reshape(h.shape), dw) if grad else None)


def _head_chunks(ops, rows_loss, h2, wt, wn, V, t, ignore_index, inv_n, chunk, starts, nll, dh, dw):
    """The chunks of `chunk` rows of `linear_cross_entropy_forward` beginning at `starts`, one
    after another: their nll and, when dh is given, their dh and dw (overwritten, then summed
    over the chunks). wt and wn are the (V, C) weight transposed and not, as ops.pack made them."""
    N = h2.shape[0]
    buf = np.empty((max(1, min(chunk, N)), V), h2.dtype)  # (R, V): a chunk's logits, then their gradient
    for i, s in enumerate(starts):
        e = min(N, s + chunk)
        x = ops.matmul(h2[s:e], wt, out=buf[:e - s])  # logits of rows s..e
        nll[s:e] = rows_loss(x, t[s:e], ignore_index, inv_n)  # x is now dlogits
        if dh is not None:
            # logits = h @ w.T  ->  dh = dlogits @ w, dw = sum over the chunks of dlogits^T @ h
            ops.matmul(x, wn, out=dh[s:e])
            ops.matmul(x.T, h2[s:e], out=dw, accumulate=i > 0)


@quiet
def linear_cross_entropy_backward(ops, dloss, cache):
    """Returns (dh, dweight) of `linear_cross_entropy_forward(..., grad=True)` scaled by
    dloss: the forward's arrays themselves when dloss is 1."""
    # forward: loss = sum_counted (lse(h @ w.T) - (h @ w.T)[target]) / n
    dloss, (dh, dw) = linear_cross_entropy_grad_inputs(dloss, cache)
    if dloss != 1.0:
        dh *= dh.dtype.type(dloss)
        dw *= dw.dtype.type(dloss)
    return dh, dw


# -------------------------------------------------------------------- Numba
@inline
def _cross_entropy_row(x, tn, ignore_index, inv_n, dx):
    """nll = logsumexp(x) - x[tn] of one row x (V,), returned, and the gradient of the mean loss
    dx (V,) = (softmax(x) - onehot(tn)) * inv_n; an ignored row gives 0 and a zero gradient.
    dx may be x: x[tn] is read before any write."""
    V = x.shape[0]
    F = x.dtype.type
    if tn == ignore_index:
        for c in range(V):
            dx[c] = F(0.0)
        return 0.0
    xt = x[tn]
    m = row_max(x, V)
    total = F(0.0)
    for c in range(V):
        e = exp(x[c] - m)
        dx[c] = e
        total += e
    g = inv_n / total
    for c in range(V):
        dx[c] *= g
    dx[tn] -= inv_n
    return m + math.log(total) - xt


@kernel("void(R[:, ::1], readonly(int64)[::1], int64, F, F[:, ::1], float64[::1])")
def _cross_entropy_fwd(x, t, ignore_index, inv_n, dx, nll):
    """Per row: nll and, in the same pass, the gradient of the mean loss dx (`_cross_entropy_row`)."""
    for n in prange(x.shape[0]):
        nll[n] = _cross_entropy_row(x[n], t[n], ignore_index, inv_n, dx[n])


@kernel("void(F[:, ::1], readonly(int64)[::1], int64, F, float64[::1])", serial_twin=True)
def _cross_entropy_fwd_inplace(x, t, ignore_index, inv_n, nll):
    """`_cross_entropy_fwd` with dx = x: the gradient overwrites the logits. A kernel of its own
    because Numba tells LLVM that the array arguments of a parallel loop never alias, so
    passing one array as both x and dx lets it move the read of x[n, t] after the writes."""
    for n in prange(x.shape[0]):
        nll[n] = _cross_entropy_row(x[n], t[n], ignore_index, inv_n, x[n])


def cross_entropy_forward_numba(ops, logits, targets, ignore_index=IGNORE_INDEX, out=None):
    """As the reference; the gradient of the mean loss is computed in the same pass and
    kept in the cache (one (N, V) array, no separate probabilities): `out` when given,
    which may be `logits` itself, else a new array."""
    logits, t, counted = cross_entropy_inputs(logits, targets, ignore_index, out)
    if logits.size == 0 or (out is not None and not out.flags.aligned):
        return cross_entropy_forward(ops, logits, targets, ignore_index, out)
    n = int(counted.sum())
    inv_n = logits.dtype.type(1.0 / max(n, 1))
    nll = np.empty(t.size, np.float64)
    if out is not None and np.may_share_memory(out, logits):
        if out.ctypes.data != logits.ctypes.data:  # a partial overlap: the reference copes
            return cross_entropy_forward(ops, logits, targets, ignore_index, out)
        dlogits = out
        _cross_entropy_fwd_inplace(rows(logits), t, int(ignore_index), inv_n, nll)
    else:
        dlogits = np.empty_like(logits) if out is None else out
        _cross_entropy_fwd(rows(logits), t, int(ignore_index), inv_n, rows(dlogits), nll)
    loss = float(nll.sum() / n) if n else 0.0
    return loss, dlogits


def _cross_entropy_rows_numba(x, t, ignore_index, inv_n):
    """The reference's, in one serial pass over the rows of a chunk of the fused LM head
    (the chunks run side by side on the task pool)."""
    nll = np.empty(x.shape[0], np.float64)
    serial(_cross_entropy_fwd_inplace)(x, np.ascontiguousarray(t), int(ignore_index), inv_n, nll)
    return nll


def linear_cross_entropy_forward_numba(ops, h, weight, targets, ignore_index=IGNORE_INDEX, grad=False, dweight=None,
                                       chunk_rows=None):
    """The reference's chunks in groups, one per thread of the task pool, each chunk's loss and
    gradient in one serial pass of the Numba kernel."""
    return _linear_cross_entropy(ops, h, weight, targets, ignore_index, grad, dweight, chunk_rows,
                                 _cross_entropy_rows_numba, workers=task_threads())
