"""Products with weights stored for inference: float32, bfloat16 or 8-bit integers.

A decoding step streams every weight once per token, so the bytes of a weight are what a
matrix-vector product costs; a weight quantised once at load is read at a half (bf16) or a
quarter (int8) of float32's bytes. `quantize_weight(w, format)` makes a `QuantizedWeight` of a
(K, N) float32 weight stored (in, out) as GPT-2's Conv1D keeps it; `linear_quantized(x, qw,
bias)` computes x @ W + bias from it for x (..., K), with few rows in mind (decoding: 1 to ~16).

    fp32  the weight itself; the product is ops.matmul in float32.
    bf16  the weight rounded to bfloat16 (ties to even); each row of x rounded so too, the
          products exact, the sums float32 (`vdpbf16ps`), as the bfloat16 GEMM of gemm_bf16.py.
    int8  symmetric, one scale per output column: q = rint(w * (127 / max_k |w[k, n]|)) in
          [-127, 127], s_n = max_k |w[k, n]| / 127. Each row of x is quantised per call the same way (one
          scale s_x per row), stored as u8 = q_x + 128 so that `vpdpbusd` (u8 x s8 -> int32) sums
          them exactly; the column sums of q take the offset out again (CTranslate2's scheme):
              sum_k q_x q_w = correction_n + sum_k u8 q_w,   correction_n = -128 sum_k q_w[k, n]
              y[r, n] = float32(that) * (s_x[r] * s_n) + bias[n]
          exact in int32; the kernel starts its sums at the correction.
          A row of x holding NaN or inf gives a NaN row (its scale is NaN); a weight holding one
          is refused at quantisation.

The NumPy reference below is the specification: the same quantisation, the integer sums exact
(float64 products of integers below 2**53), the float epilogue in the same float32 order. The
Numba kernels match it: integer sums exactly, float results to float32 rounding (the int8
epilogue may fuse its multiply-add; the bf16 sums run in another order).

Layout. Both packed formats keep the weight as 1-D uint32 words in groups of GROUP_N = 128
columns (8 panels of 16): words[((g * Kw + kk) * 8 + p) * 16 + j] holds column 128 g + 16 p + j
at k = 4 kk .. 4 kk + 3 (int8, one byte each, low byte first) or k = 2 kk, 2 kk + 1 (bf16, low
half first), so one step of kk reads 512 contiguous bytes: eight 64-byte vectors, each one
`vpdpbusd`/`vdpbf16ps` operand. K and N are padded with zero weights (N to a whole group), scales
and corrections with zeros; only the stores are cut to N. The kernels are LLVM intrinsics written
with llvmlite (as `_tile` of gemm_bf16.py) and compiled only on a CPU that has the instruction
(`cpu_has_vnni`, `cpu_has_bf16`): LLVM aborts the process, rather than raising, when told to emit
one the CPU lacks. A format's refusal names the missing feature in one line.
"""

from typing import NamedTuple

import numpy as np

from fastformer.errors import FastformerError, is_int
from fastformer.kernels._jit import bits_as_float, inline, kernel, numba
from fastformer.kernels.checks import describe, kernel_array, quiet
from fastformer.kernels.ops.gemm_bf16 import _pairs_along_row, round_to_bf16
from fastformer.kernels.process import cpu_has_bf16, cpu_has_vnni

FORMATS = ("fp32", "bf16", "int8")
FEATURES = {"bf16": ("AVX-512 BF16", "avx512_bf16"), "int8": ("AVX-512 VNNI", "avx512_vnni")}
PANEL_N, PANELS = 16, 8  # columns of one vector; vectors a group reads per step of k
GROUP_N = PANEL_N * PANELS  # columns of a group: the kernel's tile, and N's padding
K_PER_WORD = {"int8": 4, "bf16": 2}
TILE_ROWS = 2  # rows a pass of the kernel multiplies. Three (24 accumulators) should fit 32 registers, but LLVM
# keeps the group's 8 vectors of B in registers too and spills, at half the products a second of two rows.

