"""Matrix products with bfloat16 products and float32 sums: C = A @ B for float32 A, B and C.

Both inputs are rounded to bfloat16 (round to nearest even; a NaN stays a NaN), multiplied
exactly (a product of two bfloat16 values fits a float32) and summed in float32. On a CPU with
AVX-512 BF16 one `vdpbf16ps` does 32 such products into 16 float32 sums, twice the float32 FMA
rate; NumPy's BLAS has no such product, so this module brings its own.

Layout. A is packed as (Mp, K2) uint32 words, row m's bfloat16 values of k = 2kk and 2kk + 1
in word kk (low half first, as the instruction pairs them), Mp = M rounded up to the tile's
8 rows; B as (NP, K2, 32) words: panel p holds columns 32p .. 32p + 31, each word the pair of
rows 2kk and 2kk + 1. Padding is zeros, so every tile is full and only its store is cut to C.
The packers read any strides, so A and B may be transposed views (x.T): A @ B, A @ B.T and
A.T @ B are all a packing away, and a packed operand can serve many products (`pack_b`).

The micro-kernel (`_tile`) keeps an 8 x 32 tile of C in 16 zmm registers over the whole K: per
pair of k, two loads of B and, per row, one broadcast word of A and two `vdpbf16ps`. The GEMM
runs 64-row blocks side by side on the threads (`prange`), each over every panel. It is an
LLVM intrinsic written with llvmlite, compiled only when a product is asked for on a CPU that
has the instruction (`cpu_has_bf16`): LLVM aborts the process, rather than raising, when told to
emit it for a CPU without it.

The reference (`matmul_bf16_reference`) rounds the inputs exactly so and multiplies them with
NumPy in float32: the kernel matches it to float32 summation error. The instruction treats
float32 subnormals as zero, which the reference does not.
"""

from typing import NamedTuple

import numpy as np

from fastformer.errors import FastformerError
from fastformer.kernels._jit import inline, kernel, numba, prange, sized
from fastformer.kernels.process import cpu_has_bf16

TILE_M, TILE_N = 8, 32  # rows and columns of C per micro-kernel call
BLOCK_M = 64  # rows of a task: its packed A stays in L2 while it sweeps B's panels
PARALLEL_WORK = 1 << 17  # elements packed (or flops / 64 multiplied) below which one thread runs them


def require_bf16():
    """Refuse, in one line, to run the bfloat16 kernels on a CPU without the instructions."""
    if not cpu_has_bf16():
        raise FastformerError("precision bfloat16 needs a CPU with AVX-512 BF16 (the avx512_bf16 flag of "
                              "/proc/cpuinfo), which this one lacks: use float32")


# ---------------------------------------------------------------- reference
def round_to_bf16(x):
    """float32 x rounded to the nearest bfloat16 (ties to even), as float32 values whose low 16
    bits are zero; a NaN stays a (quiet) NaN, infinities stay infinite."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    u = x.view(np.uint32)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    rounded = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
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

    _F32x16 = ir.VectorType(ir.FloatType(), 16)
    _I32x16 = ir.VectorType(ir.IntType(32), 16)
    _I64 = ir.IntType(64)

    @intrinsic
    def _tile(typingctx, ap, a_off, lda, bp, b_off, kp, acc):
        """acc (8, 32) = the 8 x 32 tile of A @ B: A's 8 rows of kp words at ap[a_off + r * lda + k],
        B's panel of kp x 32 words at bp[b_off + 32 k + j]. One loop over k whose phi nodes carry
        the 16 accumulators; every product one vdpbf16ps."""
        sig = types.void(ap, types.int64, types.int64, bp, types.int64, types.int64, acc)

        def codegen(context, builder, signature, args):
            a_arr, a_off, lda, b_arr, b_off, kp, acc_arr = args
            A = builder.gep(context.make_array(signature.args[0])(context, builder, a_arr).data, [a_off])
            B = builder.gep(context.make_array(signature.args[3])(context, builder, b_arr).data, [b_off])
            C = context.make_array(signature.args[6])(context, builder, acc_arr).data
            name = "llvm.x86.avx512bf16.dpbf16ps.512"
            dot = builder.module.globals.get(name) or ir.Function(
                builder.module, ir.FunctionType(_F32x16, [_F32x16, _I32x16, _I32x16]), name)
            entry = builder.block
            head = builder.append_basic_block("tile.head")
            body = builder.append_basic_block("tile.body")
            done = builder.append_basic_block("tile.done")
            builder.branch(head)
            builder.position_at_end(head)  # every phi first in its block, as the verifier wants
            k = builder.phi(_I64)
            acc = [builder.phi(_F32x16) for _ in range(2 * TILE_M)]
            k.add_incoming(ir.Constant(_I64, 0), entry)
            for a in acc:
                a.add_incoming(ir.Constant(_F32x16, None), entry)
            builder.cbranch(builder.icmp_signed("<", k, kp), body, done)
            builder.position_at_end(body)
            b_at = builder.mul(k, ir.Constant(_I64, TILE_N))
            b0 = builder.load(builder.bitcast(builder.gep(B, [b_at]), _I32x16.as_pointer()), align=4)
            b1 = builder.load(builder.bitcast(builder.gep(B, [builder.add(b_at, ir.Constant(_I64, 16))]),
                                              _I32x16.as_pointer()), align=4)
            new = []
            for r in range(TILE_M):
                word = builder.load(builder.gep(A, [builder.add(builder.mul(ir.Constant(_I64, r), lda), k)]))
                one = builder.insert_element(ir.Constant(_I32x16, None), word, ir.Constant(ir.IntType(32), 0))
                both = builder.shuffle_vector(one, ir.Constant(_I32x16, None), ir.Constant(_I32x16, [0] * 16))
                new += [builder.call(dot, [acc[2 * r], both, b0]), builder.call(dot, [acc[2 * r + 1], both, b1])]
            latch = builder.block
            k.add_incoming(builder.add(k, ir.Constant(_I64, 1)), latch)
            for a, n in zip(acc, new):
                a.add_incoming(n, latch)
            builder.branch(head)
            builder.position_at_end(done)
            for i, a in enumerate(acc):
                builder.store(a, builder.bitcast(builder.gep(C, [ir.Constant(_I64, 16 * i)]), _F32x16.as_pointer()),
                              align=4)
            return context.get_dummy_value()

        return sig, codegen
else:
    def _float32_bits(x):
        return np.float32(x).view(np.uint32)

    _tile = None


@inline
def _bf16(x):
    """The bfloat16 bits of float32 x in the low half of a uint32 (ties to even; NaN quieted).
    Both results are computed and one selected: no branch, so the packers' loops vectorise."""
    u = _float32_bits(x)
    rounded = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    quiet = (u >> np.uint32(16)) | np.uint32(0x40)
    return quiet if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000) else rounded


