"""Matrix products with bfloat16 products and float32 sums: C = A @ B for float32 A, B and C.

Both inputs are rounded to bfloat16 (round to nearest even; a NaN stays a NaN), multiplied
exactly (a product of two bfloat16 values fits a float32) and summed in float32. On a CPU with
AVX-512 BF16 one `vdpbf16ps` does 32 such products into 16 float32 sums, twice the float32 FMA
rate; NumPy's BLAS has no such product, so this module brings its own.

Layout. Both operands are packed as bfloat16 pairs along K: word kk of a row of A (a column of B)
holds k = 2kk and 2kk + 1 (low half first, as the instruction pairs them). B is packed as
(NP, K2, 32) uint32 words, panel p holding columns 32p .. 32p + 31; A row by row (Mp, K2), or,
when it is a transposed view (the x.T of a weight gradient), in panels of 16 rows as B's, so
that both packers read and write memory in order. Padding is zeros, so every tile is full and
only its store is cut to C. The packers read any strides, so A @ B, A @ B.T and A.T @ B are all
a packing away, and a packed operand can serve many products (`pack_b`). A row-major A handed to
`matmul_bf16` unpacked is packed by the GEMM's own threads, 64 rows at a time into a scratch that
stays in the core's cache (`_gemm_rows`): A is read from memory once. Where packing is a large
share of the work (short rows, few columns), a block's rows are packed while the tiles of the
block before multiply, their conversions interleaved with the products (which leave the
conversion's ports idle). A linear layer's output gradient is both the B of its weight gradient
and the A of its input gradient: `pack_a_and_b` makes both (and the bias gradient, its column
sums) in one pass over it.

The micro-kernel (kernels/_tiles.py, "bf16") keeps an 8 x 32 tile of C in 16 zmm registers over
the whole K: per pair of k, two loads of B and, per row, one broadcast word of A and two
`vdpbf16ps`; a tile that C holds whole is finished in registers (bias, accumulation, store). The
GEMM runs 64-row blocks side by side on the threads, each over every panel (`_gemm`: a `prange`
over the blocks; `_gemm_rows`: a run of blocks a thread, see above). It is an
LLVM intrinsic written with llvmlite, compiled only when a product is asked for on a CPU that
has the instruction (`cpu_has_bf16`): LLVM aborts the process, rather than raising, when told to
emit it for a CPU without it.

The packers round with the CPU's own conversion, `vcvtne2ps2bf16` (32 values an instruction),
wherever 32 values lie side by side: nearest even, a NaN quieted, and a subnormal float32 made a
zero of its sign (which the products would take it as anyway: `vdpbf16ps` treats subnormal
inputs as zero). The reference (`matmul_bf16_reference`) rounds the inputs exactly so and
multiplies them with NumPy in float32: the kernel matches it to float32 summation error, but
for products whose float32 sums fall below the normal range, which the instruction flushes.
"""

from typing import NamedTuple

import numpy as np

from fastformer.errors import FastformerError
from fastformer.kernels._jit import ROW_CHUNKS, inline, kernel, numba, prange, sized
from fastformer.kernels._tiles import TILE_M, TILE_N, bf16_tile, bf16_tile_into, bf16_tile_into_packing, prefetch_tile
from fastformer.kernels.checks import describe
from fastformer.kernels.ops.activations import _gelu, gelu_forward
from fastformer.kernels.process import cpu_has_bf16

A_PANEL = 16  # rows of A per packed panel: two tiles
BLOCK_M = 64  # rows of a task: its packed A stays in L2 while it sweeps B's panels
PARALLEL_WORK = 1 << 17  # elements packed both ways (or flops / 64 multiplied) below which one thread runs them
# elements from which an operand alone is packed on both threads, whose start right after a GEMM is
# short while the workers still spin (process.OMP_SPINS); both ways were timed, a GEMM just before,
# on operands of 12K to 262K elements
PACK_PARALLEL = 1 << 16
# The largest K and N at which `_gemm_rows` packs a block's rows of A while the tiles of the block
# before multiply. There, packing apart took a fifth of the GEMM's time (4096 x 256 @ 256 x 64, one
# thread: 258 us with A packed beforehand, 324 packing apart, 294 alongside; 128 x 64: 175 and 150).
# With more of B's panels the packing is a smaller share of the work, and the second scratch
# crowds the panels in the cache: at N = 512 and 1024 alongside was 1-10% slower. With longer rows
# the two scratches grow past L1: at K = 512 one thread was 2-8% slower, at 4096 25%. Elsewhere a
# part packs each block into the one scratch, after the block before.
ALONGSIDE_K, ALONGSIDE_N = 256, 128


