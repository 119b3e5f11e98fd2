"""Attention on BLAS tiles, for long sequences: the flash-attention structure in NumPy with Numba
block steps. Query blocks x key blocks, every block product a GEMM of the kernel interface
(`ops.matmul`), an online softmax (running max m and sum l per row) between them, and a backward
that recomputes each block's probabilities from the saved lse; no (T, S) array per head. The
heads run side by side on the task pool (tasks.py), each on one BLAS thread.

The Numba backend runs this from attention.ATTENTION_TILED_FROM query rows on (the crossover
measured by benchmarks/attention_crossover.py); the reference is attention.py's plain form, which
this must match. The elementwise block steps exist twice: `NUMPY_STEPS`, readable and the
specification of the steps, and `NUMBA_STEPS`, the jitted ones. Masks, NaN and lse follow
attention.py. A row at key position `row0 + r` sees the block's keys j < row0 + r + 1 - c0
(row0 = S when nothing is causal), less the padded ones.
"""

from typing import Callable, NamedTuple

import numpy as np

from fastformer.kernels._jit import exp, exp_row, inline, kernel, row_max
from fastformer.kernels.tasks import run_tasks

ATTENTION_BLOCK = 512  # query and key rows of a block (benchmarks/attention_crossover.py)
_NO_PADDING = np.zeros(0, np.bool_)  # the block kernels' mask argument when there is none: never read


class BlockSteps(NamedTuple):
    """The elementwise steps between the block GEMMs."""
    softmax_block: Callable  # (sc, m, total, acc, row0, c0, mask): one key block of the online softmax
    probs_block: Callable  # (sc, lse, row0, c0, mask): scores -> p = exp(score - lse)
    dscores_block: Callable  # (p, dp, D, scale): dp -> ds = p * (dp - D) * scale


# ------------------------------------------------------------ the tiled loops
def _padding_rows(key_padding_mask, B):
    """Each batch row's key padding (S,) bool, C-contiguous, or None for every row without a mask."""
    if key_padding_mask is None:
        return [None] * B
    return [np.array(row, np.bool_) for row in key_padding_mask]  # writeable copies: S bools each


def _keys_allowed(shape, row0, c0, mask):
    """(R, n) bool of a tiled attention block: rows at key positions row0.. against keys
    c0..c0+n, True where a key is at or before the row's position and not padding (mask (S,) or
    None)."""
    R, n = shape
    keys = c0 + np.arange(n)
    allowed = keys[None, :] <= (row0 + np.arange(R))[:, None]
    return allowed if mask is None else allowed & ~mask[c0:c0 + n][None, :]


def attention_tiled(ops, q, k, v, causal, key_padding_mask, scale, precision, out, steps=None):
    """Attention of checked q (B, H, T, hs), k, v (B, H, S, hs), any strides with unit
    last stride, written into out (B, H, T, hs), its products in `precision` (as ops.matmul takes
    it); returns lse (B, H, T). Same masks and lse convention as `attention_forward`. In
    "bfloat16" the operands are those of attention.py's reference but for p, rounded before it is
    normalised, relative to the running max of the row (see attention.py)."""
    B, H, T, hs = q.shape
    lse = np.empty((B, H, T), q.dtype)
    masks = _padding_rows(key_padding_mask, B)
    steps = steps or NUMBA_STEPS
    run_tasks([(_tiled_head, (ops, steps, q[b, h], k[b, h], v[b, h], masks[b], causal, scale, precision, out[b, h],
                              lse[b, h])) for b in range(B) for h in range(H)])
    return lse


def _tiled_head(ops, steps, q, k, v, mask, causal, scale, precision, out, lse):
    """One head of `attention_tiled`: q (T, hs), k, v (S, hs), mask (S,) or None -> out, lse."""
    (T, hs), S = q.shape, k.shape[0]
    off, dt, block = S - T, q.dtype, ATTENTION_BLOCK  # query i is at key position i + off
    scores = np.empty(block * block, dt)  # one block of scores, then of p
    pv = np.empty(block * hs, dt)
    for r0 in range(0, T, block):
        R = min(T, r0 + block) - r0
        qs = q[r0:r0 + R] * dt.type(scale)  # (R, hs)
        m = np.full(R, -np.inf, dt)  # running max of each row's scores
        total = np.zeros(R, dt)  # running sum of exp(score - m)
        acc = np.zeros((R, hs), dt)  # running sum of exp(score - m) v
        end = min(S, r0 + R + off) if causal else S  # the keys the block's last row sees
        for c0 in range(0, end, block):
            n = min(end, c0 + block) - c0
            sc = ops.matmul(qs, k[c0:c0 + n].T, out=scores[:R * n].reshape(R, n), precision=precision)  # (R, n)
            steps.softmax_block(sc, m, total, acc, r0 + off if causal else S, c0, mask)
            acc += ops.matmul(sc, v[c0:c0 + n], out=pv[:R * hs].reshape(R, hs), precision=precision)  # p @ v
        _flash_finish(acc, m, total, out[r0:r0 + R], lse[r0:r0 + R])


