"""The jitted kernels of the Numba backend: private functions that fill preallocated arrays.

Nothing here validates anything: the wrappers in numba_ops.py check dtypes, shapes, ids and
contiguity (fastformer.kernels.checks), allocate the outputs and call these; an index a kernel
reads is one the checks bounded. Each kernel is compiled for exactly two signatures, float32
and float64 (`_sigs`; float64 at the first call with float64 arrays, see `compile_float64`),
in which the arrays a kernel only reads are read-only types, so read-only arrays
(np.memmap(mode="r"), np.frombuffer) are used in place, and writeable ones convert to them.
The flags are set once in `_kernel`; compiled code is cached on disk, so only the first process
on a machine pays for the compilation.

Parallel kernels split rows (or (batch, head) pairs) over threads with `prange`; a reduction over
rows (a weight or bias gradient) is summed per chunk of rows into `part[chunk]` and the few
chunks are added by the wrapper, so no two threads write one location and the result does not
depend on the thread count. No kernel calls BLAS.

Shape letters: N rows, C channels, B batch, H heads, T query length, S key length, hs head size.
"""

import math
import types as types_

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic, overload

from fastformer.kernels.numpy_ops import GPT2_LAYER_SLOTS  # the layout of PackedGPT2.offsets

SLOTS = len(GPT2_LAYER_SLOTS)

# Fast-math without "nnan" and "ninf": LLVM may reassociate sums (so reductions vectorise) and
# fuse multiply-adds, while -inf (masked attention scores) and NaN keep their IEEE meaning, so
# that the NaN rules of numpy_ops hold here too (tests/kernels/test_kernel_nan.py). "arcp" lets
# a float32 1 / sqrt(x) become an estimate that is NaN at x = 0 and x = inf: write sqrt(1 / x).
FASTMATH = {"nsz", "arcp", "contract", "reassoc"}
FLOAT_TYPES = ("float32", "float64")


class _ReadOnly:
    """`readonly(int64)[::1]` in a signature: the array type of an input the kernel only reads.
    A read-only array matches it and a writeable one converts to it."""

    def __init__(self, dtype):
        self.dtype = dtype

    def __getitem__(self, index):
        return self.dtype[index].copy(readonly=True)


def _sigs(template):
    """The float32 and the float64 signature of a kernel: `template` with F replaced by the float
    type and R by the same type read-only (an input array the kernel never writes), evaluated
    with Numba's type names as Numba evaluates a signature string."""
    names = {**vars(types), "readonly": _ReadOnly}
    return [eval(template.replace("R", "readonly(F)").replace("F", f), names) for f in FLOAT_TYPES]


_KERNELS = []  # every _Kernel, for compile_float64
_float64_ready = False
_JIT_FLAGS = dict(cache=True, fastmath=FASTMATH, error_model="numpy", nogil=True)


class _Kernel:
    """A jitted kernel made at its first call: compiled for float32 then (or loaded from the disk
    cache), and for float64 as well once `compile_float64` has run, which the first call with
    float64 arrays does. No other type ever compiles, and a program compiles only the kernels it
    calls: `fastformer generate` never waits for the backward kernels, nor a language model for
    the encoder-decoder's ReLU."""

    def __init__(self, fn, template, parallel):
        self.py_func, self.__name__ = fn, fn.__name__
        self.sig32, self.sig64 = _sigs(template)
        self.parallel = parallel
        self.dispatcher = None
        _KERNELS.append(self)

    def jit(self):
        """The Numba dispatcher, made (compiled or loaded from the disk cache) on the first
        call, and again with float64 by compile_float64."""
        sigs = [self.sig32, self.sig64] if _float64_ready else [self.sig32]
        self.dispatcher = numba.njit(sigs, parallel=self.parallel, **_JIT_FLAGS)(self.py_func)
        return self.dispatcher

    def __call__(self, *args):
        dispatcher = self.dispatcher or self.jit()
        try:
            return dispatcher(*args)
        except TypeError:  # no signature matches: float64 arrays before compile_float64, or a bad type
            if _float64_ready or not any(getattr(a, "dtype", None) == np.float64 for a in args):
                raise
            compile_float64()
            return self.dispatcher(*args)


