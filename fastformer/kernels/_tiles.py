"""Register-blocked tile products, written in LLVM IR: an 8 x 32 tile of C = A @ B kept in 16
zmm accumulators over the whole K, the bfloat16 GEMM's (ops/gemm_bf16.py) and the attention
kernels' (ops/attention.py: float32, and bfloat16 in that precision); and few rows by a group of
columns, the weight formats' products (ops/quantized.py: `make_group_tile`, "int8" on `vpdpbusd`
too).

Per step k of the sum: two 16-lane loads of B's row k (32 columns), and per row r of the tile one
broadcast of A[r, k] and two products into the row's two accumulators. Both operands are read
through strides, so one intrinsic serves packed panels and plain arrays alike: row r's k-th A
element at A[a_off + r * ars + k * aks], B's k-th row of 32 at B[b_off + k * bks].

    "bf16": A and B hold uint32 words, each a pair of bfloat16 values along K (as gemm_bf16.py
            packs them); a product is one `vdpbf16ps` (32 bfloat16 products into 16 float32 sums).
            Compiled only on a CPU with AVX-512 BF16: LLVM aborts the process, rather than
            raising, when told to emit it for a CPU without it (gemm_bf16.require_bf16 checks).
    "f32":  float32 A and B, a product one fused multiply-add of 16 lanes (`llvm.fma`), which
            LLVM can emit for any x86-64 CPU (in halves without AVX-512).

`tile` stores the tile's sums into an (8, 32) float32 array, for the tiles that C cuts; `tile_into`
finishes a whole tile in registers: c[c_off + r * ldc + j] = sums (+ bias[n0 + j]) (+ the old c
with `accumulate`), the sum rounded as c + (sums + bias); `bf16_tile_into_packing` is "bf16"'s
`tile_into` whose first steps of k also pack float32 values into bfloat16 pairs, the next rows of
A that the GEMM multiplies after this block. LLVM's verifier wants every phi node at
the top of its block, and Numba's disk cache works with these intrinsics because the kernels
calling them are module-level functions.

Without Numba this module imports and defines nothing but the tile's shape.
"""

from fastformer.kernels._jit import numba

TILE_M, TILE_N = 8, 32  # rows and columns of C per tile


def tiles_run():
    """Whether the tiles can run here: they are compiled code, so not without Numba nor under
    NUMBA_DISABLE_JIT (where the kernels run as Python and take their other paths)."""
    return numba is not None and not numba.config.DISABLE_JIT