def attention_tiled_grads(ops, dout, cache, dq, dk, dv, steps=None):
    """(dq, dk, dv) of `attention_tiled` for dout (B, H, T, hs), written into dq, dk, dv
    (any strides with unit last stride), its products in the cache's precision."""
    q, k, v, out, lse, causal, key_padding_mask, scale, precision = cache
    B, H = q.shape[:2]
    masks = _padding_rows(key_padding_mask, B)
    steps = steps or NUMBA_STEPS
    run_tasks([(_tiled_head_grads, (ops, steps, q[b, h], k[b, h], v[b, h], out[b, h], lse[b, h], dout[b, h],
                                          masks[b], causal, scale, precision, dq[b, h], dk[b, h], dv[b, h]))
               for b in range(B) for h in range(H)])


def _tiled_head_grads(ops, steps, q, k, v, out, lse, dout, mask, causal, scale, precision, dq, dk, dv):
    """One head of `attention_tiled_grads`: (T, hs) and (S, hs) arrays, mask (S,) or None."""
    # forward: p = softmax(q k^T * scale + mask); out = p v
    #   dv = p^T dout;  dp = dout v^T;  ds = p * (dp - D) * scale, D = rowsum(dout * out)
    #   dq = ds k;  dk = ds^T q
    (T, hs), S = q.shape, k.shape[0]
    off, dt, block = S - T, q.dtype, ATTENTION_BLOCK
    p_buf, dp_buf, part = np.empty(block * block, dt), np.empty(block * block, dt), np.empty(block * hs, dt)
    D = np.einsum("td,td->t", dout, out)  # (T,)
    dq[...] = 0
    for c0 in range(0, S, block):
        n = min(S, c0 + block) - c0
        kj, vj, dkj, dvj = k[c0:c0 + n], v[c0:c0 + n], dk[c0:c0 + n], dv[c0:c0 + n]
        dkj[...] = 0
        dvj[...] = 0
        first = max(0, c0 - off) // block * block if causal else 0  # earlier rows see none of these keys
        for r0 in range(first, T, block):
            R = min(T, r0 + block) - r0
            p = ops.matmul(q[r0:r0 + R] * dt.type(scale), kj.T, out=p_buf[:R * n].reshape(R, n),
                           precision=precision)  # scores
            steps.probs_block(p, lse[r0:r0 + R], r0 + off if causal else S, c0, mask)
            dvj += ops.matmul(p.T, dout[r0:r0 + R], out=part[:n * hs].reshape(n, hs), precision=precision)
            ds = ops.matmul(dout[r0:r0 + R], vj.T, out=dp_buf[:R * n].reshape(R, n), precision=precision)  # dp
            steps.dscores_block(p, ds, D[r0:r0 + R], dt.type(scale))  # now ds
            dq[r0:r0 + R] += ops.matmul(ds, kj, out=part[:R * hs].reshape(R, hs), precision=precision)
            dkj += ops.matmul(ds.T, q[r0:r0 + R], out=part[:n * hs].reshape(n, hs), precision=precision)


# ------------------------------------------------------- NumPy block steps
def _softmax_block(sc, m, total, acc, row0, c0, mask):
    """One key block of the online softmax, in place: sc (R, n) holds the scores of rows
    row0.. (their key positions, S when nothing is causal) against keys c0..c0+n; a key
    after the row's own position or padded (mask (S,) True) is left out. Updates the
    running max m (R,), total (R,) and acc (R, hs) (rescaled to the new max) and turns sc
    into exp(score - new max), 0 where left out."""
    allowed = _keys_allowed(sc.shape, row0, c0, mask)
    sc[~allowed] = -np.inf
    new = np.maximum(m, sc.max(axis=1))  # NaN where a score is NaN: the row stays NaN
    base = np.where(np.isfinite(new), new, 0).astype(sc.dtype)
    alpha = np.exp(m - base)  # 0 while nothing was seen (m = -inf)
    np.exp(sc - base[:, None], out=sc)
    total *= alpha
    total += sc.sum(axis=1)
    acc *= alpha[:, None]
    m[...] = new