def compile_float64():
    """Add the float64 signature to every kernel made so far (loaded from the disk cache, or
    compiled), once; kernels made later get it with their float32 one. float64 (gradient
    checks, tests) waits for the first kernel call with float64 arrays. Other types never
    compile."""
    global _float64_ready
    if _float64_ready or numba.config.DISABLE_JIT:  # without the JIT the kernels are plain functions
        return
    _float64_ready = True
    for kernel in _KERNELS:
        if kernel.dispatcher is not None:
            kernel.jit()


def _kernel(template, parallel=True, serial_twin=False):
    """Make `fn` a `_Kernel` with the float32 and float64 signatures of `template`.

    With `serial_twin`, the same function also becomes a kernel without threads (prange runs as
    range) for `sized()` to pick on small inputs: starting a parallel region costs about 50 us
    here, far more than a decoding step's single row of work.
    """
    def make(fn):
        if serial_twin:
            twin = types_.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial")
            twin.__qualname__ = fn.__qualname__ + "_serial"  # its own entry in the disk cache
            _SERIAL[fn.__name__] = _Kernel(twin, template, parallel=False)
        return _Kernel(fn, template, parallel)

    return make


_SERIAL = {}  # kernel name -> its serial twin
SMALL_WORK = 1 << 14  # elements below which a kernel with a serial twin runs it


def sized(kernel, work):
    """`kernel`, or its serial twin when `work` (elements touched) is small."""
    return _SERIAL.get(kernel.__name__, kernel) if work < SMALL_WORK else kernel


def serial(kernel):
    """The serial twin of `kernel`, for a caller that runs it on threads of its own."""
    return _SERIAL[kernel.__name__]



_inline = numba.njit(inline="always", fastmath=FASTMATH, error_model="numpy")


# ------------------------------------------------------------------ vector math
# libm's expf and tanhf are scalar calls that stop LLVM from vectorising a loop (tanhf costs
# 14 ns an element here). For float32 the kernels use the polynomial below (Cephes' expf,
# within 1 ulp, 0.4 ns an element), which vectorises, and build tanh from it; float64 keeps
# math.exp.

