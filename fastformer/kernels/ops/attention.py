"""Multi-head scaled dot-product attention: on q, k, v, straight from a fused QKV projection, and
over a key/value cache while decoding. Its checks, the NumPy reference, the Numba kernels: float32
heads of a multiple of 32 channels on register tiles, other heads on row kernels and, past
ATTENTION_TILED_FROM query rows, in the tiled form of attention_tiled.py.

A query with no key left to attend to gets a zero output and lse = -inf; one whose scores hold
a NaN or +inf gets a NaN output and lse, NaN at the keys it may attend to and 0 at the others.
The forward's cache (AttentionCache) keeps the inputs, the output, the row log-sum-exp and the
products' precision only: the backward recomputes the probabilities.

Precision. In "bfloat16" (the products' precision in force at the forward, for ATTENTION_BF16_FROM
query rows or more; kept in the cache so that the backward multiplies alike) the operands of the
six products are rounded to bfloat16 and the products summed in float32, at these points: scores =
r(q * scale) r(k)^T, out = r(p) r(v) with p normalised; dv = r(p)^T r(dout), dp = r(dout) r(v)^T,
dq = r(ds) r(k), dk = r(ds)^T r(q). The softmax, lse, D = rowsum(dout * out), ds = p * (dp - D) *
scale and the masks stay float32. The reference rounds so (`_rounded`) and multiplies with NumPy;
the Numba backend on the bfloat16 register tiles, each operand packed once, and matches it to
float32 summation error (bar a value that the two compute a float32 step apart landing on either
side of a bfloat16 rounding). Heads the register tiles do not take run on the BLAS tiles
(attention_tiled.py) from ATTENTION_TILED_FROM rows, which round as the reference but for the
forward's p, rounded per key block before it is normalised: they agree with the reference to
bfloat16 error only. Fewer rows multiply in the dtype's precision on both backends.

Shapes: q (B, H, T, hs), k and v (B, H, S, hs), key_padding_mask (B, S) True at padding, qkv
(B, T, 3C) with head h at columns h*hs:(h+1)*hs of each part, caches (B, H, Tmax, hs).
"""

import math
from typing import NamedTuple, Optional

import numpy as np

from fastformer.errors import FastformerError, check_bool, check_int
from fastformer.kernels._jit import exp, exp_row, inline, kernel, prange, row_max, sized
from fastformer.kernels._tiles import (
    TILE_M,
    TILE_N,
    bf16_tile,
    bf16_tile_into,
    f32_tile,
    f32_tile_into,
    scaled_copy,
    tiles_run,
)
from fastformer.kernels.checks import (
    as_float_array,
    cache_array,
    cache_fields,
    cache_root,
    check_finite,
    check_grad,
    dtype_name,
    kernel_array,
    quiet,
)
from fastformer.kernels.ops.attention_tiled import attention_tiled, attention_tiled_grads
from fastformer.kernels.ops.gemm_bf16 import (
    _pair,
    _pairs_along_row,
    _scaled_pairs_along_row,
    require_bf16,
    round_to_bf16,
)
from fastformer.kernels.ops.matmul import check_precision

# Query rows from which the Numba backend runs attention on BLAS tiles (attention_tiled.py)
# instead of the row kernels: the crossover measured by benchmarks/attention_crossover.py. Heads
# that the register tiles take (`_on_tiles`: float32, 32k channels) stay on those at every length:
# a training step of `small` ran faster on them than on the BLAS tiles at T = 1024 to 4096, in
# float32 and in bf16.
ATTENTION_TILED_FROM = 1024


class AttentionCache(NamedTuple):
    """What an attention forward keeps for its backward."""
    q: np.ndarray  # (B, H, T, hs)
    k: np.ndarray  # (B, H, S, hs)
    v: np.ndarray  # (B, H, S, hs)
    out: np.ndarray  # (B, H, T, hs)
    lse: np.ndarray  # (B, H, T): the row log-sum-exp of the scores, -inf where no key is left
    causal: bool
    key_padding_mask: Optional[np.ndarray]  # (B, S) bool, True at padding
    scale: float
    precision: str  # of the products: the dtype's name, or "bfloat16" (fixed at the forward)


# ------------------------------------------------------------------- checks
def _attention_scale(scale, hs):
    """The score scale: 1 / sqrt(hs) by default (1 for heads of size 0), else a finite number > 0:
    a NaN or infinite scale would make every score NaN, which is refused rather than computed."""
    if scale is None:
        return 1.0 / math.sqrt(hs) if hs else 1.0
    return check_finite("scale", scale, low=0, low_open=True)


def _key_padding_mask(key_padding_mask, B, S):
    """(B, S) bool, True where the key is padding; None stays None."""
    if key_padding_mask is None:
        return None
    key_padding_mask = np.asarray(key_padding_mask, dtype=bool)
    if key_padding_mask.shape != (B, S):
        raise FastformerError(f"key_padding_mask must have shape (B, S) = {(B, S)}, got {key_padding_mask.shape}")
    return key_padding_mask


def check_attention_inputs(q, k, v, causal, key_padding_mask, scale):
    """The shapes of an attention call on float arrays q (B, H, T, hs), k, v (B, H, S, hs);
    returns (key_padding_mask as bool or None, scale)."""
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise FastformerError(f"attention expects q (B, H, T, hs) and k, v (B, H, S, hs), "
                              f"got q {q.shape}, k {k.shape}, v {v.shape}")
    B, H, T, hs = q.shape
    S = k.shape[2]
    if S == 0:
        raise FastformerError(f"attention needs at least one key, got k and v {k.shape} (S = 0)")
    if check_bool("causal", causal) and S < T:
        raise FastformerError(f"causal attention needs at least as many keys as queries, got T={T}, S={S}")
    return _key_padding_mask(key_padding_mask, B, S), _attention_scale(scale, hs)


def attention_inputs(q, k, v, causal, key_padding_mask, scale):
    """(q, k, v, key_padding_mask, scale) of `attention_forward`."""
    q = as_float_array(q, "q")
    k = as_float_array(k, "k", q.dtype)
    v = as_float_array(v, "v", q.dtype)
    return (q, k, v, *check_attention_inputs(q, k, v, causal, key_padding_mask, scale))