if numba is not None:
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    from fastformer.kernels._jit import ir_loop

    _F32 = ir.FloatType()
    _F32x16 = ir.VectorType(_F32, 16)
    _I32x16 = ir.VectorType(ir.IntType(32), 16)
    _I8x64 = ir.VectorType(ir.IntType(8), 64)
    _I64 = ir.IntType(64)

    def pointer(context, builder, array_type, array, offset):
        """The address of element `offset` of a Numba array (counted from its first element)."""
        return builder.gep(context.make_array(array_type)(context, builder, array).data, [offset])

    def vector_at(builder, base, offset, lanes):
        """base + offset (elements) as a pointer to a vector of `lanes`' type."""
        return builder.bitcast(builder.gep(base, [offset]), lanes.as_pointer())

    def store_vectors(builder, C, vectors, lanes):
        """Store the vectors one after the other from C (16 lanes each): a tile's sums into acc."""
        for n, v in enumerate(vectors):
            builder.store(v, vector_at(builder, C, ir.Constant(_I64, 16 * n), lanes), align=4)

    def prefetch(builder, at, write=False):
        """The IR of a prefetch of the cache line at pointer `at` (into every level, for reading, or
        for writing: `prefetchw`). A prefetch never faults, wherever it points."""
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        name = "llvm.prefetch.p0"
        fn = builder.module.globals.get(name) or ir.Function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), name)
        builder.call(fn, [builder.bitcast(at, i8p), ir.Constant(i32, int(write)), ir.Constant(i32, 3),
                          ir.Constant(i32, 1)])

    def sums_type(kind):
        """The accumulators' vector type: 16 int32 sums for "int8", 16 float32 ones otherwise."""
        return _I32x16 if kind == "int8" else _F32x16

    def _product(builder, kind):
        """(lanes of A's broadcast and of B's loads, the function acc, a, b -> acc + a . b)."""
        if kind == "int8":  # LLVM 22's signature; the all-<16 x i32> form is accepted too
            name, args, lanes = "llvm.x86.avx512.vpdpbusd.512", [_I32x16, _I8x64, _I8x64], _I32x16
        elif kind == "bf16":
            name, args, lanes = "llvm.x86.avx512bf16.dpbf16ps.512", [_F32x16, _I32x16, _I32x16], _I32x16
        else:
            name, args, lanes = "llvm.fma.v16f32", [_F32x16, _F32x16, _F32x16], _F32x16
        fn = builder.module.globals.get(name) or ir.Function(builder.module, ir.FunctionType(args[0], args), name)
        if kind == "int8":  # u8 activations times s8 weights, 4 a lane
            return lanes, lambda acc, a, b: builder.call(fn, [acc, builder.bitcast(a, _I8x64),
                                                              builder.bitcast(b, _I8x64)])
        if kind == "bf16":
            return lanes, lambda acc, a, b: builder.call(fn, [acc, a, b])
        return lanes, lambda acc, a, b: builder.call(fn, [a, b, acc])

    def tile_sums(builder, kind, A, ars, aks, B, bks, kp, rows=TILE_M, vectors=2, start=None, brs=None, ahead=0,
                  side=None):
        """The IR of the loop over k: returns the rows x vectors accumulators (row r, columns
        16h .. 16h + 15 at r * vectors + h) once it is done, the builder then in the block after
        it. Row r's k-th A element (word) at A[r * ars + k * aks], B's k-th row of 16 * vectors at
        B[k * bks] (at B[r * brs + k * bks] for row r, with `brs`: each row its own B). `start`:
        each vector's first value (shared by the rows), zeros by default. `ahead` > 0: each step
        also prefetches the lines of B that many words past its row. `side` (n, work): the first n
        steps (n <= kp) also emit work(k), a job of another loop's interleaved with the products
        (`bf16_tile_into_packing`). One loop whose phi nodes carry the accumulators ("int8":
        vpdpbusd, as quantized.py uses it); with `side`, two, its first n steps and the rest."""
        lanes, product = _product(builder, kind)
        acc_type = sums_type(kind)
        start = start or [ir.Constant(acc_type, None)] * vectors
        row_at = [builder.gep(A, [builder.mul(ir.Constant(_I64, r), ars)]) for r in range(rows)]

        def b_row(at):
            return [builder.load(vector_at(builder, B, builder.add(at, ir.Constant(_I64, 16 * h)), lanes), align=4)
                    for h in range(vectors)]

        def step(k, acc):
            b_at = builder.mul(k, bks)
            b = None if brs is not None else b_row(b_at)
            for h in range(vectors if ahead else 0):  # a 16-word vector is one 64-byte line
                prefetch(builder, builder.gep(B, [builder.add(b_at, ir.Constant(_I64, 16 * h + ahead))]))
            a_at = builder.mul(k, aks)
            new = []
            for r in range(rows):
                word = builder.load(builder.gep(row_at[r], [a_at]))
                one = builder.insert_element(ir.Constant(lanes, None), word, ir.Constant(ir.IntType(32), 0))
                both = builder.shuffle_vector(one, ir.Constant(lanes, None), ir.Constant(_I32x16, [0] * 16))
                br = b if brs is None else b_row(builder.add(b_at, builder.mul(ir.Constant(_I64, r), brs)))
                new += [product(acc[r * vectors + h], both, br[h]) for h in range(vectors)]
            return new

        first = [start[i % vectors] for i in range(rows * vectors)]
        if side is None:
            return ir_loop(builder, "tile", kp, 1, first, step)
        n, work = side

        def step_and_work(k, acc):
            work(k)
            return step(k, acc)

        first = ir_loop(builder, "tile.side", n, 1, first, step_and_work)
        return ir_loop(builder, "tile.rest", builder.sub(kp, n), 1, first,
                       lambda k, acc: step(builder.add(k, n), acc))

    def _make_tile(kind):
        def tile(typingctx, ap, a_off, ars, aks, bp, b_off, bks, kp, acc):
            """acc (8, 32) = the tile's sums (the module's layout)."""
            i = types.int64
            sig = types.void(ap, i, i, i, bp, i, i, i, acc)

            def codegen(context, builder, signature, args):
                a_arr, a_off, ars, aks, b_arr, b_off, bks, kp, acc_arr = args
                A = pointer(context, builder, signature.args[0], a_arr, a_off)
                B = pointer(context, builder, signature.args[4], b_arr, b_off)
                C = pointer(context, builder, signature.args[8], acc_arr, ir.Constant(_I64, 0))
                store_vectors(builder, C, tile_sums(builder, kind, A, ars, aks, B, bks, kp), _F32x16)
                return context.get_dummy_value()

            return sig, codegen

        tile.__name__ = tile.__qualname__ = f"{kind}_tile"
        return intrinsic(tile)

    def finish_tile(builder, sums, C, ldc, bias, accumulate):
        """The IR that stores a tile's sums into the 8 x 32 block of c at C (rows ldc apart):
        sums + bias[:32], or c + (sums + bias[:32]) with `accumulate`."""
        flag = builder.trunc(accumulate, ir.IntType(1)) if accumulate.type != ir.IntType(1) else accumulate
        b = [builder.load(vector_at(builder, bias, ir.Constant(_I64, 16 * h), _F32x16), align=4) for h in range(2)]

        def store(old):
            for r in range(TILE_M):
                row = builder.mul(ir.Constant(_I64, r), ldc)
                for h in range(2):
                    at = vector_at(builder, C, builder.add(row, ir.Constant(_I64, 16 * h)), _F32x16)
                    v = builder.fadd(sums[2 * r + h], b[h])
                    builder.store(builder.fadd(builder.load(at, align=4), v) if old else v, at, align=4)

        # a branch, not a select: a select would load the old c (and wait on it) for every tile
        with builder.if_else(flag) as (adding, writing):
            with adding:
                store(True)
            with writing:
                store(False)

    def _make_tile_into(kind):
        def tile_into(typingctx, ap, a_off, ars, aks, bp, b_off, bks, kp, c, c_off, ldc, bias, n0, accumulate):
            """The 8 x 32 block of c at c_off (rows ldc apart, columns adjacent) = the tile's sums
            + bias[n0:n0 + 32], or c + (sums + bias[n0:n0 + 32]) with `accumulate`."""
            i = types.int64
            sig = types.void(ap, i, i, i, bp, i, i, i, c, i, i, bias, i, types.boolean)

            def codegen(context, builder, signature, args):
                tile_into_ir(context, builder, signature, args, kind)
                return context.get_dummy_value()

            return sig, codegen

        tile_into.__name__ = tile_into.__qualname__ = f"{kind}_tile_into"
        return intrinsic(tile_into)

    def tile_into_ir(context, builder, signature, args, kind, side=None):
        """The IR of a `tile_into` from its first 14 arguments (the tile's loop with `side`, as
        tile_sums takes it)."""
        a_arr, a_off, ars, aks, b_arr, b_off, bks, kp, c_arr, c_off, ldc, bias_arr, n0, accumulate = args[:14]
        A = pointer(context, builder, signature.args[0], a_arr, a_off)
        B = pointer(context, builder, signature.args[4], b_arr, b_off)
        C = pointer(context, builder, signature.args[8], c_arr, c_off)
        bias = pointer(context, builder, signature.args[11], bias_arr, n0)
        finish_tile(builder, tile_sums(builder, kind, A, ars, aks, B, bks, kp, side=side), C, ldc, bias, accumulate)

    def bf16_pairs(builder, lo, hi):
        """32 bfloat16 values, lo's 16 then hi's (float32 vectors), rounded by `vcvtne2ps2bf16`
        (nearest even, a NaN quieted, a subnormal a zero of its sign): <32 x i16> (LLVM 22
        upgrades this form of the intrinsic's signature)."""
        name = "llvm.x86.avx512bf16.cvtne2ps2bf16.512"
        i16x32 = ir.VectorType(ir.IntType(16), 32)
        fn = builder.module.globals.get(name) or ir.Function(builder.module,
                                                             ir.FunctionType(i16x32, [_F32x16, _F32x16]), name)
        return builder.call(fn, [hi, lo])

    def bf16_words(builder, S, D, at, factor=None):
        """The IR that makes the 16 words D[at:at + 16] of float32 S[2 at:2 at + 32] (times the
        16-lane `factor`, if given): adjacent values in pairs, in memory order."""
        x = builder.mul(at, ir.Constant(_I64, 2))
        lo, hi = (builder.load(vector_at(builder, S, builder.add(x, ir.Constant(_I64, h)), _F32x16), align=4)
                  for h in (0, 16))
        if factor is not None:
            lo, hi = builder.fmul(lo, factor), builder.fmul(hi, factor)
        builder.store(builder.bitcast(bf16_pairs(builder, lo, hi), _I32x16), vector_at(builder, D, at, _I32x16),
                      align=4)

    @intrinsic
    def bf16_tile_into_packing(typingctx, ap, a_off, ars, aks, bp, b_off, bks, kp, c, c_off, ldc, bias, n0,
                               accumulate, src, s_off, dst, d_off, n):
        """`bf16_tile_into`, whose first n steps of k (n is taken as at most kp) also pack 32
        float32 values of src each: dst[d_off + 16j + i] = the pair (src[s_off + 32j + 2i], src[s_off + 32j + 2i + 1])
        for i < 16, j < n. The conversion's instructions run on other ports than `vdpbf16ps`'s:
        measured on this CPU, one of them beside 16 products costs nothing, so the next rows of A
        are packed while this tile multiplies, where packing them apart stalls the products."""
        i = types.int64
        sig = types.void(ap, i, i, i, bp, i, i, i, c, i, i, bias, i, types.boolean, src, i, dst, i, i)

        def codegen(context, builder, signature, args):
            kp, (s_arr, s_off, d_arr, d_off, n) = args[7], args[14:]
            S = pointer(context, builder, signature.args[14], s_arr, s_off)
            D = pointer(context, builder, signature.args[16], d_arr, d_off)
            n = builder.select(builder.icmp_signed("<", n, kp), n, kp)  # never past the tile's own steps
            tile_into_ir(context, builder, signature, args, "bf16",
                         side=(n, lambda j: bf16_words(builder, S, D, builder.mul(j, ir.Constant(_I64, 16)))))
            return context.get_dummy_value()

        return sig, codegen

    def make_group_tile(kind, rows, vectors, ahead=0):
        """An intrinsic tile(b, b_off, kp, a, a_off, lda, init, i_off, acc) for few rows: acc
        (rows * 16 * vectors,) = rows of A words a[a_off + r * lda + k] times the group of B words
        b[b_off + k * 16 * vectors ...] over k < kp (the packed weights of quantized.py), each
        row's sums started at init[i_off:] for "int8" (the column-sum correction), at zero for the
        float kinds (init unread). Each vector of B is the memory operand of `rows` products;
        `ahead` > 0: B's lines are prefetched that many words ahead of the step reading them."""
        def group_tile(typingctx, b, b_off, kp, a, a_off, lda, init, i_off, acc):
            i = types.int64
            sig = types.void(b, i, i, a, i, i, init, i, acc)

            def codegen(context, builder, signature, args):
                b_arr, b_off, kp, a_arr, a_off, lda, init_arr, i_off, acc_arr = args
                B = pointer(context, builder, signature.args[0], b_arr, b_off)
                A = builder.bitcast(pointer(context, builder, signature.args[3], a_arr, ir.Constant(_I64, 0)),
                                    ir.IntType(32).as_pointer())  # u8 or uint32 activations, a word at a time
                A = builder.gep(A, [a_off])
                C = pointer(context, builder, signature.args[8], acc_arr, ir.Constant(_I64, 0))
                acc_type, start = sums_type(kind), None
                if kind == "int8":
                    first = pointer(context, builder, signature.args[6], init_arr, i_off)
                    start = [builder.load(vector_at(builder, first, ir.Constant(_I64, 16 * h), acc_type), align=4)
                             for h in range(vectors)]
                store_vectors(builder, C, tile_sums(builder, kind, A, lda, ir.Constant(_I64, 1), B,
                                                    ir.Constant(_I64, 16 * vectors), kp, rows=rows, vectors=vectors,
                                                    start=start, ahead=ahead), acc_type)
                return context.get_dummy_value()

            return sig, codegen

        group_tile.__name__ = group_tile.__qualname__ = f"{kind}_group_tile{rows}x{vectors}"
        return intrinsic(group_tile)

    @intrinsic
    def prefetch_tile(typingctx, c, c_off, ldc):
        """Ask for the cache lines of the 8 x 32 block of float32 c at c_off (rows ldc apart), for
        writing (`prefetchw`): issued a tile ahead, the lines arrive while that tile multiplies,
        where a tile's stores would otherwise wait on memory. A prefetch never faults."""
        i = types.int64
        sig = types.void(c, i, i)

        def codegen(context, builder, signature, args):
            c_arr, c_off, ldc = args
            C = pointer(context, builder, signature.args[0], c_arr, c_off)
            for r in range(TILE_M):
                for h in range(2):
                    prefetch(builder, builder.gep(C, [builder.add(builder.mul(ir.Constant(_I64, r), ldc),
                                                                  ir.Constant(_I64, 16 * h))]), write=True)
            return context.get_dummy_value()

        return sig, codegen

    @intrinsic
    def prefetch_span(typingctx, a, a_off, n):
        """Ask for the cache lines of a[a_off:a_off + n], for reading: the start of a stream that
        the next loop reads, while the caller does something else. A prefetch never faults."""
        i = types.int64
        sig = types.void(a, i, i)

        def codegen(context, builder, signature, args):
            a_arr, a_off, n = args
            A = builder.bitcast(pointer(context, builder, signature.args[0], a_arr, a_off), ir.IntType(8).as_pointer())
            size = context.get_abi_sizeof(context.get_data_type(signature.args[0].dtype))

            def step(at, _):
                prefetch(builder, builder.gep(A, [at]))
                return []

            ir_loop(builder, "prefetch", builder.mul(n, ir.Constant(_I64, size)), 64, [], step)
            return context.get_dummy_value()

        return sig, codegen

    bf16_tile, bf16_tile_into = _make_tile("bf16"), _make_tile_into("bf16")
    f32_tile, f32_tile_into = _make_tile("f32"), _make_tile_into("f32")

    def _make_weighted_rows(vectors, chains=4):
        def weighted(typingctx, p, n, v, ldv, acc):
            """acc (chains, 16 * vectors) = the sums over k < n // chains of p[chains k + c] times
            v's row chains k + c (rows ldv apart), for c < chains: the rows' weighted sum in
            `chains` independent chains of products (one chain waits on each product's latency),
            which the caller adds up; rows past chains * (n // chains) are the caller's."""
            i = types.int64
            sig = types.void(p, i, v, i, acc)

            def codegen(context, builder, signature, args):
                p_arr, n, v_arr, ldv, acc_arr = args
                A = pointer(context, builder, signature.args[0], p_arr, ir.Constant(_I64, 0))
                B = pointer(context, builder, signature.args[2], v_arr, ir.Constant(_I64, 0))
                C = pointer(context, builder, signature.args[4], acc_arr, ir.Constant(_I64, 0))
                step = ir.Constant(_I64, chains)
                store_vectors(builder, C, tile_sums(builder, "f32", A, ir.Constant(_I64, 1), step, B,
                                                    builder.mul(ldv, step), builder.sdiv(n, step), rows=chains,
                                                    vectors=vectors, brs=ldv), _F32x16)
                return context.get_dummy_value()

            return sig, codegen

        weighted.__name__ = weighted.__qualname__ = f"f32_weighted_rows{chains}x{vectors}"
        return intrinsic(weighted)

    # decoding's p @ v for a head size of 32 or 64: a weighted sum of a head's value rows
    weighted_rows32, weighted_rows64 = _make_weighted_rows(2), _make_weighted_rows(4)

    @intrinsic
    def scaled_copy(typingctx, src, s_off, dst, d_off, n, scale):
        """dst[d_off:d_off + n] = src[s_off:s_off + n] * scale for float32 arrays, n a multiple of
        16, in 16-lane vectors: a row of a strided view (its elements adjacent) into scratch, where
        Numba's copy of an array of unknown layout goes a float at a time."""
        i = types.int64
        sig = types.void(src, i, dst, i, i, types.float32)

        def codegen(context, builder, signature, args):
            s_arr, s_off, d_arr, d_off, n, scale = args
            S = pointer(context, builder, signature.args[0], s_arr, s_off)
            D = pointer(context, builder, signature.args[2], d_arr, d_off)
            factor = builder.shuffle_vector(builder.insert_element(ir.Constant(_F32x16, None), scale,
                                                                   ir.Constant(ir.IntType(32), 0)),
                                            ir.Constant(_F32x16, None), ir.Constant(_I32x16, [0] * 16))

            def step(at, _):
                x = builder.load(vector_at(builder, S, at, _F32x16), align=4)
                builder.store(builder.fmul(x, factor), vector_at(builder, D, at, _F32x16), align=4)
                return []

            ir_loop(builder, "copy", n, 16, [], step)
            return context.get_dummy_value()

        return sig, codegen
else:
    bf16_tile = bf16_tile_into = bf16_tile_into_packing = f32_tile = f32_tile_into = make_group_tile = None
    prefetch_tile = prefetch_span = None
    weighted_rows32 = weighted_rows64 = scaled_copy = None