# Words of a group's weights prefetched ahead of the step of k that reads them (2 KB: four steps), and
# at the start of a decoding stage's chunk (gpt2_decode). A batch-1 product streams its weights from L3
# once per token, faster than the hardware's prefetcher alone keeps them coming, and each stage's
# stream starts cold; the distance was chosen by timing medium's decoding (docs/benchmarks.md).
PREFETCH_WORDS = 512
INT8_OFFSET = 128  # u8 = q_x + 128
_NO_WORDS = np.zeros(0, np.uint32)
INV_127 = np.float32(1.0 / 127.0)


def format_runs_natively(fmt):
    """Whether the Numba kernels of weight format `fmt` run on this CPU."""
    return fmt == "fp32" or (cpu_has_bf16() if fmt == "bf16" else cpu_has_vnni())


def check_format(fmt):
    """`fmt` when it names a weight format, else one line naming the allowed ones."""
    if fmt not in FORMATS:
        raise FastformerError(f"unknown weight format {fmt!r}: valid values are {', '.join(FORMATS)}")
    return fmt


def require_format(fmt):
    """Refuse, in one line, a format whose kernels this CPU cannot run (the Numba backend's check;
    the reference runs every format anywhere)."""
    check_format(fmt)
    if not format_runs_natively(fmt):
        name, flag = FEATURES[fmt]
        raise FastformerError(f"weight format {fmt} needs a CPU with {name} (the {flag} flag of /proc/cpuinfo), "
                              f"which this one lacks: use fp32")
    return fmt


class QuantizedWeight(NamedTuple):
    """A (K, N) weight in one of FORMATS. fp32: `words` is the (K, N) float32 weight itself;
    bf16, int8: the 1-D uint32 words of the layout above, `scale` and `correction` (Np,) (int8
    only: bf16 keeps empty ones)."""
    format: str
    K: int
    N: int
    words: np.ndarray
    scale: np.ndarray  # (Np,) float32: int8's column scales
    correction: np.ndarray  # (Np,) int32: int8's -128 * the column sums of q

    @property
    def nbytes(self):
        return self.words.nbytes + self.scale.nbytes + self.correction.nbytes