def check_qkv(qkv, n_heads):
    """A fused projection qkv (B, T, 3C) for `n_heads` heads; returns (B, T, C, hs)."""
    check_int("n_heads", n_heads)
    if qkv.ndim != 3 or qkv.shape[2] % 3 or (qkv.shape[2] // 3) % n_heads:
        raise FastformerError(f"qkv must have shape (B, T, 3C) with C divisible by n_heads, got qkv {qkv.shape} "
                              f"and n_heads={n_heads!r}")
    B, T, C3 = qkv.shape
    return B, T, C3 // 3, C3 // (3 * n_heads)


def qkv_attention_inputs(qkv, n_heads, causal, key_padding_mask, scale):
    """(qkv, (B, T, C, hs), key_padding_mask, scale) of `attention_qkv_forward`."""
    qkv = as_float_array(qkv, "qkv")
    B, T, C, hs = dims = check_qkv(qkv, n_heads)
    if T == 0:
        raise FastformerError(f"attention needs at least one key, got qkv {qkv.shape} (T = 0)")
    check_bool("causal", causal)
    return qkv, dims, _key_padding_mask(key_padding_mask, B, T), _attention_scale(scale, hs)


# Query rows from which attention multiplies in bfloat16 when that precision is in force: below, its
# products are short and packing their operands costs what bf16 saves (benchmarks/attention_bf16.py
# measures both sides), so they stay float32 on both backends.
ATTENTION_BF16_FROM = 1024


def attention_precision(ops, dtype, rows):
    """The precision of the products of an attention forward over `rows` query rows, as its cache
    keeps it: "bfloat16" when that is in force for float32 arrays (matmul.check_precision) and
    rows >= ATTENTION_BF16_FROM, else the dtype's name."""
    precision = check_precision(ops, None, dtype) if rows >= ATTENTION_BF16_FROM else None
    return precision or dtype_name(dtype)


def attention_cache(cache, forward="attention_forward"):
    """The AttentionCache of an attention forward, as check_attention_inputs accepts its inputs,
    with out (B, H, T, hs) and lse (B, H, T); the arrays keep their strides.
    attention_qkv_forward's (self-attention) also needs S = T."""
    q, k, v, out, lse, causal, key_padding_mask, scale, precision = cache_fields(
        cache, forward, " ".join(AttentionCache._fields))
    q = cache_root(q, "q", forward, ndim=4)
    k, v = (cache_root(a, name, forward, ndim=4) for a, name in ((k, "k"), (v, "v")))
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise FastformerError(f"k and v in the cache of {forward} must have the dtype of q {q.dtype}, "
                              f"got {k.dtype} and {v.dtype}")
    key_padding_mask, scale = check_attention_inputs(q, k, v, causal, key_padding_mask, scale)
    if forward == "attention_qkv_forward" and k.shape != q.shape:
        raise FastformerError(f"q, k and v in the cache of {forward} must have one shape, got q {q.shape}, "
                              f"k {k.shape}")
    allowed = (dtype_name(q.dtype), "bfloat16") if q.dtype == np.float32 else (dtype_name(q.dtype),)
    if precision not in allowed:
        raise FastformerError(f"precision in the cache of {forward} must be one of {', '.join(map(repr, allowed))} "
                              f"for {q.dtype} arrays, got {precision!r}")
    out = cache_array(out, "out", forward, q.shape, q.dtype)
    lse = kernel_array(cache_array(lse, "lse", forward, q.shape[:3], q.dtype))
    kpm = None if key_padding_mask is None else kernel_array(key_padding_mask)
    return AttentionCache(q, k, v, out, lse, bool(causal), kpm, scale, precision)


def attention_grad_inputs(dout, cache):
    """(dout (B, H, T, hs), cache) of attention_backward."""
    cache = attention_cache(cache)
    return check_grad(dout, "dout", cache[0].shape, cache[0].dtype), cache


def qkv_attention_grad_inputs(dout, cache):
    """(dout (B, T, C), cache) of attention_qkv_backward."""
    cache = attention_cache(cache, "attention_qkv_forward")
    B, H, T, hs = cache[0].shape
    return check_grad(dout, "dout", (B, T, H * hs), cache[0].dtype), cache


# ---------------------------------------------------------------- reference
def attention_allowed(T, S, causal, key_padding_mask):
    """Boolean mask of the keys each query may attend to, broadcastable to (B, H, T, S), or None.

    Causal attention with T queries and S >= T keys aligns the queries with the last T keys
    (query i sits at position S - T + i), which is what decoding with a key/value cache needs.
    `key_padding_mask` is (B, S) bool, True where the key is padding and must be ignored.
    """
    allowed = None
    if causal:
        allowed = np.tril(np.ones((T, S), dtype=bool), k=S - T)[None, None]  # (1, 1, T, S)
    if key_padding_mask is not None:
        keep = ~key_padding_mask[:, None, None, :]  # (B, 1, 1, S)
        allowed = keep if allowed is None else (allowed & keep)
    return allowed


@quiet
def attention_forward(ops, q, k, v, causal=False, key_padding_mask=None, scale=None):
    """Multi-head scaled dot-product attention.

    q (B, H, T, hs), k and v (B, H, S >= 1, hs); `key_padding_mask` (B, S) bool, True = padding.
    A query with no key left to attend to gets a zero output and lse = -inf; one whose scores
    hold a NaN or +inf gets a NaN output and lse (see the module's docstring).
    Returns (out (B, H, T, hs), cache); the cache keeps the inputs, the output and the row
    log-sum-exp (B, H, T) only -- the backward recomputes the probabilities.
    """
    q, k, v, key_padding_mask, scale = attention_inputs(q, k, v, causal, key_padding_mask, scale)
    precision = attention_precision(ops, q.dtype, q.shape[2])
    return _attention_forward(q, k, v, causal, key_padding_mask, scale, precision)


def _rounded(x, precision):
    """An operand of a product in `precision`: x rounded to bfloat16 in "bfloat16", else x."""
    return round_to_bf16(x) if precision == "bfloat16" else x


def _attention_forward(q, k, v, causal, key_padding_mask, scale, precision):
    """attention_forward on checked C-contiguous inputs."""
    p, lse = _attention_probs(q, k, causal, key_padding_mask, scale, precision, lse=None)
    out = _rounded(p, precision) @ _rounded(v, precision)  # (B, H, T, hs)
    return out, AttentionCache(q, k, v, out, lse, causal, key_padding_mask, scale, precision)


def _attention_probs(q, k, causal, key_padding_mask, scale, precision, lse):
    """Probabilities (B, H, T, S) and the row log-sum-exp; recomputed from `lse` if given."""
    T, S = q.shape[2], k.shape[2]
    scale = q.dtype.type(scale)
    if precision == "bfloat16":  # the kernel's operand: q * scale, rounded
        s = round_to_bf16(q * scale) @ round_to_bf16(k).transpose(0, 1, 3, 2)  # (B, H, T, S)
    else:
        s = (q @ k.transpose(0, 1, 3, 2)) * scale
    allowed = attention_allowed(T, S, causal, key_padding_mask)
    if allowed is not None:
        s = np.where(allowed, s, -np.inf)
    if lse is None:
        m = s.max(axis=-1)  # NaN or +inf in a row make its lse NaN, and so its probabilities
        m = np.where(m == -np.inf, 0.0, m).astype(q.dtype)
        total = np.exp(s - m[..., None]).sum(axis=-1)
        with np.errstate(divide="ignore"):
            lse = (m + np.log(total)).astype(q.dtype)  # -inf where every key is masked
    lse_safe = np.where(lse == -np.inf, np.inf, lse).astype(q.dtype)  # p = 0 where no key is left
    p = np.exp(s - lse_safe[..., None])
    return (p if allowed is None else np.where(allowed, p, 0.0).astype(q.dtype)), lse


@quiet
def attention_backward(ops, dout, cache):
    """Returns (dq, dk, dv)."""
    # forward: p = softmax(q @ k^T * scale + mask); out = p @ v
    return _attention_grads_reference(*attention_grad_inputs(dout, cache))


def _attention_grads_reference(dout, cache):
    """(dq, dk, dv) of attention for a checked dout (B, H, T, hs)."""
    q, k, v, out, lse, causal, key_padding_mask, scale, precision = cache
    p, _ = _attention_probs(q, k, causal, key_padding_mask, scale, precision, lse=lse)
    pr, gr, vr = (_rounded(x, precision) for x in (p, dout, v))  # the products' operands
    dv = pr.transpose(0, 1, 3, 2) @ gr
    dp = gr @ vr.transpose(0, 1, 3, 2)
    D = (dout * out).sum(axis=-1, keepdims=True)  # rowsum(dO * O) = rowsum(P * dP)
    ds = p * (dp - D) * q.dtype.type(scale)
    dsr, kr, qr = (_rounded(x, precision) for x in (ds, k, q))
    dq = dsr @ kr
    dk = dsr.transpose(0, 1, 3, 2) @ qr
    return dq, dk, dv


@quiet
def attention_qkv_forward(ops, qkv, n_heads, causal=True, key_padding_mask=None, scale=None):
    """Self-attention straight from a fused projection, as GPT-2's c_attn makes it.

    qkv (B, T, 3C) holds [q | k | v] along the last axis, head h at columns h*hs:(h+1)*hs of
    each part. Returns (out (B, T, C) with the heads merged back, cache). Same masks and
    lse convention as `attention_forward`, which it is defined by.
    """
    qkv, (B, T, C, hs), kpm, scale = qkv_attention_inputs(qkv, n_heads, causal, key_padding_mask, scale)
    q, k, v = (np.ascontiguousarray(a) for a in qkv.reshape(B, T, 3, n_heads, hs).transpose(2, 0, 3, 1, 4))
    out, cache = _attention_forward(q, k, v, causal, kpm, scale, attention_precision(ops, qkv.dtype, T))
    return out.transpose(0, 2, 1, 3).reshape(B, T, C), cache


@quiet
def attention_qkv_backward(ops, dout, cache):
    """Returns dqkv (B, T, 3C), the gradient of the fused projection."""
    # forward: q, k, v = split(qkv); out = merge(attention(q, k, v))
    dout, cache = qkv_attention_grad_inputs(dout, cache)
    B, H, T, hs = cache[0].shape
    dout = dout.reshape(B, T, H, hs).transpose(0, 2, 1, 3)
    dq, dk, dv = _attention_grads_reference(np.ascontiguousarray(dout), cache)  # dout (B, H, T, hs)
    return np.stack((dq, dk, dv)).transpose(1, 3, 0, 2, 4).reshape(B, T, 3 * H * hs)


# -------------------------------------------------------------------- Numba
# ------------------------------------------------------------------- attention
# One task per (batch, head). Its keys and values are first copied transposed, (hs, S), so that
# every inner loop runs over keys with unit stride and vectorises: scores are axpys over keys,
# the exponentials a loop over keys, and p @ v a dot product over keys per output channel.
# Per-task memory is O(S hs); no (T, S) array exists.

@inline
def _load_transposed(x, b, h, xt):
    """xt (hs, S) = x[b, h].T for a strided x (B, H, S, hs)."""
    S, hs = x.shape[2], x.shape[3]
    for j in range(S):
        for d in range(hs):
            xt[d, j] = x[b, h, j, d]


@inline
def _keys_values_transposed(k, v, b, h):
    """(kt, vt), each (hs, S): k[b, h].T and v[b, h].T in scratch the calling task owns."""
    S, hs = k.shape[2], k.shape[3]
    kt = np.empty((hs, S), k.dtype)
    vt = np.empty((hs, S), k.dtype)
    _load_transposed(k, b, h, kt)
    _load_transposed(v, b, h, vt)
    return kt, vt


@inline
def _scores(qi, kt, n, sc):
    """sc[:n] = qi @ kt[:, :n], looping over keys innermost."""
    F = sc.dtype.type
    for j in range(n):
        sc[j] = F(0.0)
    for d in range(qi.shape[0]):
        qd = qi[d]
        for j in range(n):
            sc[j] += qd * kt[d, j]


@inline
def _softmax_row(sc, last, n, kpm, b, has_mask):
    """p = exp(s - max) in place over the keys j < last of one row of scores sc, zero for
    last <= j < n; returns (max, sum(p)). The sum is 0 when no key is left (then p = 0) and NaN
    when a score is NaN or +inf (then p is NaN at the row's unmasked keys), as in the reference."""
    F = sc.dtype.type
    if has_mask:
        for j in range(last):
            if kpm[b, j]:
                sc[j] = F(-np.inf)
    m = row_max(sc, last)
    return m, exp_row(sc, last, n, m)


@kernel("void(R[:, :, :, :], R[:, :, :, :], R[:, :, :, :], readonly(boolean)[:, ::1], boolean, boolean, F, "
         "F[:, :, :, :], F[:, :, ::1])", serial_twin=True)
def _attention_fwd(q, k, v, kpm, has_mask, causal, scale, out, lse):
    """Per query row: scores against the keys it may see, their max, p = exp(s - max) and
    out = p @ v / sum(p), lse = max + log(sum(p)). q (B, H, T, hs), k and v (B, H, S, hs), any
    strides; writes out (B, H, T, hs) and lse (B, H, T).

    Rows go in pairs that share every load of kt and vt (faster than a row at a time at the tiny,
    small and medium presets); a pair runs over the keys its second row sees, with
    the first row's p zero past its own last key. A last odd row, as decoding's single new
    token, goes alone.

    This is the flash-attention forward with a single key block per row: one row of S scores is
    the only (S,)-sized scratch. An online softmax over smaller key blocks (running max and
    rescaled sums) computed the same values but ran slower: LLVM stopped vectorising the loops
    inside the block loop.
    """
    B, H, T, hs = q.shape
    S = k.shape[2]
    F = q.dtype.type
    for bh in prange(B * H):
        b, h = bh // H, bh % H
        kt, vt = _keys_values_transposed(k, v, b, h)
        qs = np.empty((2, hs), q.dtype)  # q * scale of the pair's rows
        sc = np.empty((2, S), q.dtype)  # scores, then p
        s0, s1 = sc[0], sc[1]
        for i0 in range(0, T, 2):
            rows = min(2, T - i0)
            n = S - T + i0 + rows if causal else S  # the keys the last row of the pair sees
            for r in range(rows):
                for d in range(hs):
                    qs[r, d] = q[b, h, i0 + r, d] * scale
            if rows == 2:
                for j in range(n):
                    s0[j] = F(0.0)
                    s1[j] = F(0.0)
                for d in range(hs):
                    a0, a1 = qs[0, d], qs[1, d]
                    for j in range(n):
                        kd = kt[d, j]
                        s0[j] += a0 * kd
                        s1[j] += a1 * kd
            else:
                _scores(qs[0], kt, n, s0)
            m0, total0 = _softmax_row(s0, n - 1 if causal and rows == 2 else n, n, kpm, b, has_mask)
            m1, total1 = _softmax_row(s1, n, n, kpm, b, has_mask) if rows == 2 else (m0, total0)
            for d in range(hs):
                pv0 = F(0.0)
                pv1 = F(0.0)
                if rows == 2:
                    for j in range(n):
                        vd = vt[d, j]
                        pv0 += s0[j] * vd
                        pv1 += s1[j] * vd
                else:
                    for j in range(n):
                        pv0 += s0[j] * vt[d, j]
                out[b, h, i0, d] = pv0 / total0 if total0 != F(0.0) else F(0.0)
                if rows == 2:
                    out[b, h, i0 + 1, d] = pv1 / total1 if total1 != F(0.0) else F(0.0)
            lse[b, h, i0] = m0 + math.log(total0) if total0 != F(0.0) else F(-np.inf)
            if rows == 2:
                lse[b, h, i0 + 1] = m1 + math.log(total1) if total1 != F(0.0) else F(-np.inf)


@inline
def _grad_row(pr, dsr, gr, out, lse, b, h, i, last, end, scale, kpm, has_mask):
    """Query row i's probabilities and score gradients in place, over the `last` keys it sees:
    pr holds its scores and becomes p = exp(s - lse), dsr holds dp = dout . v_j and becomes
    ds = p * (dp - D) * scale with D = dout . out (gr: the row's dout); both are zero from `last`
    to `end`. last = 0 for a missing row or a query that attended to nothing (its output was a
    constant 0)."""
    F = pr.dtype.type
    L = D = F(0.0)
    if last > 0:
        L = lse[b, h, i]
        for d in range(gr.shape[0]):
            D += gr[d] * out[b, h, i, d]
    _grad_row_of(pr, dsr, L, D, b, last, end, scale, kpm, has_mask)


@inline
def _grad_row_of(pr, dsr, L, D, b, last, end, scale, kpm, has_mask):
    """`_grad_row` given the row's lse L and D = dout . out (read only when last > 0)."""
    F = pr.dtype.type
    if last > 0:
        for j in range(last):
            pj = exp(pr[j] - L)
            pr[j] = pj
            dsr[j] = pj * (dsr[j] - D) * scale
        if has_mask:  # a padded key gets p = ds = 0, even in a row whose lse is NaN
            for j in range(last):
                if kpm[b, j]:
                    pr[j] = F(0.0)
                    dsr[j] = F(0.0)
    for j in range(last, end):
        pr[j] = F(0.0)
        dsr[j] = F(0.0)


@inline
def _keys_seen(lse, b, h, i, present, S, T, causal):
    """The keys query row i sees, 0 for a missing row or a query that attended to nothing."""
    if not present or lse[b, h, i] == lse.dtype.type(-np.inf):
        return 0
    return S - T + i + 1 if causal else S


@kernel("void(R[:, :, :, :], R[:, :, :, :], R[:, :, :, :], R[:, :, :, :], R[:, :, :, :], R[:, :, ::1], "
         "readonly(boolean)[:, ::1], boolean, boolean, F, F[:, :, :, :], F[:, :, :, :], F[:, :, :, :])")
def _attention_bwd(q, k, v, out, dout, lse, kpm, has_mask, causal, scale, dq, dk, dv):
    """Gradients of one (batch, head) per task, two query rows at a time, from probabilities
    recomputed as p = exp(s - lse); dk and dv accumulate (transposed) in buffers the task owns.

    The two rows of a pair share every load of kt, vt, dkt and dvt: faster than a row at a time
    at the tiny and small presets (a row needs 5 loads and 2 stores per 3 multiply-adds
    over keys, a pair 7 and 2 per 6). The pair runs over the keys its second row sees; the
    first row's p and ds are 0 past its own last key, so those keys get exact zeros from it.
    """
    # forward: p = softmax(q k^T * scale + mask); out = p v
    #   dv = p^T dout;  dp = dout v^T;  ds = p * (dp - D) * scale with D = rowsum(dout * out)
    #   dq = ds k;  dk = ds^T q
    B, H, T, hs = q.shape
    S = k.shape[2]
    F = q.dtype.type
    for bh in prange(B * H):
        b, h = bh // H, bh % H
        kt, vt = _keys_values_transposed(k, v, b, h)
        dkt = np.zeros((hs, S), q.dtype)
        dvt = np.zeros((hs, S), q.dtype)
        qr = np.empty((2, hs), q.dtype)  # q of the pair's rows; zeros for a missing second row
        gr = np.empty((2, hs), q.dtype)  # their dout
        p = np.empty((2, S), q.dtype)  # scores, then p
        ds = np.empty((2, S), q.dtype)  # dout_i . v_j, then ds
        p0, p1, ds0, ds1 = p[0], p[1], ds[0], ds[1]
        for i0 in range(0, T, 2):
            rows = min(2, T - i0)
            n = S - T + i0 + rows if causal else S  # the keys the pair's last row sees
            for r in range(2):
                for d in range(hs):
                    qr[r, d] = q[b, h, i0 + r, d] if r < rows else F(0.0)
                    gr[r, d] = dout[b, h, i0 + r, d] if r < rows else F(0.0)
            for j in range(n):
                p0[j] = F(0.0)
                p1[j] = F(0.0)
                ds0[j] = F(0.0)
                ds1[j] = F(0.0)
            for d in range(hs):
                a0, a1 = qr[0, d] * scale, qr[1, d] * scale
                g0, g1 = gr[0, d], gr[1, d]
                for j in range(n):
                    kd, vd = kt[d, j], vt[d, j]
                    p0[j] += a0 * kd
                    p1[j] += a1 * kd
                    ds0[j] += g0 * vd
                    ds1[j] += g1 * vd
            for r in range(2):
                last = _keys_seen(lse, b, h, i0 + r, r < rows, S, T, causal)
                _grad_row(p[r], ds[r], gr[r], out, lse, b, h, i0 + r, last, n, scale, kpm, has_mask)
            for d in range(hs):
                g0, g1, q0, q1 = gr[0, d], gr[1, d], qr[0, d], qr[1, d]
                dq0 = F(0.0)
                dq1 = F(0.0)
                for j in range(n):
                    dvt[d, j] += p0[j] * g0 + p1[j] * g1
                    dkt[d, j] += ds0[j] * q0 + ds1[j] * q1
                    kd = kt[d, j]
                    dq0 += ds0[j] * kd
                    dq1 += ds1[j] * kd
                dq[b, h, i0, d] = dq0
                if rows == 2:
                    dq[b, h, i0 + 1, d] = dq1
        for j in range(S):
            for d in range(hs):
                dk[b, h, j, d] = dkt[d, j]
                dv[b, h, j, d] = dvt[d, j]


# float32 heads of a multiple of 32 channels (every preset's and GPT-2's) run on register tiles
# instead (kernels/_tiles.py, "f32"): scores, p @ v and the backward's five products as 8 x 32
# tiles summed in registers, where the row kernels above load and store a row of scores for
# every channel. Rows of queries go in blocks (8 forward, 32 backward: the backward's dk and dv
# sum over a block's rows); the causal mask and the softmax are the row kernels' own.
QUERY_BLOCK = 32  # query rows of a backward block


HEAD_TASKS = 64  # tasks the heads go in, each allocating its scratch once for all of its heads (at
# the presets' lengths a head's products take microseconds, and scratch made anew per head was a
# measurable part of the kernels)


@inline
def _head_range(task, tasks, BH):
    """The heads (b * H + h) of task `task` of `tasks`."""
    return range(task * BH // tasks, (task + 1) * BH // tasks)


UNIT_FLOATS = 1 << 15  # of one operand of a float32 tile task's heads (128 KiB): a task takes
# a batch row's heads together up to this size, one head past it


@inline
def _head_units(B, H, T, hs):
    """(G, U): a float32 tile task (a unit) takes G adjacent heads of one batch row, U units a row.
    All of a row's heads at once where they are small and the batch gives the threads enough units
    (16 rows or more), fewer where there are fewer rows to share out."""
    G = min(H, max(1, UNIT_FLOATS // max(T * hs, 1)))
    if B < 16:
        G = min(G, max(1, H * B // 16))
    return G, (H + G - 1) // G


@inline
def _stage(x, b, h0, gn, scale, xs):
    """xs[g, t] = x[b, h0 + g, t] * scale for g < gn and every row t (x's channels adjacent, a
    multiple of 16), read row by row across the unit's heads. Rows of a fused QKV projection lie
    3C floats apart with a batch row's heads side by side in them: read a head at a time, every
    row is a cache miss that no prefetcher foresees (the tiles ran slower than on contiguous
    heads at C = 256); read so, the unit's rows stream in order."""
    sb, sh, st = x.strides[0] // 4, x.strides[1] // 4, x.strides[2] // 4
    T, hs = x.shape[2], x.shape[3]
    for t in range(T):
        for g in range(gn):
            scaled_copy(x, b * sb + (h0 + g) * sh + t * st, xs, (g * xs.shape[1] + t) * hs, hs, scale)


@inline
def _transpose_heads(xs, gn, n, xt):
    """xt[g, :, t] = xs[g, t] for g < gn, t < n."""
    for g in range(gn):
        for t in range(n):
            for d in range(xs.shape[2]):
                xt[g, d, t] = xs[g, t, d]


@inline
def _query_block(i0, QB, T, S, causal):
    """(rows, n, nt, tiles) of a backward block of QB query rows from row i0: its rows (fewer past
    T), the keys its last row sees, those rounded up to tiles of 32, and its tiles of 8 rows."""
    rows = min(QB, T - i0)
    n = S - T + i0 + rows if causal else S
    return rows, n, (n + TILE_N - 1) // TILE_N * TILE_N, (rows + TILE_M - 1) // TILE_M


@inline
def _load_block(q, dout, b, h, i0, rows, scale, qr, qs, g):
    """qr, qs and g (QB, hs) = q, q * scale and dout of the block's rows i0 .. i0 + QB - 1 of head
    (b, h), zero from its `rows` on (past T)."""
    F = qr.dtype.type
    for r in range(qr.shape[0]):
        for d in range(qr.shape[1]):
            x = q[b, h, i0 + r, d] if r < rows else F(0.0)
            qr[r, d] = x
            qs[r, d] = x * scale
            g[r, d] = dout[b, h, i0 + r, d] if r < rows else F(0.0)


@inline
def _store_tile_rows(acc, x, b, h, i0, rows, c0):
    """x[b, h, i0 + r, c0:c0 + 32] = acc[r] for the tile's first `rows` rows."""
    for r in range(rows):
        for c in range(TILE_N):
            x[b, h, i0 + r, c0 + c] = acc[r, c]


@inline
def _store_head(dka, dva, b, h, dk, dv):
    """dk[b, h] and dv[b, h] from the sums (>= S, hs) a task kept for the head."""
    for j in range(dk.shape[2]):
        for d in range(dk.shape[3]):
            dk[b, h, j, d] = dka[j, d]
            dv[b, h, j, d] = dva[j, d]


@kernel("void(R[:, :, :, :], R[:, :, :, :], R[:, :, :, :], readonly(boolean)[:, ::1], boolean, boolean, F, "
        "F[:, :, :, :], F[:, :, ::1])", serial_twin=True, floats=("float32",))
def _attention_fwd_tiles(q, k, v, kpm, has_mask, causal, scale, out, lse):
    """`_attention_fwd` on register tiles, a unit of heads (`_head_units`) per task, staged first,
    then 8 query rows at a time: their scores against the keys the block's last row sees (tiles
    of 32 keys), the softmax of each row, then p @ v tile by tile of 32 channels."""
    B, H, T, hs = q.shape
    S = k.shape[2]
    F = q.dtype.type
    Sp = (S + TILE_N - 1) // TILE_N * TILE_N
    Tp = (T + TILE_M - 1) // TILE_M * TILE_M
    G, U = _head_units(B, H, max(T, S), hs)
    zero = np.zeros(TILE_N, np.float32)
    for unit in prange(B * U):
        b, h0 = unit // U, unit % U * G
        gn = min(G, H - h0)
        qa = np.empty((G, Tp, hs), np.float32)  # q * scale, zero past T
        kt = np.empty((G, hs, Sp), np.float32)  # k.T, zero past S
        vc = np.empty((G, S, hs), np.float32)  # v, then k
        qa[:, T:] = 0.0
        kt[:, :, S:] = 0.0
        _stage(k, b, h0, gn, F(1.0), vc)
        _transpose_heads(vc, gn, S, kt)
        _stage(q, b, h0, gn, scale, qa)
        _stage(v, b, h0, gn, F(1.0), vc)
        sc = np.empty((TILE_M, Sp), np.float32)  # scores, then p
        acc = np.empty((TILE_M, TILE_N), np.float32)
        mx = np.empty(TILE_M, np.float32)
        total = np.empty(TILE_M, np.float32)
        for g in range(gn):
            h = h0 + g
            for i0 in range(0, T, TILE_M):
                rows = min(TILE_M, T - i0)
                n = S - T + i0 + rows if causal else S  # the keys the block's last row sees
                for j0 in range(0, n, TILE_N):
                    f32_tile_into(qa, (g * Tp + i0) * hs, hs, 1, kt, g * hs * Sp + j0, Sp, hs, sc, j0, Sp, zero, 0,
                                  False)
                for r in range(rows):
                    last = S - T + i0 + r + 1 if causal else S
                    mx[r], total[r] = _softmax_row(sc[r], last, n, kpm, b, has_mask)
                for c0 in range(0, hs, TILE_N):
                    f32_tile(sc, 0, Sp, 1, vc, g * S * hs + c0, hs, n, acc)
                    for r in range(rows):
                        t = total[r]
                        for c in range(TILE_N):
                            out[b, h, i0 + r, c0 + c] = acc[r, c] / t if t != F(0.0) else F(0.0)
                for r in range(rows):
                    lse[b, h, i0 + r] = mx[r] + math.log(total[r]) if total[r] != F(0.0) else F(-np.inf)


@kernel("void(R[:, :, :, :], R[:, :, :, :], R[:, :, :, :], R[:, :, :, :], R[:, :, :, :], R[:, :, ::1], "
        "readonly(boolean)[:, ::1], boolean, boolean, F, F[:, :, :, :], F[:, :, :, :], F[:, :, :, :])",
        floats=("float32",))
def _attention_bwd_tiles(q, k, v, out, dout, lse, kpm, has_mask, causal, scale, dq, dk, dv):
    """`_attention_bwd` on register tiles, a unit of heads per task (staged first, as the forward
    stages them), QUERY_BLOCK query rows at a time: scores s = q k^T and dp = dout v^T as tiles,
    p and ds per row as the row kernel makes them, then dq = ds k, and dk += ds^T q, dv += p^T dout
    summed over the block's rows in tiles of 8 keys into buffers the task owns."""
    B, H, T, hs = q.shape
    S = k.shape[2]
    F = q.dtype.type
    QB = QUERY_BLOCK
    Sp = (S + TILE_N - 1) // TILE_N * TILE_N
    Tp = (T + QB - 1) // QB * QB
    G, U = _head_units(B, H, max(T, S), hs)
    zero = np.zeros(TILE_N, np.float32)
    for unit in prange(B * U):
        b, h0 = unit // U, unit % U * G
        gn = min(G, H - h0)
        qa = np.empty((G, Tp, hs), np.float32)  # q, q * scale and dout; zero past T
        qsa = np.empty((G, Tp, hs), np.float32)  # (out first, for D)
        ga = np.empty((G, Tp, hs), np.float32)
        Da = np.empty((G, T), np.float32)  # D = dout . out of each row
        kt = np.empty((G, hs, Sp), np.float32)  # k.T and v.T, zero past S
        vt = np.empty((G, hs, Sp), np.float32)
        kc = np.empty((G, S, hs), np.float32)  # k
        qa[:, T:] = 0.0
        qsa[:, T:] = 0.0
        ga[:, T:] = 0.0
        kt[:, :, S:] = 0.0
        vt[:, :, S:] = 0.0
        _stage(dout, b, h0, gn, F(1.0), ga)
        _stage(out, b, h0, gn, F(1.0), qsa)
        for g in range(gn):
            for t in range(T):
                D = F(0.0)
                for d in range(hs):
                    D += ga[g, t, d] * qsa[g, t, d]
                Da[g, t] = D
        _stage(q, b, h0, gn, F(1.0), qa)
        _stage(q, b, h0, gn, scale, qsa)
        _stage(v, b, h0, gn, F(1.0), kc)
        _transpose_heads(kc, gn, S, vt)
        _stage(k, b, h0, gn, F(1.0), kc)
        _transpose_heads(kc, gn, S, kt)
        dka = np.empty((Sp, hs), np.float32)  # dk[b, h] and dv[b, h], summed over the blocks
        dva = np.empty((Sp, hs), np.float32)
        p = np.empty((QB, Sp), np.float32)  # scores, then p
        ds = np.empty((QB, Sp), np.float32)  # dp, then ds
        acc = np.empty((TILE_M, TILE_N), np.float32)
        for g in range(gn):
            h = h0 + g
            dka[...] = 0.0
            dva[...] = 0.0
            for i0 in range(0, T, QB):
                rows, n, nt, tiles = _query_block(i0, QB, T, S, causal)
                at = (g * Tp + i0) * hs  # the block's first row in qa, qsa and ga
                for t in range(tiles):
                    for j0 in range(0, n, TILE_N):
                        f32_tile_into(qsa, at + t * TILE_M * hs, hs, 1, kt, g * hs * Sp + j0, Sp, hs, p,
                                      t * TILE_M * Sp + j0, Sp, zero, 0, False)
                        f32_tile_into(ga, at + t * TILE_M * hs, hs, 1, vt, g * hs * Sp + j0, Sp, hs, ds,
                                      t * TILE_M * Sp + j0, Sp, zero, 0, False)
                for r in range(QB):
                    last = _keys_seen(lse, b, h, i0 + r, r < rows, S, T, causal)
                    L, D = (lse[b, h, i0 + r], Da[g, i0 + r]) if last > 0 else (F(0.0), F(0.0))
                    _grad_row_of(p[r], ds[r], L, D, b, last, nt, scale, kpm, has_mask)
                for t in range(tiles):  # dq = ds k
                    for c0 in range(0, hs, TILE_N):
                        f32_tile(ds, t * TILE_M * Sp, Sp, 1, kc, g * S * hs + c0, hs, n, acc)
                        _store_tile_rows(acc, dq, b, h, i0 + t * TILE_M, min(TILE_M, rows - t * TILE_M), c0)
                for j0 in range(0, n, TILE_M):  # dv += p^T dout, dk += ds^T q: 8 keys by 32 channels a tile
                    for c0 in range(0, hs, TILE_N):
                        f32_tile_into(p, j0, 1, Sp, ga, at + c0, hs, QB, dva, j0 * hs + c0, hs, zero, 0, True)
                        f32_tile_into(ds, j0, 1, Sp, qa, at + c0, hs, QB, dka, j0 * hs + c0, hs, zero, 0, True)
            _store_head(dka, dva, b, h, dk, dv)


# In bfloat16 the same blocks run on the bf16 tile, whose operands are words of two bfloat16
# values along the sum of their product (gemm_bf16.py's layout; round to nearest even). So each
# operand is packed once with its pairs along the axis its product sums over: the channels for
# the scores and dp, the keys for p @ v and dq, the block's query rows for dv and dk. k and v are
# packed per head, q and dout per block, p and ds as their rows are made.
@inline
def _pack_channels(x, b, h, xt, xw):
    """xw (hs / 2, >= S) = x[b, h].T (x (B, H, S, hs), any strides) as words of channel pairs:
    xw[dd, j] = (x[b, h, j, 2dd], x[b, h, j, 2dd + 1]); columns past S are left as they are. Through
    xt (hs, >= S) float32 scratch: the transposing copy, then pairs of its rows in loops over keys
    that vectorise (pairing a row's neighbours would write xw a column at a time)."""
    S = x.shape[2]
    _load_transposed(x, b, h, xt)
    _pack_row_pairs(xt, xw, S)


@inline
def _pack_keys(x, b, h, xw):
    """xw (>= S / 2, hs) = x[b, h] as words of key pairs: xw[jj, c] = (x[b, h, 2jj, c],
    x[b, h, 2jj + 1, c]), zero past S."""
    S, hs = x.shape[2], x.shape[3]
    F = x.dtype.type
    for jj in range(xw.shape[0]):
        j = 2 * jj
        if j + 1 < S:
            for c in range(hs):
                xw[jj, c] = _pair(x[b, h, j, c], x[b, h, j + 1, c])
        elif j < S:
            for c in range(hs):
                xw[jj, c] = _pair(x[b, h, j, c], F(0.0))
        else:
            for c in range(hs):
                xw[jj, c] = 0


@inline
def _pack_row_pairs(x, xw, n):
    """xw[ii, j] = (x[2ii, j], x[2ii + 1, j]) for j < n: pairs down the rows of x (2 * rows, >= n)."""
    for ii in range(xw.shape[0]):
        for j in range(n):
            xw[ii, j] = _pair(x[2 * ii, j], x[2 * ii + 1, j])


@kernel("void(R[:, :, :, :], R[:, :, :, :], R[:, :, :, :], readonly(boolean)[:, ::1], boolean, boolean, F, "
        "F[:, :, :, :], F[:, :, ::1])", serial_twin=True, floats=("float32",))
def _attention_fwd_bf16(q, k, v, kpm, has_mask, causal, scale, out, lse):
    """`_attention_fwd_tiles` on the bfloat16 tile: scores = r(q * scale) r(k)^T, the float32
    softmax of each row, then its p normalised, rounded and paired along the keys as it is
    made, and out = r(p) r(v). Compiled only on a CPU with AVX-512 BF16."""
    B, H, T, hs = q.shape
    S = k.shape[2]
    F = q.dtype.type
    Sp = (S + TILE_N - 1) // TILE_N * TILE_N
    H2, S2 = hs // 2, Sp // 2
    zero = np.zeros(TILE_N, np.float32)
    tasks = min(B * H, HEAD_TASKS)
    for task in prange(tasks):
        kw = np.zeros((H2, Sp), np.uint32)  # k[b, h].T, pairs of channels, zero past S
        vw = np.empty((S2, hs), np.uint32)  # v[b, h], pairs of keys, zero past S
        kt = np.empty((hs, S), np.float32)
        qs = np.zeros((TILE_M, hs), np.float32)  # q * scale of the block's rows
        qw = np.empty((TILE_M, H2), np.uint32)  # ... paired along the channels
        sc = np.empty((TILE_M, Sp), np.float32)  # scores, then p
        pw = np.zeros((TILE_M, S2), np.uint32)  # p, pairs of keys
        tmp = np.empty(max(Sp, TILE_M * hs), np.uint32)
        acc = np.empty((TILE_M, TILE_N), np.float32)
        for bh in _head_range(task, tasks, B * H):
            b, h = bh // H, bh % H
            _pack_channels(k, b, h, kt, kw)
            _pack_keys(v, b, h, vw)
            for i0 in range(0, T, TILE_M):
                rows = min(TILE_M, T - i0)  # the tile's rows past T: whatever, never written out
                n = S - T + i0 + rows if causal else S  # the keys the block's last row sees
                n2 = (n + 1) // 2
                for r in range(rows):
                    for d in range(hs):
                        qs[r, d] = q[b, h, i0 + r, d] * scale
                _pairs_along_row(qs.reshape(TILE_M * hs), qw.reshape(TILE_M * H2), tmp)  # hs even: within rows
                for j0 in range(0, n, TILE_N):
                    bf16_tile_into(qw, 0, H2, 1, kw, j0, Sp, H2, sc, j0, Sp, zero, 0, False)
                for r in range(rows):
                    last = S - T + i0 + r + 1 if causal else S
                    mx, total = _softmax_row(sc[r], last, n, kpm, b, has_mask)
                    inv = F(1.0) / total if total != F(0.0) else F(0.0)
                    _scaled_pairs_along_row(sc[r, :n], inv, pw[r, :n2], tmp)  # p normalised, rounded, paired
                    lse[b, h, i0 + r] = mx + math.log(total) if total != F(0.0) else F(-np.inf)
                for c0 in range(0, hs, TILE_N):
                    bf16_tile(pw, 0, S2, 1, vw, c0, hs, n2, acc)
                    _store_tile_rows(acc, out, b, h, i0, rows, c0)


@kernel("void(R[:, :, :, :], R[:, :, :, :], R[:, :, :, :], R[:, :, :, :], R[:, :, :, :], R[:, :, ::1], "
        "readonly(boolean)[:, ::1], boolean, boolean, F, F[:, :, :, :], F[:, :, :, :], F[:, :, :, :])",
        floats=("float32",))
def _attention_bwd_bf16(q, k, v, out, dout, lse, kpm, has_mask, causal, scale, dq, dk, dv):
    """`_attention_bwd_tiles` on the bfloat16 tile: s = r(q * scale) r(k)^T, dp = r(dout) r(v)^T,
    p and ds per row in float32 as the row kernel makes them, then dq = r(ds) r(k), and
    dv += r(p)^T r(dout), dk += r(ds)^T r(q) summed over the block's rows (pairs of rows along
    the sum). Compiled only on a CPU with AVX-512 BF16."""
    B, H, T, hs = q.shape
    S = k.shape[2]
    Sp = (S + TILE_N - 1) // TILE_N * TILE_N
    H2, S2 = hs // 2, Sp // 2
    zero = np.zeros(TILE_N, np.float32)
    QB, Q2 = QUERY_BLOCK, QUERY_BLOCK // 2
    tasks = min(B * H, HEAD_TASKS)
    for task in prange(tasks):
        kw = np.zeros((H2, Sp), np.uint32)  # k[b, h].T and v[b, h].T, pairs of channels, zero past S
        vw = np.zeros((H2, Sp), np.uint32)
        kk = np.empty((S2, hs), np.uint32)  # k[b, h], pairs of keys
        xt = np.empty((hs, S), np.float32)
        dka = np.empty((Sp, hs), np.float32)  # dk[b, h] and dv[b, h], summed over the blocks
        dva = np.empty((Sp, hs), np.float32)
        qr = np.empty((QB, hs), np.float32)  # the block's q, q * scale and dout; zero past T
        qs = np.empty((QB, hs), np.float32)
        g = np.empty((QB, hs), np.float32)
        qsw = np.empty((QB, H2), np.uint32)  # q * scale and dout, pairs of channels
        gw = np.empty((QB, H2), np.uint32)
        qt = np.empty((Q2, hs), np.uint32)  # q and dout, pairs of rows
        gt = np.empty((Q2, hs), np.uint32)
        p = np.empty((QB, Sp), np.float32)  # scores, then p
        ds = np.empty((QB, Sp), np.float32)  # dp, then ds
        dsw = np.empty((QB, S2), np.uint32)  # ds, pairs of keys
        pt = np.empty((Q2, Sp), np.uint32)  # p and ds, pairs of rows
        dst = np.empty((Q2, Sp), np.uint32)
        tmp = np.empty(max(Sp, QB * hs), np.uint32)
        acc = np.empty((TILE_M, TILE_N), np.float32)
        for bh in _head_range(task, tasks, B * H):
            b, h = bh // H, bh % H
            _pack_channels(k, b, h, xt, kw)
            _pack_channels(v, b, h, xt, vw)
            _pack_keys(k, b, h, kk)
            dka[...] = 0.0
            dva[...] = 0.0
            for i0 in range(0, T, QB):
                rows, n, nt, tiles = _query_block(i0, QB, T, S, causal)
                n2 = (n + 1) // 2
                _load_block(q, dout, b, h, i0, rows, scale, qr, qs, g)
                _pairs_along_row(qs.reshape(QB * hs), qsw.reshape(QB * H2), tmp)  # hs even: pairs within rows
                _pairs_along_row(g.reshape(QB * hs), gw.reshape(QB * H2), tmp)
                _pack_row_pairs(qr, qt, hs)
                _pack_row_pairs(g, gt, hs)
                for t in range(tiles):
                    for j0 in range(0, n, TILE_N):
                        bf16_tile_into(qsw, t * TILE_M * H2, H2, 1, kw, j0, Sp, H2, p, t * TILE_M * Sp + j0, Sp,
                                       zero, 0, False)
                        bf16_tile_into(gw, t * TILE_M * H2, H2, 1, vw, j0, Sp, H2, ds, t * TILE_M * Sp + j0, Sp,
                                       zero, 0, False)
                for r in range(QB):
                    last = _keys_seen(lse, b, h, i0 + r, r < rows, S, T, causal)
                    _grad_row(p[r], ds[r], g[r], out, lse, b, h, i0 + r, last, nt, scale, kpm, has_mask)
                    _pairs_along_row(ds[r, :nt], dsw[r, :nt // 2], tmp)
                _pack_row_pairs(p, pt, nt)
                _pack_row_pairs(ds, dst, nt)
                for t in range(tiles):  # dq = ds k
                    for c0 in range(0, hs, TILE_N):
                        bf16_tile(dsw, t * TILE_M * S2, S2, 1, kk, c0, hs, n2, acc)
                        _store_tile_rows(acc, dq, b, h, i0 + t * TILE_M, min(TILE_M, rows - t * TILE_M), c0)
                for j0 in range(0, n, TILE_M):  # dv += p^T dout, dk += ds^T q: 8 keys by 32 channels a tile
                    for c0 in range(0, hs, TILE_N):
                        bf16_tile_into(pt, j0, 1, Sp, gt, c0, hs, Q2, dva, j0 * hs + c0, hs, zero, 0, True)
                        bf16_tile_into(dst, j0, 1, Sp, qt, c0, hs, Q2, dka, j0 * hs + c0, hs, zero, 0, True)
            _store_head(dka, dva, b, h, dk, dv)


def _tile_kernels(precision):
    """(forward, backward) on the register tiles of `precision`; bfloat16's only where the CPU
    has AVX-512 BF16 (refused in one line elsewhere: LLVM would abort the process)."""
    if precision == "bfloat16":
        require_bf16()
        return _attention_fwd_bf16, _attention_bwd_bf16
    return _attention_fwd_tiles, _attention_bwd_tiles


def _on_tiles(q, *channels_adjacent):
    """Whether attention on these arrays runs on the register tiles: compiled kernels, float32,
    heads of a multiple of 32 channels, and the arrays the tiles read by rows with adjacent
    channels."""
    return (tiles_run() and q.dtype == np.float32 and q.shape[3] % TILE_N == 0 and q.shape[3] > 0
            and all(a.strides[3] == 4 and all(s % 4 == 0 for s in a.strides) for a in channels_adjacent))


def attention_forward_numba(ops, q, k, v, causal=False, key_padding_mask=None, scale=None):
    q, k, v, key_padding_mask, scale = attention_inputs(q, k, v, causal, key_padding_mask, scale)
    precision = attention_precision(ops, q.dtype, q.shape[2])
    out = np.empty_like(q)  # (B, H, T, hs)
    lse = _attention(ops, q, k, v, causal, key_padding_mask, scale, precision, out)
    return out, AttentionCache(q, k, v, out, lse, causal, key_padding_mask, scale, precision)


def attention_qkv_forward_numba(ops, qkv, n_heads, causal=True, key_padding_mask=None, scale=None):
    qkv, (B, T, C, hs), key_padding_mask, scale = qkv_attention_inputs(qkv, n_heads, causal, key_padding_mask,
                                                                       scale)
    # strided (B, H, T, hs) views: the kernel reads the heads in place, no split copy
    q, k, v = qkv.reshape(B, T, 3, n_heads, hs).transpose(2, 0, 3, 1, 4)
    out = np.empty((B, T, C), qkv.dtype)  # written head by head through a (B, H, T, hs) view
    out_heads = out.reshape(B, T, n_heads, hs).transpose(0, 2, 1, 3)
    precision = attention_precision(ops, qkv.dtype, T)
    lse = _attention(ops, q, k, v, causal, key_padding_mask, scale, precision, out_heads)
    return out, AttentionCache(q, k, v, out_heads, lse, causal, key_padding_mask, scale, precision)


def _attention(ops, q, k, v, causal, key_padding_mask, scale, precision, out):
    """Run the forward kernel into `out` (B, H, T, hs), its products in `precision` where it has
    any in that precision (the row kernels multiply in the dtype's); returns lse (B, H, T)."""
    B, H, T, hs = q.shape
    if q.size == 0 or k.shape[2] == 0:
        out[...] = 0.0
        return np.full((B, H, T), -np.inf, q.dtype)
    tiles = _on_tiles(q, k, v)
    if T >= ATTENTION_TILED_FROM and not tiles:
        return attention_tiled(ops, q, k, v, causal, key_padding_mask, scale, precision, out)
    lse = np.empty((B, H, T), q.dtype)
    kpm = key_padding_mask if key_padding_mask is not None else np.zeros((B, k.shape[2]), bool)
    kernel = _tile_kernels(precision)[0] if tiles else _attention_fwd
    sized(kernel, q.size + k.size)(q, k, v, np.ascontiguousarray(kpm), key_padding_mask is not None,
                                   bool(causal), q.dtype.type(scale), out, lse)
    return lse


def attention_backward_numba(ops, dout, cache):
    dout, cache = attention_grad_inputs(dout, cache)
    dq, dk, dv = (np.empty_like(a) for a in cache[:3])
    _attention_grads(ops, dout, cache, dq, dk, dv)
    return dq, dk, dv


def attention_qkv_backward_numba(ops, dout, cache):
    dout, cache = qkv_attention_grad_inputs(dout, cache)
    q = cache[0]
    B, H, T, hs = q.shape
    dqkv = np.empty((B, T, 3 * H * hs), q.dtype)
    dq, dk, dv = dqkv.reshape(B, T, 3, H, hs).transpose(2, 0, 3, 1, 4)
    _attention_grads(ops, dout.reshape(B, T, H, hs).transpose(0, 2, 1, 3), cache, dq, dk, dv)
    return dqkv


def _attention_grads(ops, dout, cache, dq, dk, dv):
    """Run the backward kernel, writing every entry of dq, dk, dv (any strides); the cache as
    attention_cache returns it."""
    q, k, v, out, lse, causal, key_padding_mask, scale, precision = cache
    if q.size == 0 or k.shape[2] == 0:
        dq[...] = 0.0
        dk[...] = 0.0
        dv[...] = 0.0
        return
    tiles = _on_tiles(q, k, v, out, dout)
    if q.shape[2] >= ATTENTION_TILED_FROM and not tiles:
        return attention_tiled_grads(ops, dout, cache, dq, dk, dv)
    B, S = q.shape[0], k.shape[2]
    kpm = key_padding_mask if key_padding_mask is not None else np.zeros((B, S), bool)
    kernel = _tile_kernels(precision)[1] if tiles else _attention_bwd
    kernel(q, k, v, out, dout, lse, np.ascontiguousarray(kpm), key_padding_mask is not None, bool(causal),
           q.dtype.type(scale), dq, dk, dv)