def require_bf16():
    """Refuse, in one line, to run the bfloat16 kernels on a CPU without the instructions."""
    if not cpu_has_bf16():
        raise FastformerError("precision bfloat16 needs a CPU with AVX-512 BF16 (the avx512_bf16 flag of "
                              "/proc/cpuinfo), which this one lacks: use float32")


# ---------------------------------------------------------------- reference
def round_to_bf16(x):
    """float32 x rounded to the nearest bfloat16 (ties to even), as float32 values whose low 16
    bits are zero; a NaN stays a (quiet) NaN, infinities stay infinite, a subnormal becomes a
    zero of its sign (as `vcvtne2ps2bf16` rounds)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    u = x.view(np.uint32)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    rounded = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    rounded = np.where((u & np.uint32(0x7F800000)) == 0, u & np.uint32(0x80000000), rounded)
    return np.where(nan, u | np.uint32(0x00400000), rounded).astype(np.uint32).view(np.float32)


def matmul_bf16_reference(a, b, out=None):
    """a (M, K) @ b (K, N) with both rounded to bfloat16, multiplied and summed in float32."""
    return np.matmul(round_to_bf16(a), round_to_bf16(b), out=out)


# -------------------------------------------------------------- the packers
if numba is not None:
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def _float32_bits(typingctx, x):
        """The 32 bits of a float32 as a uint32."""
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.IntType(32))

        return types.uint32(types.float32), codegen
else:
    def _float32_bits(x):
        return np.float32(x).view(np.uint32)


@inline
def _round32(x):
    """The bits of float32 x rounded to bfloat16 as round_to_bf16 rounds (ties to even; NaN
    quieted; a subnormal to a zero of its sign), in the high half of a uint32 whose low half is
    zero. Every result is computed and one selected: no branch, so loops of it vectorise."""
    u = _float32_bits(x)
    rounded = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    rounded = (u & np.uint32(0x80000000)) if (u & np.uint32(0x7F800000)) == np.uint32(0) else rounded
    quiet = (u & np.uint32(0xFFFF0000)) | np.uint32(0x400000)
    return quiet if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000) else rounded


@inline
def _bf16(x):
    """The bfloat16 bits of float32 x in the low half of a uint32."""
    return _round32(x) >> np.uint32(16)


@inline
def _pair(lo, hi):
    """One word of two bfloat16 values: lo in the low half, as vdpbf16ps takes them."""
    return _bf16(lo) | _round32(hi)


def scaled_pairs_along_row(x, scale, out, tmp):
    """out[kk] = the pair (x[2kk] * scale, x[2kk + 1] * scale) for a row x (K,) (a zero past an
    odd K), through tmp (an even number >= K of uint32, a row's scratch): each value rounded in
    place in a contiguous loop, then two neighbours joined as one 64-bit word. Both loops
    vectorise, where reading x two by two would not. In jitted code a contiguous float32 row
    goes 32 values an instruction (`_words_along`), tmp unused."""
    K = x.shape[0]
    for i in range(K):
        tmp[i] = _round32(x[i] * scale)
    if K % 2:
        tmp[K] = 0
    both = tmp.view(np.uint64)
    for kk in range(out.shape[0]):
        w = both[kk]
        out[kk] = np.uint32(((w >> np.uint64(16)) & np.uint64(0xFFFF)) | ((w >> np.uint64(32)) & np.uint64(0xFFFF0000)))


def pairs_across(x, lo, hi, out, at, n):
    """out.flat[at + j] = the pair (x.flat[lo + j], x.flat[hi + j]) for j < n: two rows of a
    C-contiguous float32 x into C-contiguous words. In jitted code 16 words an instruction
    (`_words_across`) but the last n % 16."""
    xf, of = x.reshape(-1), out.reshape(-1)
    for j in range(n):
        of[at + j] = _pair(xf[lo + j], xf[hi + j])


_along_loops, _across_loops = inline(scaled_pairs_along_row), inline(pairs_across)


@inline
def _pairs_along_row(x, out, tmp):
    """out[kk] = the pair (x[2kk], x[2kk + 1]) for a row x (K,): `scaled_pairs_along_row`."""
    scaled_pairs_along_row(x, np.float32(1.0), out, tmp)


@inline
def _scaled_pairs_along_row(x, scale, out, tmp):
    """`scaled_pairs_along_row`, for the kernels (in 16-lane vectors where it can)."""
    scaled_pairs_along_row(x, scale, out, tmp)


if numba is not None:
    from numba.extending import overload

    from fastformer.kernels._jit import ir_loop
    from fastformer.kernels._tiles import bf16_pairs, bf16_words, pointer, vector_at

    _F32x16, _I32x16 = ir.VectorType(ir.FloatType(), 16), ir.VectorType(ir.IntType(32), 16)
    _I16x32, _I64 = ir.VectorType(ir.IntType(16), 32), ir.IntType(64)

    def _contiguous(*arrays):
        return all(isinstance(a, types.Array) and a.layout == "C" for a in arrays)

    @intrinsic
    def _words_along(typingctx, src, s_off, dst, d_off, n, scale):
        """dst[d_off + j] = the pair (src[s_off + 2j] * scale, src[s_off + 2j + 1] * scale) for
        j < n, n a multiple of 16: 32 adjacent values, converted in one instruction, are 16 words
        in memory order."""
        if not (_contiguous(src, dst) and src.dtype == types.float32 and dst.dtype == types.uint32):
            return None
        sig = types.void(src, types.int64, dst, types.int64, types.int64, types.float32)

        def codegen(context, builder, signature, args):
            S = pointer(context, builder, signature.args[0], args[0], args[1])
            D = pointer(context, builder, signature.args[2], args[2], args[3])
            one = builder.insert_element(ir.Constant(_F32x16, None), args[5], ir.Constant(ir.IntType(32), 0))
            factor = builder.shuffle_vector(one, ir.Constant(_F32x16, None), ir.Constant(_I32x16, [0] * 16))

            def step(at, _):
                bf16_words(builder, S, D, at, factor)
                return []

            ir_loop(builder, "along", args[4], 16, [], step)
            return context.get_dummy_value()

        return sig, codegen

    @intrinsic
    def _words_across(typingctx, src, lo_off, hi_off, dst, d_off, n):
        """dst[d_off + j] = the pair (src[lo_off + j], src[hi_off + j]) for j < n, n a multiple of
        16: 16 of each converted in one instruction, then interleaved."""
        if not (_contiguous(src, dst) and src.dtype == types.float32 and dst.dtype == types.uint32):
            return None
        i = types.int64
        sig = types.void(src, i, i, dst, i, i)
        interleave = ir.Constant(ir.VectorType(ir.IntType(32), 32), [j // 2 + 16 * (j % 2) for j in range(32)])

        def codegen(context, builder, signature, args):
            L = pointer(context, builder, signature.args[0], args[0], args[1])
            H = pointer(context, builder, signature.args[0], args[0], args[2])
            D = pointer(context, builder, signature.args[3], args[3], args[4])

            def step(at, _):
                both = bf16_pairs(builder, builder.load(vector_at(builder, L, at, _F32x16), align=4),
                                builder.load(vector_at(builder, H, at, _F32x16), align=4))
                words = builder.shuffle_vector(both, ir.Constant(_I16x32, None), interleave)
                builder.store(builder.bitcast(words, _I32x16), vector_at(builder, D, at, _I32x16), align=4)
                return []

            ir_loop(builder, "across", args[5], 16, [], step)
            return context.get_dummy_value()

        return sig, codegen

    # The conversion is compiled into a kernel only on the bf16 path, whose callers have checked
    # the CPU (require_bf16); elsewhere, as under NUMBA_DISABLE_JIT, the loops above run.
    @overload(scaled_pairs_along_row)
    def _along_jit(x, scale, out, tmp):
        if not (_contiguous(x, out) and x.ndim == out.ndim == 1 and x.dtype == types.float32):
            return lambda x, scale, out, tmp: _along_loops(x, scale, out, tmp)

        def in_vectors(x, scale, out, tmp):
            K = x.shape[0]
            n = K // 32 * 16
            _words_along(x, 0, out, 0, n, scale)
            for kk in range(n, out.shape[0]):
                hi = x[2 * kk + 1] * scale if 2 * kk + 1 < K else np.float32(0.0)
                out[kk] = _pair(x[2 * kk] * scale, hi)
        return in_vectors

    @overload(pairs_across)
    def _across_jit(x, lo, hi, out, at, n):
        if not (_contiguous(x, out) and x.dtype == types.float32):
            return lambda x, lo, hi, out, at, n: _across_loops(x, lo, hi, out, at, n)

        def in_vectors(x, lo, hi, out, at, n):
            m = n // 16 * 16
            _words_across(x, lo, hi, out, at, m)
            if m < n:
                _across_loops(x, lo + m, hi + m, out, at + m, n - m)
        return in_vectors


# B is packed in panels: out (NP, K2, W) holds, for panel p, pair kk and lane j, the two values
# of k = 2kk and 2kk + 1 of column Wp + j; W = 32. A row-major A is packed row by row (Mp, K2);
# a transposed A (the x.T of a weight gradient) in panels of 16 rows like B's. The packers read
# row-major (C-contiguous) arrays; a transposed operand is read as the row-major array it is the
# transpose of. Each body is inlined once per panel width, so that LLVM sees W as a constant and
# vectorises over it.
@inline
def _pairs_down(x, out, c, W):
    """Pairs k = 2kk, 2kk + 1 from two rows of x (K, N), for kk in chunk c of 8 and every panel:
    out[p, kk, j] = the pair (x[2kk, Wp + j], x[2kk + 1, Wp + j]). 16 rows of x stay in L1/L2."""
    K, N = x.shape
    NP, K2, _ = out.shape
    F = x.dtype.type
    k0, k1 = c * 8, min(K2, c * 8 + 8)
    for p in range(NP):
        n0 = p * W
        w = min(W, N - n0)
        for kk in range(k0, k1):
            if w == W and 2 * kk + 1 < K:
                pairs_across(x, 2 * kk * N + n0, (2 * kk + 1) * N + n0, out, (p * K2 + kk) * W, W)
            else:  # the last panel, or an odd K's last pair: zeros past x
                for j in range(W):
                    lo = x[2 * kk, n0 + j] if j < w else F(0.0)
                    hi = x[2 * kk + 1, n0 + j] if j < w and 2 * kk + 1 < K else F(0.0)
                    out[p, kk, j] = _pair(lo, hi)


@kernel("void(R[:, ::1], uint32[:, :, ::1])", serial_twin=True, floats=("float32",))
def _pack_rows(x, out):
    """Panels of W = 16 or 32 lanes, pairs down the rows of x (K, N): `_pairs_down`."""
    W = out.shape[2]
    for c in prange((out.shape[1] + 7) // 8):
        if W == A_PANEL:
            _pairs_down(x, out, c, A_PANEL)
        else:
            _pairs_down(x, out, c, TILE_N)


@kernel("void(R[:, ::1], uint32[:, :, ::1])", serial_twin=True, floats=("float32",))
def _pack_cols(x, out):
    """Panels of 32 lanes, pairs along the rows of x (N, K): out[p, kk, j] = the pair
    (x[32p + j, 2kk], x[32p + j, 2kk + 1]). Each row's pairs are made in `row` (a contiguous loop
    that vectorises) and then written to their lane."""
    N, K = x.shape
    NP, K2, _ = out.shape
    for p in prange(NP):
        row = np.empty(K2, np.uint32)
        tmp = np.empty(2 * K2, np.uint32)
        n0 = p * TILE_N
        for j in range(TILE_N):
            if n0 + j < N:
                _pairs_along_row(x[n0 + j], row, tmp)
            else:
                row[:] = 0
            for kk in range(K2):
                out[p, kk, j] = row[kk]


FLAT_PAIRS = 2048  # pairs a pass of the packer makes when an even K lets it read x as one long row


@inline
def _long_row(flat, i0, i1, words, tmp):
    """words[i - i0] = the pair (flat[2i], flat[2i + 1]) for i0 <= i < i1: rows of an even K read
    as one long row, in passes of FLAT_PAIRS (tmp, >= 2 FLAT_PAIRS uint32, serves the loops' form)."""
    for p0 in range(i0, i1, FLAT_PAIRS):
        p1 = min(i1, p0 + FLAT_PAIRS)
        _pairs_along_row(flat[2 * p0:2 * p1], words[p0 - i0:p1 - i0], tmp)


@kernel("void(R[:, ::1], uint32[:, ::1])", serial_twin=True, floats=("float32",))
def _pack_a_rows(x, out):
    """A = x (M, K) row by row: out[m, kk] = the pair (x[m, 2kk], x[m, 2kk + 1]); rows past M zero.
    With K even no pair crosses a row, so x is packed as one long row in passes of FLAT_PAIRS:
    a row at a time paid a call's overhead every row, which at small K was most of its time."""
    M, K = x.shape
    Mp, K2 = out.shape
    if K % 2 == 0:
        flat, words = x.reshape(M * K), out.reshape(Mp * K2)
        n = M * K2
        passes = (n + FLAT_PAIRS - 1) // FLAT_PAIRS
        P = max(1, min(passes, ROW_CHUNKS))
        for part in prange(P):  # a scratch a part, not a pass: a pass takes well under a microsecond
            i0, i1 = part * passes // P * FLAT_PAIRS, min(n, (part + 1) * passes // P * FLAT_PAIRS)
            _long_row(flat, i0, i1, words[i0:i1], np.empty(2 * FLAT_PAIRS, np.uint32))
        for i in range(n, Mp * K2):
            words[i] = 0
        return
    for c in prange((Mp + A_PANEL - 1) // A_PANEL):
        tmp = np.empty(2 * K2, np.uint32)
        for m in range(c * A_PANEL, min(Mp, c * A_PANEL + A_PANEL)):
            if m < M:
                _pairs_along_row(x[m], out[m], tmp)
            else:
                for kk in range(K2):
                    out[m, kk] = 0


@kernel("void(R[:, ::1], uint32[:, :, ::1], uint32[:, ::1], float32[:, ::1])", serial_twin=True, floats=("float32",))
def _pack_both(d, b_panels, a_rows, sums_part):
    """d (M, N) packed both ways: as A of d @ w into a_rows (>= M, N2), as `_pack_a_rows` does, and
    pairs down its rows into b_panels (NP, M2, W), as `_pack_rows` does: with W = 32 the B of
    x.T @ d, with W = 16 the A of d.T @ y; with sums_part (P, N), not (P, 0), also the column sums
    of the p-th of P chunks of rows into sums_part[p], in float32.

    A block of 16 rows at a time: its rows packed along (and summed) one by one, then its 8 pairs
    of rows down into the panels. The second read of the block comes from the cache, so d is read
    from memory once, where the two packers and a sum would read it three times."""
    M, N = d.shape
    P = sums_part.shape[0]
    summed = sums_part.shape[1] > 0
    blocks = (b_panels.shape[1] + 7) // 8  # of 8 pairs of rows: 16 rows, the chunk of _pairs_down
    for part in prange(P):
        tmp = np.empty(2 * a_rows.shape[1], np.uint32)
        sums = sums_part[part]
        sums[:] = np.float32(0.0)
        for c in range(part * blocks // P, (part + 1) * blocks // P):
            for m in range(c * A_PANEL, min(M, c * A_PANEL + A_PANEL)):
                _pairs_along_row(d[m], a_rows[m], tmp)
                if summed:
                    for n in range(N):
                        sums[n] += d[m, n]
            if b_panels.shape[2] == A_PANEL:
                _pairs_down(d, b_panels, c, A_PANEL)
            else:
                _pairs_down(d, b_panels, c, TILE_N)


# ------------------------------------------------------------------ the GEMM
@inline
def _gemm_task(ap, ars, aks, a_row0, bp, c, M, N, bias, accumulate, rb, acc, src, s_off, dst, units):
    """Rows 64 rb .. 64 rb + 63 of c = A @ B + bias (or c += that), over every panel of B, ap
    holding A's rows from a_row0 (a multiple of 16) on; acc is an (8, 32) float32 scratch for the
    tiles that c cuts. Meanwhile `units` times 32 float32 values of src from s_off are packed into
    dst's words (16 each, from dst's first): the next task's rows of A, a few in each tile's
    first steps of k (`bf16_tile_into_packing`), the rest after the tiles.

    A whole tile asks for the next one's lines of c before it multiplies (`prefetch_tile`):
    without that a tile's stores wait on memory, which showed at K = 256, where a tile's whole sum
    is short. A in panels of 16 rows has its strides as constants, so the
    tile's loop reads A's words at fixed offsets from one pointer, where a stride known only at
    run time chains eight address additions through each step of k."""
    NP, K2, _ = bp.shape
    F = c.dtype.type
    ldc = c.strides[0] // 4
    direct = c.strides[1] == 4 and c.strides[0] % 4 == 0
    t0, t1 = rb * (BLOCK_M // TILE_M), min((M + TILE_M - 1) // TILE_M, (rb + 1) * (BLOCK_M // TILE_M))
    panels = ars == 1 and aks == A_PANEL
    share = min(K2, (units + NP * (t1 - t0) - 1) // (NP * (t1 - t0)))  # units a tile packs
    done = 0
    for p in range(NP):
        n0 = p * TILE_N
        w = min(TILE_N, N - n0)
        b_off = p * K2 * TILE_N
        for t in range(t0, t1):
            m0 = t * TILE_M
            h = min(TILE_M, M - m0)
            a_off = (m0 - a_row0) // A_PANEL * A_PANEL * K2 + m0 % A_PANEL * ars  # the tile's first row
            if direct and h == TILE_M and w == TILE_N:
                if t + 1 < t1 and m0 + 2 * TILE_M <= M:  # the next tile: 8 rows down, or the next panel's first
                    prefetch_tile(c, (m0 + TILE_M) * ldc + n0, ldc)
                elif t + 1 == t1 and n0 + 2 * TILE_N <= N:
                    prefetch_tile(c, t0 * TILE_M * ldc + n0 + TILE_N, ldc)
                if done < units:
                    n = min(share, units - done)
                    bf16_tile_into_packing(ap, a_off, ars, aks, bp, b_off, TILE_N, K2, c, m0 * ldc + n0, ldc, bias,
                                           n0, accumulate, src, s_off + 32 * done, dst, 16 * done, n)
                    done += n
                elif panels:
                    bf16_tile_into(ap, a_off, 1, A_PANEL, bp, b_off, TILE_N, K2, c, m0 * ldc + n0, ldc, bias, n0,
                                   accumulate)
                else:
                    bf16_tile_into(ap, a_off, ars, aks, bp, b_off, TILE_N, K2, c, m0 * ldc + n0, ldc, bias, n0,
                                   accumulate)
                continue
            bf16_tile(ap, a_off, ars, aks, bp, b_off, TILE_N, K2, acc)
            for r in range(h):
                for j in range(w):
                    v = acc[r, j] + bias[n0 + j]
                    c[m0 + r, n0 + j] = c[m0 + r, n0 + j] + v if accumulate else F(v)
    if done < units:
        _words_along(src, s_off + 32 * done, dst, 16 * done, 16 * (units - done), np.float32(1.0))


_NO_WORDS = np.zeros(0, np.uint32)
_NO_FLOATS = np.zeros(0, np.float32)


@kernel("void(uint32[::1], int64, int64, uint32[:, :, ::1], F[:, :], int64, int64, R[::1], boolean)",
        serial_twin=True, floats=("float32",))
def _gemm(ap, ars, aks, bp, c, M, N, bias, accumulate):
    """c (M, N) = A @ B + bias, or c += that with `accumulate`, from the packed A (row m's pair k
    at ap[m * ars + k * aks] within its panel of 16 rows: `PackedA`) and B (NP, K2, 32). Tasks of
    64 rows side by side on the threads, each over every panel of B; a tile that c holds whole has
    its epilogue in registers (when c's columns are adjacent)."""
    for rb in prange((M + BLOCK_M - 1) // BLOCK_M):
        _gemm_task(ap, ars, aks, 0, bp, c, M, N, bias, accumulate, rb, np.empty((TILE_M, TILE_N), np.float32),
                   _NO_FLOATS, 0, _NO_WORDS, 0)


@inline
def _pack_block(a, flat, rb, words, tmp):
    """words (BLOCK_M * K2,) = rows 64 rb .. 64 rb + 63 of a (M, K) packed row by row (rows past M zero)."""
    M, K = a.shape
    K2 = (K + 1) // 2
    m0 = rb * BLOCK_M
    rows = min(BLOCK_M, M - m0)
    if K % 2 == 0:  # the rows as one long row, as _pack_a_rows packs them: a call a row costs most at small K
        _long_row(flat, m0 * K2, (m0 + rows) * K2, words, tmp)
    else:
        for r in range(rows):
            _pairs_along_row(a[m0 + r], words[r * K2:(r + 1) * K2], tmp)
    words[rows * K2:] = 0  # rows past M: read by the last tile, never stored


@kernel("void(R[:, ::1], uint32[:, :, ::1], F[:, :], int64, int64, R[::1], boolean, int64)", serial_twin=True,
        floats=("float32",))
def _gemm_rows(a, bp, c, M, N, bias, accumulate, parts):
    """`_gemm` of a row-major A (M, K) that the GEMM packs itself, in `parts` (the threads; 1 for
    the serial twin), each over its run of 64-row blocks, into scratch that stays in the core's
    cache: a part's first block packed on its own, and each next one of its run, when whole, while
    the tiles of the one before multiply, into a second scratch (K even, K <= ALONGSIDE_K and
    N <= ALONGSIDE_N); otherwise after them, into the one scratch. So with no more blocks than
    parts nothing is packed alongside. A is read from memory once."""
    K = a.shape[1]
    K2 = bp.shape[1]
    flat = a.reshape(M * K)
    blocks = (M + BLOCK_M - 1) // BLOCK_M
    P = max(1, min(blocks, parts))
    pairs_alongside = K % 2 == 0 and K <= ALONGSIDE_K and N <= ALONGSIDE_N  # a block packed while one multiplies
    for part in prange(P):
        b0, b1 = part * blocks // P, (part + 1) * blocks // P
        words = np.empty((2 if pairs_alongside else 1, BLOCK_M * K2), np.uint32)
        tmp = np.empty(2 * max(K2, FLAT_PAIRS), np.uint32)
        acc = np.empty((TILE_M, TILE_N), np.float32)
        _pack_block(a, flat, b0, words[0], tmp)
        now = 0  # the scratch holding block rb's words
        for rb in range(b0, b1):
            alongside = pairs_alongside and rb + 1 < b1 and (rb + 2) * BLOCK_M <= M  # the next block, whole
            _gemm_task(words[now], K2, 1, rb * BLOCK_M, bp, c, M, N, bias, accumulate, rb, acc, flat,
                       (rb + 1) * BLOCK_M * K, words[(1 - now) % words.shape[0]], BLOCK_M * K // 32 if alongside else 0)
            if alongside:
                now = 1 - now
            elif rb + 1 < b1:  # into the same scratch, which stays in the cache (at K = 4096 two fill L2)
                _pack_block(a, flat, rb + 1, words[now], tmp)


@kernel("void(uint32[::1], int64, int64, uint32[:, :, ::1], F[:, ::1], int64, int64, R[::1], F[:, ::1], boolean)",
        serial_twin=True, floats=("float32",))
def _gemm_gelu(ap, ars, aks, bp, c, M, N, bias, g, exact):
    """`_gemm` into a C-contiguous c, and g = gelu(c) (the erf form with `exact`, else tanh's): each
    task's rows once it has made them, while they are still in its core's cache (after its whole
    rows, not tile by tile: a GELU per tile slows the tiles' loop)."""
    for rb in prange((M + BLOCK_M - 1) // BLOCK_M):
        _gemm_task(ap, ars, aks, 0, bp, c, M, N, bias, False, rb, np.empty((TILE_M, TILE_N), np.float32),
                   _NO_FLOATS, 0, _NO_WORDS, 0)
        for m in range(rb * BLOCK_M, min(M, rb * BLOCK_M + BLOCK_M)):
            for n in range(N):
                g[m, n] = _gelu(c[m, n], exact)


# ----------------------------------------------------------------- the API
class PackedB(NamedTuple):
    """B (K, N) packed for the kernel, to serve several products."""
    panels: np.ndarray  # (NP, K2, 32) uint32
    K: int
    N: int


class PackedA(NamedTuple):
    """A (M, K) packed for the kernel: row m's pair kk at words[m * rows_apart + kk * k_apart] within
    its panel of 16 rows (panel q starts at word 16q * K2): row by row (rows_apart K2, k_apart 1)
    or in panels of 16 lanes (1, 16)."""
    words: np.ndarray  # 1-D uint32
    rows_apart: int
    k_apart: int
    M: int
    K: int


def _transposed(x):
    """Whether x is the transpose of a C-contiguous array (and not C-contiguous itself)."""
    return x.T.flags.c_contiguous and not x.flags.c_contiguous


def pack_b(b):
    """B (K, N) float32, any strides (a transposed view included), packed into panels."""
    require_bf16()
    K, N = b.shape
    panels = np.empty(((N + TILE_N - 1) // TILE_N, (K + 1) // 2, TILE_N), np.uint32)
    if _transposed(b):
        sized(_pack_cols, b.size, PACK_PARALLEL)(b.T, panels)
    else:
        sized(_pack_rows, b.size, PACK_PARALLEL)(np.ascontiguousarray(b), panels)
    return PackedB(panels, K, N)


def pack_a(a):
    """A (M, K) float32, any strides: a transposed view in panels of 16 rows, anything else row
    by row (rows padded with zeros to a multiple of 16)."""
    M, K = a.shape
    K2, Mp = (K + 1) // 2, (M + A_PANEL - 1) // A_PANEL * A_PANEL
    if _transposed(a):
        panels = np.empty((Mp // A_PANEL, K2, A_PANEL), np.uint32)
        sized(_pack_rows, a.size, PACK_PARALLEL)(a.T, panels)
        return PackedA(panels.reshape(-1), 1, A_PANEL, M, K)
    words = np.empty((Mp, K2), np.uint32)
    sized(_pack_a_rows, a.size, PACK_PARALLEL)(np.ascontiguousarray(a), words)
    return PackedA(words.reshape(-1), K2, 1, M, K)


def pack_a_and_b(d, sums=None):
    """d (M, N) float32 (any strides: copied first unless C-contiguous) packed in one pass as both
    operands that a linear layer's backward makes of its output gradient: (the PackedA of d @ w,
    the PackedB of x.T @ d), the words `pack_a` and `pack_b` would make. With `sums` (N,) float32,
    d's column sums (the bias gradient) are written into it, summed in float32 over chunks of rows."""
    a_rows, b_panels = _pack_twice(d, TILE_N, sums)
    M, N = d.shape
    return a_rows, PackedB(b_panels, M, N)


def pack_a_and_at(x):
    """x (M, K) float32 packed in one pass as the left operand of both of a linear layer's
    products that read it: (the PackedA of x @ w, the PackedA of x.T @ dy, the weight gradient's),
    the words `pack_a(x)` and `pack_a(x.T)` would make. The forward makes both while x is in
    cache; the backward's weight gradient would otherwise read x from memory again."""
    a_rows, panels = _pack_twice(x, A_PANEL)
    M, K = x.shape
    return a_rows, PackedA(panels.reshape(-1), 1, A_PANEL, K, M)


def _pack_twice(d, lanes, sums=None):
    """(the PackedA of d's rows, d's pairs down its rows in panels of `lanes`): `_pack_both`."""
    require_bf16()
    d = np.ascontiguousarray(d, dtype=np.float32)
    M, N = d.shape
    M2, N2, Mp = (M + 1) // 2, (N + 1) // 2, (M + A_PANEL - 1) // A_PANEL * A_PANEL
    panels = np.empty(((N + lanes - 1) // lanes, M2, lanes), np.uint32)
    a_rows = np.empty((Mp, N2), np.uint32)
    a_rows[M:] = 0  # the rows that pad A to its panels of 16
    parts = max(1, min((M2 + 7) // 8, ROW_CHUNKS))
    sums_part = np.empty((parts, N if sums is not None else 0), np.float32)
    sized(_pack_both, d.size, PARALLEL_WORK)(d, panels, a_rows, sums_part)
    if sums is not None:
        sums_part.sum(axis=0, out=sums)
    return PackedA(a_rows.reshape(-1), N2, 1, M, N), panels


def matmul_bf16(a, b, out=None, bias=None, accumulate=False, gelu_out=None, approximate="tanh"):
    """out (M, N) = a (M, K) @ b (K, N) [+ bias (N,)], or out += that with `accumulate`, with
    bfloat16 products and float32 sums; a may be a PackedA and b a PackedB. float32 arrays of any
    strides (out one NumPy can write); the shapes are the caller's to check. With gelu_out (M, N)
    (it and out C-contiguous; not with `accumulate`) also gelu_out = gelu(out) in GELU's form
    `approximate` ("tanh" or "none", as activations.py), made by the GEMM's tasks. Returns out."""
    require_bf16()
    packed = b if isinstance(b, PackedB) else pack_b(b)
    M, K = (a.M, a.K) if isinstance(a, PackedA) else a.shape
    if K != packed.K:
        raise FastformerError(f"matmul_bf16: a {(M, K)} and b ({packed.K}, {packed.N}) do not chain")
    if out is None:
        out = np.empty((M, packed.N), np.float32)
        accumulate = False
    # the kernel writes through raw offsets: an array of another shape would be written past its end
    N = packed.N
    for name, x, shape in (("out", out, (M, N)), ("bias", bias, (N,)), ("gelu_out", gelu_out, (M, N))):
        if x is not None and (not isinstance(x, np.ndarray) or x.shape != shape or x.dtype != np.float32):
            raise FastformerError(f"matmul_bf16: {name} must be a float32 array of shape {shape}, got {describe(x)}")
    if M == 0 or N == 0:
        return out
    if K == 0:  # an empty sum
        if not accumulate:
            out[...] = 0 if bias is None else bias
        elif bias is not None:
            out += bias
        if gelu_out is not None:
            gelu_out[...] = gelu_forward(None, out, None, approximate)[0]
        return out
    bias = np.zeros(N, np.float32) if bias is None else bias
    work = 2 * M * N * K // 64
    if gelu_out is None and not isinstance(a, PackedA) and not _transposed(a):  # packed by the GEMM's tasks
        gemm = sized(_gemm_rows, work, PARALLEL_WORK)
        parts = numba.get_num_threads() if gemm is _gemm_rows else 1  # serial: one run, packed alongside throughout
        gemm(np.ascontiguousarray(a), packed.panels, out, M, N, bias, accumulate, parts)
        return out
    words, ars, aks, _, _ = a if isinstance(a, PackedA) else pack_a(a)
    if gelu_out is None:
        sized(_gemm, work, PARALLEL_WORK)(words, ars, aks, packed.panels, out, M, N, bias, accumulate)
    else:
        sized(_gemm_gelu, work, PARALLEL_WORK)(words, ars, aks, packed.panels, out, M, N, bias, gelu_out,
                                               approximate == "none")
    return out