@inline
def _pair(lo, hi):
    """One word of two bfloat16 values: lo in the low half, as vdpbf16ps takes them."""
    return _bf16(lo) | (_bf16(hi) << np.uint32(16))


# The packers read row-major (C-contiguous) arrays; a transposed operand is read as the row-major
# array it is the transpose of (pack_a, pack_b choose). Each loop nest writes its output in order
# and reads what it needs from cache lines it has just loaded: a transposing loop that walked one
# array with a stride of 4 KiB would have its loads alias in the cache.
CHUNK = 64  # pairs of k per pass of the transposing packers: their reads stay in L1


@kernel("void(R[:, ::1], uint32[:, ::1])", serial_twin=True, floats=("float32",))
def _pack_a_rows(x, out):
    """A = x (M, K): out[m, kk] = the pair (x[m, 2kk], x[m, 2kk + 1])."""
    M, K = x.shape
    Mp, K2 = out.shape
    for m in prange(Mp):
        if m >= M:
            for kk in range(K2):
                out[m, kk] = 0
            continue
        for kk in range(K // 2):
            out[m, kk] = _pair(x[m, 2 * kk], x[m, 2 * kk + 1])
        if K % 2:
            out[m, K2 - 1] = _bf16(x[m, K - 1])


@kernel("void(R[:, ::1], uint32[:, ::1])", serial_twin=True, floats=("float32",))
def _pack_a_cols(x, out):
    """A = x.T for x (K, M): out[m, kk] = the pair (x[2kk, m], x[2kk + 1, m]), in blocks of 16
    rows of A (one cache line of each row of x) by CHUNK pairs."""
    K, M = x.shape
    Mp, K2 = out.shape
    F = x.dtype.type
    for blk in prange((Mp + 15) // 16):
        m0, m1 = blk * 16, min(Mp, blk * 16 + 16)
        for k0 in range(0, K2, CHUNK):
            k1 = min(K2, k0 + CHUNK)
            for m in range(m0, m1):
                if m >= M:
                    for kk in range(k0, k1):
                        out[m, kk] = 0
                    continue
                for kk in range(k0, k1):
                    hi = x[2 * kk + 1, m] if 2 * kk + 1 < K else F(0.0)
                    out[m, kk] = _pair(x[2 * kk, m], hi)


@kernel("void(R[:, ::1], uint32[:, :, ::1])", serial_twin=True, floats=("float32",))
def _pack_b_rows(x, out):
    """B = x (K, N): out[p, kk, j] = the pair (x[2kk, 32p + j], x[2kk + 1, 32p + j]), in passes of
    8 pairs (16 rows of x, in L1/L2) over every panel: walking one panel down all of x would read
    128 bytes a row from rows that lie 4 KiB apart at the presets' widths."""
    K, N = x.shape
    NP, K2, _ = out.shape
    F = x.dtype.type
    for c in prange((K2 + 7) // 8):
        k0, k1 = c * 8, min(K2, c * 8 + 8)
        for p in range(NP):
            n0 = p * TILE_N
            w = min(TILE_N, N - n0)
            for kk in range(k0, k1):
                for j in range(w, TILE_N):
                    out[p, kk, j] = 0
                if 2 * kk + 1 < K:
                    for j in range(w):
                        out[p, kk, j] = _pair(x[2 * kk, n0 + j], x[2 * kk + 1, n0 + j])
                else:
                    for j in range(w):
                        out[p, kk, j] = _pair(x[2 * kk, n0 + j], F(0.0))


@kernel("void(R[:, ::1], uint32[:, :, ::1])", serial_twin=True, floats=("float32",))
def _pack_b_cols(x, out):
    """B = x.T for x (N, K): out[p, kk, j] = the pair (x[32p + j, 2kk], x[32p + j, 2kk + 1]), in
    passes of 8 pairs (one cache line of each of the panel's 32 rows of x)."""
    N, K = x.shape
    NP, K2, _ = out.shape
    F = x.dtype.type
    for p in prange(NP):
        n0 = p * TILE_N
        w = min(TILE_N, N - n0)
        for k0 in range(0, K2, 8):
            k1 = min(K2, k0 + 8)
            for kk in range(k0, k1):
                for j in range(w, TILE_N):
                    out[p, kk, j] = 0
            for j in range(w):
                for kk in range(k0, k1):
                    hi = x[n0 + j, 2 * kk + 1] if 2 * kk + 1 < K else F(0.0)
                    out[p, kk, j] = _pair(x[n0 + j, 2 * kk], hi)


# ------------------------------------------------------------------ the GEMM
@kernel("void(uint32[:, ::1], uint32[:, :, ::1], F[:, :], int64, int64, R[::1], boolean, boolean)",
        serial_twin=True, floats=("float32",))
def _gemm(ap, bp, c, M, N, bias, has_bias, accumulate):
    """c (M, N) (+)= A @ B (+ bias) from the packed A (Mp, K2) and B (NP, K2, 32)."""
    Mp, K2 = ap.shape
    NP = bp.shape[0]
    F = c.dtype.type
    for rb in prange((Mp + BLOCK_M - 1) // BLOCK_M):
        acc = np.empty((TILE_M, TILE_N), np.float32)
        for p in range(NP):
            n0 = p * TILE_N
            w = min(TILE_N, N - n0)
            for m0 in range(rb * BLOCK_M, min(Mp, rb * BLOCK_M + BLOCK_M), TILE_M):
                _tile(ap, m0 * K2, K2, bp, p * K2 * TILE_N, K2, acc)
                for r in range(min(TILE_M, M - m0)):
                    for j in range(w):
                        v = acc[r, j] + bias[n0 + j] if has_bias else acc[r, j]
                        c[m0 + r, n0 + j] = c[m0 + r, n0 + j] + v if accumulate else F(v)


# ----------------------------------------------------------------- the API
class PackedB(NamedTuple):
    """B (K, N) packed for the kernel, to serve several products."""
    panels: np.ndarray  # (NP, K2, 32) uint32
    K: int
    N: int


def _pack(x, rows, cols, out):
    """Run the packer `rows` on x when it is row-major, `cols` on x.T when x is the transpose of
    a row-major array, else `rows` on a row-major copy (a strided slice)."""
    if x.flags.c_contiguous:
        sized(rows, x.size, PARALLEL_WORK)(x, out)
    elif x.T.flags.c_contiguous:
        sized(cols, x.size, PARALLEL_WORK)(x.T, out)
    else:
        sized(rows, x.size, PARALLEL_WORK)(np.ascontiguousarray(x), out)
    return out


def pack_b(b):
    """B (K, N) float32, any strides (a transposed view included), packed into panels."""
    require_bf16()
    K, N = b.shape
    panels = np.empty(((N + TILE_N - 1) // TILE_N, (K + 1) // 2, TILE_N), np.uint32)
    return PackedB(_pack(b, _pack_b_rows, _pack_b_cols, panels), K, N)


def pack_a(a):
    """A (M, K) float32, any strides, packed into rows of bfloat16 pairs, padded to 8 rows."""
    M, K = a.shape
    words = np.empty(((M + TILE_M - 1) // TILE_M * TILE_M, (K + 1) // 2), np.uint32)
    return _pack(a, _pack_a_rows, _pack_a_cols, words)


_NO_BIAS = np.zeros(0, np.float32)


def matmul_bf16(a, b, out=None, bias=None, accumulate=False):
    """out (M, N) = a (M, K) @ b (K, N) [+ bias (N,)], or out += that with `accumulate`, with
    bfloat16 products and float32 sums; b may be a PackedB. float32 arrays of any strides (out
    one NumPy can write); the shapes are the caller's to check. Returns out."""
    require_bf16()
    packed = b if isinstance(b, PackedB) else pack_b(b)
    M, K = a.shape
    if K != packed.K:
        raise FastformerError(f"matmul_bf16: a {a.shape} and b ({packed.K}, {packed.N}) do not chain")
    if out is None:
        out = np.empty((M, packed.N), np.float32)
        accumulate = False
    if M == 0 or packed.N == 0:
        return out
    if K == 0:  # an empty sum
        if not accumulate:
            out[...] = 0 if bias is None else bias
        elif bias is not None:
            out += bias
        return out
    words = pack_a(a)
    sized(_gemm, 2 * M * packed.N * K // 64, PARALLEL_WORK)(words, packed.panels, out, M, packed.N,
                                                _NO_BIAS if bias is None else bias, bias is not None, accumulate)
    return out