def words_per_row(fmt, K):
    """Kw: the words of one row (of x, or of a group's column) for K values."""
    return -(-K // K_PER_WORD[fmt])


def groups(N):
    return -(-N // GROUP_N)


# ---------------------------------------------------------------- the packers
def quantize_int8(w):
    """(q (K, N) int8, scale (N,) float32) of a float32 weight: per output column, symmetric."""
    amax = np.abs(w).max(axis=0)  # (N,)
    scale = amax * INV_127
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(1.0) / amax, np.float32(0.0)).astype(np.float32) * np.float32(127.0)
    q = np.clip(np.rint(w * inv), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


def pack_words(values, fmt):
    """The (K, N) int8 values (int8) or uint16 bfloat16 bits (bf16) as the kernel's 1-D words."""
    K, N = values.shape
    per = K_PER_WORD[fmt]
    Kw, G = words_per_row(fmt, K), groups(N)
    padded = np.zeros((Kw * per, G * GROUP_N), values.dtype)
    padded[:K, :N] = values
    # (Kw, per, G, 8, 16) -> (G, Kw, 8, 16, per): each word the `per` k's of one column
    arranged = padded.reshape(Kw, per, G, PANELS, PANEL_N).transpose(2, 0, 3, 4, 1)
    return np.ascontiguousarray(arranged).view(np.uint32).reshape(-1)


def unpack_words(words, fmt, K, N):
    """The inverse of pack_words: the (K, N) int8 values or uint16 bfloat16 bits."""
    per = K_PER_WORD[fmt]
    Kw, G = words_per_row(fmt, K), groups(N)
    dtype = np.int8 if fmt == "int8" else np.uint16
    arranged = words.view(dtype).reshape(G, Kw, PANELS, PANEL_N, per)
    return arranged.transpose(1, 4, 0, 2, 3).reshape(Kw * per, G * GROUP_N)[:K, :N]


def _check_weight(w):
    w = np.asarray(w)
    if w.dtype != np.float32 or w.ndim != 2:
        raise FastformerError(f"a weight to quantise must be a 2-D float32 array (K, N), got {describe(w)}")
    return w


def quantize_weight(ops, w, fmt):
    """The float32 weight w (K, N) (any strides) in weight format `fmt` (fp32, bf16, int8), packed
    once for linear_quantized. Refuses a format whose kernels the backend cannot run here, and an
    int8 weight holding NaN or inf."""
    w = _check_weight(w)
    ops.require_weight_format(fmt)
    K, N = w.shape
    empty_f, empty_i = np.zeros(0, np.float32), np.zeros(0, np.int32)
    if fmt == "fp32":
        return QuantizedWeight(fmt, K, N, kernel_array(w), empty_f, empty_i)
    if fmt == "bf16":
        bits = (round_to_bf16(w).view(np.uint32) >> np.uint32(16)).astype(np.uint16)
        return QuantizedWeight(fmt, K, N, pack_words(bits, fmt), empty_f, empty_i)
    if not np.isfinite(w).all():
        raise FastformerError(f"a weight to quantise to int8 must be finite, got NaN or inf in the {w.shape} weight")
    if K > MAX_INT8_K:
        raise FastformerError(f"an int8 weight may have at most {MAX_INT8_K} rows (K; its int32 sums), got {K}")
    q, scale = quantize_int8(w)
    Np = groups(N) * GROUP_N
    scale_p, correction = np.zeros(Np, np.float32), np.zeros(Np, np.int32)
    scale_p[:N], correction[:N] = scale, -INT8_OFFSET * q.sum(axis=0, dtype=np.int64)
    return QuantizedWeight(fmt, K, N, pack_words(q, fmt), scale_p, correction)


def require_weight_format(ops, fmt):
    """The reference runs every format (it emulates the kernels' arithmetic anywhere)."""
    return check_format(fmt)


def require_weight_format_numba(ops, fmt):
    return require_format(fmt)


def weight_value(qw):
    """The (K, N) float32 weight that the format's products multiply by: the weight (fp32), its
    bfloat16 rounding (bf16), or q * scale (int8: for comparisons only; the product is integer)."""
    if qw.format == "fp32":
        return qw.words
    values = unpack_words(qw.words, qw.format, qw.K, qw.N)
    if qw.format == "bf16":
        return (values.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return values.astype(np.float32) * qw.scale[:qw.N]


# ------------------------------------------------------------------- checks
MAX_INT8_K = 1 << 15  # rows of an int8 weight: the int32 sums of K products of at most 255 * 127 cannot overflow


def check_quantized_weight(qw):
    """qw with every array the kernels read of the dtype and size its format, K and N say (a
    copy only of one that is not contiguous and aligned): a QuantizedWeight that is not what
    quantize_weight made is refused before any kernel indexes it."""
    if not isinstance(qw, QuantizedWeight):
        raise FastformerError(f"qw must be a QuantizedWeight (ops.quantize_weight), got {type(qw).__name__}")
    fmt, K, N = qw.format, qw.K, qw.N
    arrays = [np.asarray(a) if isinstance(a, np.ndarray) else None for a in (qw.words, qw.scale, qw.correction)]
    ok = isinstance(fmt, str) and fmt in FORMATS and is_int(K) and is_int(N) and K >= 0 and N >= 0 and \
        all(a is not None for a in arrays)
    if ok and fmt == "fp32":
        shapes = {"words": ((K, N), np.float32), "scale": ((0,), np.float32), "correction": ((0,), np.int32)}
    elif ok:
        Np = groups(N) * GROUP_N
        n_scales = Np if fmt == "int8" else 0
        shapes = {"words": ((groups(N) * words_per_row(fmt, K) * GROUP_N,), np.uint32),
                  "scale": ((n_scales,), np.float32), "correction": ((n_scales,), np.int32)}
        ok = fmt != "int8" or K <= MAX_INT8_K
    if ok:
        ok = all(a.shape == shape and a.dtype == dtype for a, (shape, dtype) in zip(arrays, shapes.values()))
    if not ok:
        raise FastformerError(f"qw must be a QuantizedWeight as ops.quantize_weight makes it (format fp32, bf16 or "
                              f"int8, its words, scale and correction sized by K and N), got format {qw.format!r}, "
                              f"K={qw.K!r}, N={qw.N!r} and arrays {', '.join(describe(a) for a in qw[3:])}")
    return QuantizedWeight(fmt, int(K), int(N), *(kernel_array(a) for a in arrays))


def check_linear_quantized(x, qw, bias, out):
    """Returns (x2 (M, K) float32, qw checked, bias or None, out (M, N) view or None, out shape)."""
    qw = check_quantized_weight(qw)
    x = np.asarray(x)
    if x.dtype != np.float32 or x.ndim == 0 or x.shape[-1] != qw.K:
        raise FastformerError(f"x must be a float32 array (..., {qw.K}) to multiply a ({qw.K}, {qw.N}) weight, "
                              f"got {describe(x)}")
    x2 = kernel_array(x.reshape(-1, qw.K))
    shape = (*x.shape[:-1], qw.N)
    if bias is not None:
        bias = np.asarray(bias)
        if bias.dtype != np.float32 or bias.shape != (qw.N,):
            raise FastformerError(f"bias must be a float32 array ({qw.N},), got {describe(bias)}")
        bias = kernel_array(bias)
    if out is not None:
        if not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.size != x2.shape[0] * qw.N \
                or not out.flags.c_contiguous or not out.flags.writeable:
            raise FastformerError(f"out must be a writeable C-contiguous float32 array of {x2.shape[0] * qw.N} "
                                  f"elements {shape}, got {describe(out)}")
        out = out.reshape(x2.shape[0], qw.N)
    return x2, qw, bias, out, shape


# ---------------------------------------------------------------- reference
def quantize_rows_int8(x2):
    """(q (M, K) int8 in [-127, 127], scale (M,) float32) of float32 rows: q = rint(x * (1 / max|x|
    * 127)), scale = max|x| / 127 (both in float32, in this order, as the kernel computes them); a
    row of zeros has scale 0, a row holding NaN or inf q = 0 and scale NaN."""
    bad = ~np.isfinite(x2).all(axis=1)
    amax = np.abs(np.where(np.isfinite(x2), x2, 0)).max(axis=1, initial=0)
    amax = np.where(bad, 0, amax).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(1.0) / amax, np.float32(0.0)).astype(np.float32) * np.float32(127.0)
    q = np.clip(np.rint(np.where(bad[:, None], 0, x2) * inv[:, None]), -127, 127).astype(np.int8)
    return q, np.where(bad, np.float32(np.nan), amax * INV_127).astype(np.float32)


def int8_sums(qx, qw):
    """The exact integer sums qx (M, K) @ q_w (K, N), int64: through u8 = qx + 128 and the
    correction, as the kernel forms them (float64 products of integers are exact below 2**53)."""
    q = unpack_words(qw.words, "int8", qw.K, qw.N).astype(np.float64)
    u = qx.astype(np.float64) + INT8_OFFSET
    return qw.correction[:qw.N].astype(np.int64) + (u @ q).astype(np.int64)


@quiet
def linear_quantized(ops, x, qw, bias=None, out=None):
    """x (..., K) float32 @ the QuantizedWeight qw (K, N) + bias (N,), in qw's format (the module
    docstring gives each format's arithmetic). `out` (..., N), when given, receives it. Returns
    (..., N) float32."""
    x2, qw, bias, out2, shape = check_linear_quantized(x, qw, bias, out)
    if qw.format == "fp32":
        y = ops.matmul(x2, qw.words, precision="float32")
    elif qw.format == "bf16":
        y = np.matmul(round_to_bf16(x2), weight_value(qw))
    else:
        qx, sx = quantize_rows_int8(x2)
        y = int8_sums(qx, qw).astype(np.float32) * (sx[:, None] * qw.scale[None, :qw.N])
    if bias is not None:
        y += bias
    if out2 is not None:
        out2[...] = y
        return out
    return y.reshape(shape)


# -------------------------------------------------------------------- Numba
if numba is not None:
    # R rows (1 or 2) by a group of 8 vectors of 16 columns: kernels/_tiles.make_group_tile
    from fastformer.kernels._tiles import make_group_tile

    _int8_tile1, _int8_tile2 = (make_group_tile("int8", r, PANELS, PREFETCH_WORDS) for r in (1, 2))
    _bf16_tile1, _bf16_tile2 = (make_group_tile("bf16", r, PANELS, PREFETCH_WORDS) for r in (1, 2))
else:
    _int8_tile1 = _int8_tile2 = _bf16_tile1 = _bf16_tile2 = None


@inline
def quantize_rows_u8(x, M, K, au8, lda_bytes, sx):
    """Rows x[:M, :K] quantised as the reference's quantize_rows_int8, stored as u8 = q + 128 in
    au8[r * lda_bytes + k] (the padding up to lda_bytes: 128, a zero); sx[r] the row's scale."""
    for r in range(M):
        # the largest |x| as the bits of a float32 without its sign: their order as integers is the
        # floats' own, and an integer maximum vectorises where a float one with NaN rules does not
        bits = x[r].view(np.int32)
        top = np.int32(0)
        for k in range(K):
            top = max(top, bits[k] & np.int32(0x7FFFFFFF))
        finite = top <= np.int32(0x7F7FFFFF)  # NaN and inf have every exponent bit set
        amax = bits_as_float(np.int32(top)) if finite else np.float32(0.0)
        inv = np.float32(1.0) / amax * np.float32(127.0) if amax > np.float32(0.0) else np.float32(0.0)
        # the row's own slices, indexed from 0, and the test of `finite` outside the loop: an index
        # that may be negative (row + k), or a branch inside, keeps the loop from vectorising
        xr, dst = x[r], au8[r * lda_bytes:(r + 1) * lda_bytes]
        if finite:
            for k in range(K):
                t = min(max(np.rint(xr[k] * inv), np.float32(-127.0)), np.float32(127.0))
                dst[k] = np.uint8(np.int32(t) + INT8_OFFSET)
        else:
            dst[:K] = np.uint8(INT8_OFFSET)
        dst[K:] = np.uint8(INT8_OFFSET)
        sx[r] = amax * INV_127 if finite else np.float32(np.nan)


@inline
def pack_rows_bf16(x, M, K, aw, lda):
    """Rows x[:M, :K] (C-contiguous float32) as words of bfloat16 pairs: aw[r * lda + kk] =
    (x[r, 2kk], x[r, 2kk + 1]), lda = (K + 1) // 2, 32 values an instruction (_pairs_along_row,
    whose scratch a contiguous float32 row in jitted code does not use)."""
    for r in range(M):
        _pairs_along_row(x[r, :K], aw[r * lda:(r + 1) * lda], _NO_WORDS)


@inline
def int8_product(au8, lda, sx, M, words, w_off, kw, scale, correction, s_off, bias, b_off, has_bias, y, N, g0, g1,
                 acc):
    """y[:M, cols of groups g0..g1 (cut to N)] = the int8 product of the u8 rows au8 (lda words a
    row) and the packed weight at words[w_off], scales and corrections at [s_off], bias at
    [b_off]. acc: an int32 scratch of TILE_ROWS * GROUP_N."""
    for g in range(g0, g1):
        n0 = g * GROUP_N
        width = min(GROUP_N, N - n0)
        wg = w_off + g * kw * GROUP_N
        m0 = 0
        while m0 < M:
            R = min(TILE_ROWS, M - m0)
            if R == 2:
                _int8_tile2(words, wg, kw, au8, m0 * lda, lda, correction, s_off + n0, acc)
            else:
                _int8_tile1(words, wg, kw, au8, m0 * lda, lda, correction, s_off + n0, acc)
            for r in range(R):
                s = sx[m0 + r]
                yr = y[m0 + r, n0:n0 + width]
                sums = acc[r * GROUP_N:r * GROUP_N + width]
                sc = scale[s_off + n0:s_off + n0 + width]
                if has_bias:
                    b = bias[b_off + n0:b_off + n0 + width]
                    for j in range(width):
                        yr[j] = np.float32(sums[j]) * (s * sc[j]) + b[j]
                else:
                    for j in range(width):
                        yr[j] = np.float32(sums[j]) * (s * sc[j])
            m0 += R


@inline
def bf16_product(aw, lda, M, words, w_off, kw, bias, b_off, has_bias, y, N, g0, g1, acc):
    """As int8_product for the bfloat16 words: acc a float32 scratch of TILE_ROWS * GROUP_N."""
    for g in range(g0, g1):
        n0 = g * GROUP_N
        width = min(GROUP_N, N - n0)
        wg = w_off + g * kw * GROUP_N
        m0 = 0
        while m0 < M:
            R = min(TILE_ROWS, M - m0)
            if R == 2:
                _bf16_tile2(words, wg, kw, aw, m0 * lda, lda, acc, 0, acc)
            else:
                _bf16_tile1(words, wg, kw, aw, m0 * lda, lda, acc, 0, acc)
            for r in range(R):
                yr = y[m0 + r, n0:n0 + width]
                sums = acc[r * GROUP_N:r * GROUP_N + width]
                if has_bias:
                    b = bias[b_off + n0:b_off + n0 + width]
                    for j in range(width):
                        yr[j] = sums[j] + b[j]
                else:
                    for j in range(width):
                        yr[j] = sums[j]
            m0 += R


@kernel("void(R[:, ::1], readonly(uint32)[::1], readonly(float32)[::1], readonly(int32)[::1], R[::1], boolean, "
        "F[:, ::1], int64, int64)", parallel=False, floats=("float32",))
def _linear_int8(x, words, scale, correction, bias, has_bias, y, g0, g1):
    M, K = x.shape
    kw = (K + 3) // 4
    au8 = np.empty(M * kw * 4, np.uint8)
    sx = np.empty(M, np.float32)
    acc = np.empty(TILE_ROWS * GROUP_N, np.int32)
    quantize_rows_u8(x, M, K, au8, kw * 4, sx)
    int8_product(au8, kw, sx, M, words, 0, kw, scale, correction, 0, bias, 0, has_bias, y, y.shape[1], g0, g1, acc)


@kernel("void(R[:, ::1], readonly(uint32)[::1], R[::1], boolean, F[:, ::1], int64, int64)", parallel=False,
        floats=("float32",))
def _linear_bf16(x, words, bias, has_bias, y, g0, g1):
    M, K = x.shape
    kw = (K + 1) // 2
    aw = np.zeros(M * kw, np.uint32)
    acc = np.empty(TILE_ROWS * GROUP_N, np.float32)
    pack_rows_bf16(x, M, K, aw, kw)
    bf16_product(aw, kw, M, words, 0, kw, bias, 0, has_bias, y, y.shape[1], g0, g1, acc)


_NO_BIAS = np.zeros(0, np.float32)


def linear_quantized_numba(ops, x, qw, bias=None, out=None):
    """As the reference; bf16 and int8 on the kernels above."""
    x2, qw, bias, out2, shape = check_linear_quantized(x, qw, bias, out)
    if qw.format == "fp32":
        return linear_quantized(ops, x, qw, bias, out)
    require_format(qw.format)
    M = x2.shape[0]
    y = out2 if out2 is not None else np.empty((M, qw.N), np.float32)
    if M and qw.N:
        b = _NO_BIAS if bias is None else bias
        if qw.K == 0:
            y[...] = 0 if bias is None else bias
        elif qw.format == "int8":
            _linear_int8(x2, qw.words, qw.scale, qw.correction, b, bias is not None, y, 0, groups(qw.N))
        else:
            _linear_bf16(x2, qw.words, b, bias is not None, y, 0, groups(qw.N))
    return out if out2 is not None else y.reshape(shape)