@intrinsic
def _int32_bits_as_float32(typingctx, i):
    """Reinterpret the 32 bits of an int32 as a float32 (builds 2**k from its exponent bits)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


def _exp_f32(x):
    # exp(x) = 2**k * exp(r) with k = round(x / ln 2), |r| <= ln(2) / 2. Exact 0 below -87.3
    # (so exp(-inf) = 0); the kernels only ever pass x <= 0.
    xc = min(max(x, np.float32(-87.3)), np.float32(88.3))
    k = np.floor(xc * np.float32(1.4426950408889634) + np.float32(0.5))
    r = xc - k * np.float32(0.693359375) + k * np.float32(2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * (r * r) + r + np.float32(1.0)
    y = p * _int32_bits_as_float32((np.int32(k) + np.int32(127)) << 23)
    return y * np.float32(x >= np.float32(-87.3))  # a select, not a branch: keeps loops vectorised


def _exp(x):
    """exp(x); with NUMBA_DISABLE_JIT this plain function runs, jitted code uses the overload."""
    return math.exp(x)


@overload(_exp, inline="always")
def _exp_overload(x):
    return _exp_f32 if x == types.float32 else (lambda x: math.exp(x))


@_inline
def _row_max(x, n):
    """max(x[0:n]), -inf when n is 0: eight running maxima, so that eight comparisons are in
    flight instead of one chain (four times faster here on a 4096-wide row, the vocabulary's).
    A NaN is skipped like the plain loop from -inf skips it; the exp of x - max then makes it
    NaN wherever it was."""
    F = x.dtype.type
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = F(-np.inf)
    c = 0
    while c + 8 <= n:
        m0, m1, m2, m3 = max(m0, x[c]), max(m1, x[c + 1]), max(m2, x[c + 2]), max(m3, x[c + 3])
        m4, m5, m6, m7 = max(m4, x[c + 4]), max(m5, x[c + 5]), max(m6, x[c + 6]), max(m7, x[c + 7])
        c += 8
    m = max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))
    while c < n:
        m = max(m, x[c])
        c += 1
    return m


# --------------------------------------------------------------------- softmax
@_kernel("void(R[:, ::1], F[:, ::1])")
def _softmax_fwd(x, y):
    N, C = x.shape
    F = x.dtype.type
    for n in prange(N):
        m = _row_max(x[n], C)  # +inf when the row holds one: exp(inf - inf) below is NaN
        if m == F(-np.inf):  # an all -inf row: every exp below is exactly 0
            m = F(0.0)
        s = F(0.0)
        for c in range(C):
            e = _exp(x[n, c] - m)
            y[n, c] = e
            s += e
        inv = F(1.0) / s if s != F(0.0) else F(1.0)  # s is NaN when the row held a NaN or +inf
        for c in range(C):
            y[n, c] *= inv


@_kernel("void(R[:, ::1], R[:, ::1], F[:, ::1])")
def _softmax_bwd(dy, y, dx):
    # forward: y = exp(x - max) / sum(exp(x - max))  ->  dx = y * (dy - sum(dy * y))
    N, C = y.shape
    F = y.dtype.type
    for n in prange(N):
        dot = F(0.0)
        for c in range(C):
            dot += dy[n, c] * y[n, c]
        for c in range(C):
            dx[n, c] = y[n, c] * (dy[n, c] - dot)


# ------------------------------------------------------------------- layernorm
@_inline
def _normalize_row(s, w, b, eps, y):
    """y = (s - mean) * rstd * w + b for one row s (C,) that sits in cache; returns (mean, rstd)."""
    C = s.shape[0]
    F = s.dtype.type
    total = F(0.0)
    for c in range(C):
        total += s[c]
    mean = total / F(C)
    var = F(0.0)
    for c in range(C):
        d = s[c] - mean
        var += d * d
    # not 1 / sqrt(...): with "arcp" LLVM computes that from a float32 estimate whose Newton step
    # gives NaN where the variance is 0 or infinite (the reference gives inf and 0)
    rstd = math.sqrt(F(1.0) / (var / F(C) + eps))
    for c in range(C):
        y[c] = (s[c] - mean) * rstd * w[c] + b[c]
    return mean, rstd


@_kernel("void(R[:, ::1], R[::1], R[::1], F, F[:, ::1], F[::1], F[::1])", serial_twin=True)
def _layernorm_fwd(x, w, b, eps, y, mean, rstd):
    for n in prange(x.shape[0]):
        mean[n], rstd[n] = _normalize_row(x[n], w, b, eps, y[n])


@_kernel("void(R[:, ::1], R[:, ::1], R[::1], R[::1], F, F[:, ::1], F[:, ::1], F[::1], F[::1])", serial_twin=True)
def _residual_layernorm_fwd(x, branch, w, b, eps, s, y, mean, rstd):
    N, C = x.shape
    for n in prange(N):
        for c in range(C):
            s[n, c] = x[n, c] + branch[n, c]
        mean[n], rstd[n] = _normalize_row(s[n], w, b, eps, y[n])


@_kernel("void(R[:, ::1], R[:, ::1], R[::1], R[::1], R[::1], R[:, ::1], boolean, "
         "F[:, ::1], F[:, ::1], F[:, ::1])")
def _layernorm_bwd(dy, x, w, mean, rstd, ds, add_ds, dx, dw_part, db_part):
    # forward: y = xhat * w + b with xhat = (x - mean) * rstd
    #   dx = (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) * rstd  (+ ds, the residual)
    N, C = x.shape
    P = dw_part.shape[0]
    F = x.dtype.type
    for p in prange(P):
        for c in range(C):
            dw_part[p, c] = F(0.0)
            db_part[p, c] = F(0.0)
        for n in range(p * N // P, (p + 1) * N // P):
            mu, rs = mean[n], rstd[n]
            g_mean = F(0.0)
            gx_mean = F(0.0)
            for c in range(C):
                xhat = (x[n, c] - mu) * rs
                g = dy[n, c] * w[c]
                dx[n, c] = g  # dxhat, kept so both loops use the same rounded value
                g_mean += g
                gx_mean += g * xhat
                dw_part[p, c] += dy[n, c] * xhat
                db_part[p, c] += dy[n, c]
            g_mean /= F(C)
            gx_mean /= F(C)
            for c in range(C):
                xhat = (x[n, c] - mu) * rs
                d = (dx[n, c] - g_mean - xhat * gx_mean) * rs
                dx[n, c] = d + ds[n, c] if add_ds else d


# ------------------------------------------------------------------- attention
# One task per (batch, head). Its keys and values are first copied transposed, (hs, S), so that
# every inner loop runs over keys with unit stride and vectorises: scores are axpys over keys,
# the exponentials a loop over keys, and p @ v a dot product over keys per output channel.
# Per-task memory is O(S hs); no (T, S) array exists.

@_inline
def _load_transposed(x, b, h, xt):
    """xt (hs, S) = x[b, h].T for a strided x (B, H, S, hs)."""
    S, hs = x.shape[2], x.shape[3]
    for j in range(S):
        for d in range(hs):
            xt[d, j] = x[b, h, j, d]


@_inline
def _keys_values_transposed(k, v, b, h):
    """(kt, vt), each (hs, S): k[b, h].T and v[b, h].T in scratch the calling task owns."""
    S, hs = k.shape[2], k.shape[3]
    kt = np.empty((hs, S), k.dtype)
    vt = np.empty((hs, S), k.dtype)
    _load_transposed(k, b, h, kt)
    _load_transposed(v, b, h, vt)
    return kt, vt


@_inline
def _scores(qi, kt, n, sc):
    """sc[:n] = qi @ kt[:, :n], looping over keys innermost."""
    F = sc.dtype.type
    for j in range(n):
        sc[j] = F(0.0)
    for d in range(qi.shape[0]):
        qd = qi[d]
        for j in range(n):
            sc[j] += qd * kt[d, j]


@_inline
def _softmax_row(sc, last, n, kpm, b, has_mask):
    """p = exp(s - max) in place over the keys j < last of one row of scores sc, zero for
    last <= j < n; returns (max, sum(p)). The sum is 0 when no key is left (then p = 0) and NaN
    when a score is NaN or +inf (then p is NaN at the row's unmasked keys), as in the reference."""
    F = sc.dtype.type
    if has_mask:
        for j in range(last):
            if kpm[b, j]:
                sc[j] = F(-np.inf)
    m = _row_max(sc, last)
    return m, _exp_row(sc, last, n, m)


@_inline
def _exp_row(sc, last, n, m):
    """sc[j] = exp(sc[j] - m) in place for j < last, 0 for last <= j < n; returns their sum. m =
    -inf (no key left, or every score NaN) shifts by 0: the masked scores give 0, a NaN stays NaN."""
    F = sc.dtype.type
    total = F(0.0)
    if m == F(-np.inf):  # every key masked, or every score NaN: exp(s - 0) is 0, or NaN
        m = F(0.0)
    for j in range(last):
        p = _exp(sc[j] - m)
        sc[j] = p
        total += p
    for j in range(last, n):
        sc[j] = F(0.0)
    return total


@_kernel("void(R[:, :, :, :], R[:, :, :, :], R[:, :, :, :], readonly(boolean)[:, ::1], boolean, boolean, F, "
         "F[:, :, :, :], F[:, :, ::1])", serial_twin=True)
def _attention_fwd(q, k, v, kpm, has_mask, causal, scale, out, lse):
    """Per query row: scores against the keys it may see, their max, p = exp(s - max) and
    out = p @ v / sum(p), lse = max + log(sum(p)). q (B, H, T, hs), k and v (B, H, S, hs), any
    strides; writes out (B, H, T, hs) and lse (B, H, T).

    Rows go in pairs that share every load of kt and vt (1.2-1.4x faster than a row at a time
    at the tiny, small and medium presets); a pair runs over the keys its second row sees, with
    the first row's p zero past its own last key. A last odd row, as decoding's single new
    token, goes alone.

    This is the flash-attention forward with a single key block per row: one row of S scores is
    the only (S,)-sized scratch. An online softmax over smaller key blocks (running max and
    rescaled sums) computed the same values but ran 3.4x slower here: LLVM stopped
    vectorising the loops inside the block loop.
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


@_kernel("void(R[:, :, :, :], R[:, :, :, :], R[:, :, :, :], R[:, :, :, :], R[:, :, :, :], R[:, :, ::1], "
         "readonly(boolean)[:, ::1], boolean, boolean, F, F[:, :, :, :], F[:, :, :, :], F[:, :, :, :])")
def _attention_bwd(q, k, v, out, dout, lse, kpm, has_mask, causal, scale, dq, dk, dv):
    """Gradients of one (batch, head) per task, two query rows at a time, from probabilities
    recomputed as p = exp(s - lse); dk and dv accumulate (transposed) in buffers the task owns.

    The two rows of a pair share every load of kt, vt, dkt and dvt: 1.4x faster than a row at
    a time at the tiny and small presets (a row needs 5 loads and 2 stores per 3 multiply-adds
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
                i = i0 + r
                pr, dsr = p[r], ds[r]
                # a missing row, or a query that attended to nothing (its output was a constant 0)
                last = 0 if r >= rows or lse[b, h, i] == F(-np.inf) else (S - T + i + 1 if causal else S)
                if last > 0:
                    L = lse[b, h, i]
                    D = F(0.0)
                    for d in range(hs):
                        D += gr[r, d] * out[b, h, i, d]
                    for j in range(last):
                        pj = _exp(pr[j] - L)
                        pr[j] = pj
                        dsr[j] = pj * (dsr[j] - D) * scale
                    if has_mask:  # a padded key gets p = ds = 0, even in a row whose lse is NaN
                        for j in range(last):
                            if kpm[b, j]:
                                pr[j] = F(0.0)
                                dsr[j] = F(0.0)
                for j in range(last, n):
                    pr[j] = F(0.0)
                    dsr[j] = F(0.0)
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


# ------------------------------------------- attention on BLAS tiles: the block steps
# The elementwise steps of NumpyOps._attention_tiled and its backward, whose block products are
# GEMMs between these calls. They run without threads of their own: the backend runs one head
# per thread, each thread's GEMMs on one BLAS thread, because a parallel region per block step
# would hand the cores back and forth between two thread pools a hundred times per head.
# A row at key position `row0 + r` sees the block's keys j < row0 + r + 1 - c0 (row0 = S: every
# key), less the padded ones.

@_inline
def _keys_seen(row0, r, c0, n):
    return max(0, min(n, row0 + r + 1 - c0))


@_kernel("void(F[:, ::1], F[::1], F[::1], F[:, ::1], int64, int64, boolean[::1], boolean)", parallel=False)
def _flash_softmax_block(sc, m, total, acc, row0, c0, mask, has_mask):
    """One key block of the online softmax (NumpyOps._flash_softmax_block)."""
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
        new = max(m[r], _row_max(row, last))
        t = _exp_row(row, last, n, new)
        # no key seen yet leaves m -inf, total and acc 0; a NaN score makes t, and so the row, NaN
        if last > 0 and (new != F(-np.inf) or t != t):
            alpha = _exp(m[r] - new)  # 0 while m = -inf
            total[r] = total[r] * alpha + t
            for d in range(hs):
                acc[r, d] *= alpha
            m[r] = new


@_kernel("void(F[:, ::1], F[::1], int64, int64, boolean[::1], boolean)", parallel=False)
def _flash_probs_block(sc, lse, row0, c0, mask, has_mask):
    """Scores -> p = exp(score - lse) in place (NumpyOps._flash_probs_block)."""
    R, n = sc.shape
    F = sc.dtype.type
    for r in range(R):
        row = sc[r]
        L = lse[r]
        last = _keys_seen(row0, r, c0, n) if L != F(-np.inf) else 0
        for j in range(last):  # no branch inside: the loop vectorises
            row[j] = _exp(row[j] - L)
        if has_mask:
            for j in range(last):
                if mask[c0 + j]:
                    row[j] = F(0.0)
        for j in range(last, n):
            row[j] = F(0.0)


@_kernel("void(F[:, ::1], F[:, ::1], F[::1], F)", parallel=False)
def _flash_dscores_block(p, dp, D, scale):
    """dp -> ds = p * (dp - D) * scale in place."""
    R, n = p.shape
    for r in range(R):
        Dr = D[r]
        for j in range(n):
            dp[r, j] = p[r, j] * (dp[r, j] - Dr) * scale


# --------------------------------------------------------------- cross-entropy
@_inline
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
    m = _row_max(x, V)
    total = F(0.0)
    for c in range(V):
        e = _exp(x[c] - m)
        dx[c] = e
        total += e
    g = inv_n / total
    for c in range(V):
        dx[c] *= g
    dx[tn] -= inv_n
    return m + math.log(total) - xt


@_kernel("void(R[:, ::1], readonly(int64)[::1], int64, F, F[:, ::1], float64[::1])")
def _cross_entropy_fwd(x, t, ignore_index, inv_n, dx, nll):
    """Per row: nll and, in the same pass, the gradient of the mean loss dx (`_cross_entropy_row`)."""
    for n in prange(x.shape[0]):
        nll[n] = _cross_entropy_row(x[n], t[n], ignore_index, inv_n, dx[n])


@_kernel("void(F[:, ::1], readonly(int64)[::1], int64, F, float64[::1])", serial_twin=True)
def _cross_entropy_fwd_inplace(x, t, ignore_index, inv_n, nll):
    """`_cross_entropy_fwd` with dx = x: the gradient overwrites the logits. A kernel of its own
    because Numba tells LLVM that the array arguments of a parallel loop never alias, so
    passing one array as both x and dx lets it move the read of x[n, t] after the writes."""
    for n in prange(x.shape[0]):
        nll[n] = _cross_entropy_row(x[n], t[n], ignore_index, inv_n, x[n])


# ------------------------------------------------------------------------ GELU
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@_inline
def _half_one_plus_tanh(z):
    """(1 + tanh z) / 2 = sigmoid(2 z), from e = exp(-2|z|) <= 1: no cancellation when
    tanh z is near -1 (where 1 + tanh z in float32 loses every digit), no overflow."""
    F = type(z)
    e = _exp(F(-2.0) * abs(z))
    r = F(1.0) / (F(1.0) + e)
    pos = F(z >= F(0.0))  # a select, so the loop still vectorises
    return r * (pos + (F(1.0) - pos) * e)


@_inline
def _gelu(u, exact):
    F = type(u)
    if exact:  # 0.5 u (1 + erf(u / sqrt 2))
        return F(0.5) * u * (F(1.0) + math.erf(u * F(_INV_SQRT_2)))
    # 0.5 u (1 + tanh(a (u + 0.044715 u^3)))
    return u * _half_one_plus_tanh(F(_SQRT_2_OVER_PI) * (u + F(0.044715) * u * u * u))


@_inline
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


@_kernel("void(R[:, ::1], R[::1], boolean, F[:, ::1])", serial_twin=True)
def _gelu_fwd(x, bias, exact, y):
    N, C = x.shape
    for n in prange(N):
        for c in range(C):
            y[n, c] = _gelu(x[n, c] + bias[c], exact)


@_kernel("void(R[:, ::1], R[:, ::1], R[::1], boolean, F[:, ::1], F[:, ::1])")
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


# ------------------------------------------------------------------------ ReLU
@_kernel("void(R[:, ::1], R[::1], F[:, ::1])", serial_twin=True)
def _relu_fwd(x, bias, y):
    N, C = x.shape
    F = x.dtype.type
    for n in prange(N):
        for c in range(C):
            y[n, c] = max(x[n, c] + bias[c], F(0.0))


@_kernel("void(R[:, ::1], R[:, ::1], F[:, ::1], F[:, ::1])")
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


# ------------------------------------------------------------------- embedding
@_kernel("void(R[:, ::1], readonly(int64)[::1], F[:, ::1])", serial_twin=True)
def _embedding_fwd(w, ids, out):
    N, C = out.shape
    for n in prange(N):
        row = ids[n]
        for c in range(C):
            out[n, c] = w[row, c]


COLUMN_BLOCK = 16  # columns per task in the scatter-add: one 64-byte cache line of float32


@_kernel("void(R[:, ::1], readonly(int64)[::1], F[:, ::1])")
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


# ----------------------------------------------------------------------- AdamW
@_kernel("void(F[::1], R[::1], F[::1], F[::1], F, F, F, F, F, F, F, F)")
def _adamw(p, g, m, v, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay, step_size, bc2):
    # p *= 1 - lr wd; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2
    # p -= lr / bc1 * m / (sqrt(v / bc2) + eps)
    for i in prange(p.shape[0]):
        gi = g[i]
        mi = beta1 * m[i] + one_minus_beta1 * gi
        vi = beta2 * v[i] + one_minus_beta2 * (gi * gi)
        m[i] = mi
        v[i] = vi
        p[i] = p[i] * decay - step_size * mi / (math.sqrt(vi / bc2) + eps)


# -------------------------------------------------------------- GPT-2 decoding
# One new token per row through the whole model in one call: at batch 1 a decoding step is a
# chain of matrix-vector products over weights that fit in the L3 cache, so the forty-odd
# kernel calls of the composed path cost more in Python than in arithmetic. Single-threaded: a
# parallel region costs about 50 us here, more than a layer's work.

@_inline
def _affine(x, w, bias, y):
    """y (R, N) = x (R, K) @ w (K, N) + bias (N,), streaming w once for all R rows."""
    R, K = x.shape
    N = w.shape[1]
    for r in range(R):
        for n in range(N):
            y[r, n] = bias[n]
    k = 0
    while k + 4 <= K:  # four rows of w a pass: y is loaded and stored a quarter as often
        w0, w1, w2, w3 = w[k], w[k + 1], w[k + 2], w[k + 3]
        for r in range(R):
            x0, x1, x2, x3 = x[r, k], x[r, k + 1], x[r, k + 2], x[r, k + 3]
            yr = y[r]
            for n in range(N):
                yr[n] += x0 * w0[n] + x1 * w1[n] + x2 * w2[n] + x3 * w3[n]
        k += 4
    while k < K:
        wk = w[k]
        for r in range(R):
            xk = x[r, k]
            yr = y[r]
            for n in range(N):
                yr[n] += xk * wk[n]
        k += 1


@_inline
def _param(flat, offsets, i, rows, cols):
    """The (rows, cols) parameter starting at flat[offsets[i]]."""
    o = offsets[i]
    return flat[o:o + rows * cols].reshape((rows, cols))


@_kernel("void(R[::1], readonly(int64)[::1], int64, readonly(int64)[::1], readonly(int64)[::1], "
         "F[:, :, :, :, ::1], F[:, :, :, :, ::1], readonly(boolean)[:, ::1], int64, F, F[:, ::1])", parallel=False)
def _gpt2_decode(flat, offsets, d_ff, ids, positions, kc, vc, padding, t, eps, logits):
    L, R, H, _, hs = kc.shape
    C, V = H * hs, logits.shape[1]
    F = flat.dtype.type
    scale = F(1.0 / math.sqrt(hs))
    g = L * SLOTS  # the model-wide entries follow the layers'
    wte = _param(flat, offsets, g, V, C)
    wpe = _param(flat, offsets, g + 1, kc.shape[3], C)
    x = np.empty((R, C), flat.dtype)  # the residual stream
    h = np.empty((R, C), flat.dtype)
    qkv = np.empty((R, 3 * C), flat.dtype)
    a = np.empty((R, C), flat.dtype)
    o = np.empty((R, C), flat.dtype)
    f = np.empty((R, d_ff), flat.dtype)
    p = np.empty(t + 1, flat.dtype)
    for r in range(R):
        for c in range(C):
            x[r, c] = wte[ids[r], c] + wpe[positions[r], c]
    for layer in range(L):
        s = layer * SLOTS
        for r in range(R):
            _normalize_row(x[r], _param(flat, offsets, s, 1, C)[0], _param(flat, offsets, s + 1, 1, C)[0], eps, h[r])
        _affine(h, _param(flat, offsets, s + 2, C, 3 * C), _param(flat, offsets, s + 3, 1, 3 * C)[0], qkv)
        for r in range(R):
            for hd in range(H):
                kh, vh = kc[layer, r, hd], vc[layer, r, hd]
                for d in range(hs):
                    kh[t, d] = qkv[r, C + hd * hs + d]
                    vh[t, d] = qkv[r, 2 * C + hd * hs + d]
                for j in range(t + 1):
                    sc = F(0.0)
                    for d in range(hs):
                        sc += qkv[r, hd * hs + d] * kh[j, d]
                    p[j] = sc * scale
                _, total = _softmax_row(p, t + 1, t + 1, padding, r, True)
                ah = a[r, hd * hs:(hd + 1) * hs]
                ah[:] = F(0.0)
                if total == F(0.0):  # every key is padding: the output is 0, as in attention_forward
                    continue
                for j in range(t + 1):
                    for d in range(hs):
                        ah[d] += p[j] * vh[j, d]
                inv = F(1.0) / total
                for d in range(hs):
                    ah[d] *= inv
        _affine(a, _param(flat, offsets, s + 4, C, C), _param(flat, offsets, s + 5, 1, C)[0], o)
        for r in range(R):
            for c in range(C):
                x[r, c] += o[r, c]
            _normalize_row(x[r], _param(flat, offsets, s + 6, 1, C)[0], _param(flat, offsets, s + 7, 1, C)[0],
                           eps, h[r])
        _affine(h, _param(flat, offsets, s + 8, C, d_ff), _param(flat, offsets, s + 9, 1, d_ff)[0], f)
        for r in range(R):
            for c in range(d_ff):
                f[r, c] = _gelu(f[r, c], False)
        _affine(f, _param(flat, offsets, s + 10, d_ff, C), _param(flat, offsets, s + 11, 1, C)[0], o)
        for r in range(R):
            for c in range(C):
                x[r, c] += o[r, c]
    for r in range(R):
        _normalize_row(x[r], _param(flat, offsets, g + 2, 1, C)[0], _param(flat, offsets, g + 3, 1, C)[0], eps, h[r])
    head = _param(flat, offsets, g + 4, V, C)
    for v in range(V):  # logits = h @ head.T: one dot product of C per id, head read once
        hv = head[v]
        for r in range(R):
            total = F(0.0)
            for c in range(C):
                total += h[r, c] * hv[c]
            logits[r, v] = total