def _flash_finish(acc, m, total, out, lse):
    """out (R, hs) = acc / total and lse = m + log(total); a row that saw no key (total 0)
    gets 0 and -inf, a row that met a NaN (total NaN) NaN."""
    seen = total != 0
    out[...] = np.where(seen[:, None], acc / np.where(seen, total, 1)[:, None], 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        lse[...] = np.where(seen, m + np.log(np.where(seen, total, 1)), -np.inf)


def _probs_block(sc, lse, row0, c0, mask):
    """sc (R, n) scores -> p = exp(score - lse) in place, 0 where left out (as in
    `_softmax_block`) and on rows with lse = -inf (they saw no key)."""
    seen = lse != -np.inf  # a NaN lse gives NaN probabilities, as on the row kernels
    allowed = _keys_allowed(sc.shape, row0, c0, mask) & seen[:, None]
    np.exp(np.where(allowed, sc - np.where(seen, lse, 0)[:, None], -np.inf), out=sc)


def _dscores_block(p, dp, D, scale):
    """dp (R, n) -> ds = p * (dp - D) * scale in place."""
    dp -= D[:, None]
    dp *= p
    dp *= scale


# ------------------------------------------------------- Numba block steps
@inline
def _keys_seen(row0, r, c0, n):
    return max(0, min(n, row0 + r + 1 - c0))


@kernel("void(F[:, ::1], F[::1], F[::1], F[:, ::1], int64, int64, boolean[::1], boolean)", parallel=False)
def _softmax_block_kernel(sc, m, total, acc, row0, c0, mask, has_mask):
    """One key block of the online softmax (`_softmax_block`)."""
    R, n = sc.shape
    hs = acc.shape[1]
    F = sc.dtype.type
    for r in range(R):
        row = sc[r]
        last = _keys_seen(row0, r, c0, n)
        if has_mask:
            for j in range(last):
                if mask[c0 + j]:
                    row[j] = F(-np.inf)
        new = max(m[r], row_max(row, last))
        t = exp_row(row, last, n, new)
        # no key seen yet leaves m -inf, total and acc 0; a NaN score makes t, and so the row, NaN
        if last > 0 and (new != F(-np.inf) or t != t):
            alpha = exp(m[r] - new)  # 0 while m = -inf
            total[r] = total[r] * alpha + t
            for d in range(hs):
                acc[r, d] *= alpha
            m[r] = new


@kernel("void(F[:, ::1], F[::1], int64, int64, boolean[::1], boolean)", parallel=False)
def _probs_block_kernel(sc, lse, row0, c0, mask, has_mask):
    """Scores -> p = exp(score - lse) in place (`_probs_block`)."""
    R, n = sc.shape
    F = sc.dtype.type
    for r in range(R):
        row = sc[r]
        L = lse[r]
        last = _keys_seen(row0, r, c0, n) if L != F(-np.inf) else 0
        for j in range(last):  # no branch inside: the loop vectorises
            row[j] = exp(row[j] - L)
        if has_mask:
            for j in range(last):
                if mask[c0 + j]:
                    row[j] = F(0.0)
        for j in range(last, n):
            row[j] = F(0.0)


@kernel("void(F[:, ::1], F[:, ::1], F[::1], F)", parallel=False)
def _dscores_block_kernel(p, dp, D, scale):
    """dp -> ds = p * (dp - D) * scale in place."""
    R, n = p.shape
    for r in range(R):
        Dr = D[r]
        for j in range(n):
            dp[r, j] = p[r, j] * (dp[r, j] - Dr) * scale


def _softmax_block_numba(sc, m, total, acc, row0, c0, mask):
    _softmax_block_kernel(sc, m, total, acc, row0, c0, _NO_PADDING if mask is None else mask, mask is not None)


def _probs_block_numba(sc, lse, row0, c0, mask):
    _probs_block_kernel(sc, np.ascontiguousarray(lse), row0, c0, _NO_PADDING if mask is None else mask,
                        mask is not None)


def _dscores_block_numba(p, dp, D, scale):
    _dscores_block_kernel(p, dp, np.ascontiguousarray(D), scale)


NUMPY_STEPS = BlockSteps(_softmax_block, _probs_block, _dscores_block)
NUMBA_STEPS = BlockSteps(_softmax_block_numba, _probs_block_numba, _dscores_block_numba)
