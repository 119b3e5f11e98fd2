"""bfloat16 matrix products: the rounding, the packers, the kernel against the reference (which
rounds the inputs exactly as it does and sums in float32), and the precision setting."""

import numpy as np
import pytest

import fastformer
from fastformer import FastformerError
from fastformer.kernels import use_precision
from fastformer.kernels.ops import gemm_bf16 as G

needs_bf16 = pytest.mark.skipif(not G.cpu_has_bf16(), reason="this CPU has no AVX-512 BF16: the kernel is not "
                                                             "compiled here (the reference parts still run)")


def test_round_to_bf16_ties_to_even_and_keeps_nan_and_inf():
    one = 1.0
    cases = {one + 2.0 ** -8: one,  # halfway between 1 and 1 + 2^-7: to the even 1
             one + 3 * 2.0 ** -8: one + 2.0 ** -6,  # halfway between 1 + 2^-7 and 1 + 2^-6: to the even one
             one + 2.0 ** -7: one + 2.0 ** -7,  # exact
             -2.5: -2.5, 0.0: 0.0, np.inf: np.inf, -np.inf: -np.inf,
             3.4e38: np.inf}  # past bfloat16's largest finite value: rounds to infinity as torch's does
    x = np.array(list(cases), np.float32)
    np.testing.assert_array_equal(G.round_to_bf16(x), np.array(list(cases.values()), np.float32))
    nan = G.round_to_bf16(np.array([np.nan, -np.nan], np.float32))
    assert np.isnan(nan).all()
    assert not (G.round_to_bf16(np.random.default_rng(0).standard_normal(1000).astype(np.float32))
                .view(np.uint32) & 0xFFFF).any()


def test_round_to_bf16_makes_subnormals_zeros_of_their_sign():
    """As the CPU's conversion (vcvtne2ps2bf16) does; its products treat them as zero anyway."""
    tiny = np.finfo(np.float32).tiny  # the smallest normal float32 stays
    x = np.array([1e-39, -1e-39, np.nextafter(tiny, 0), -np.nextafter(tiny, 0), tiny, -tiny], np.float32)
    got = G.round_to_bf16(x).view(np.uint32)
    np.testing.assert_array_equal(got, np.array([0, 0x80000000, 0, 0x80000000, 0x00800000, 0x80800000], np.uint32))


def test_round_to_bf16_agrees_with_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(1).standard_normal(10000).astype(np.float32) * 10.0 ** np.arange(-5, 5).repeat(1000)
    np.testing.assert_array_equal(G.round_to_bf16(x), torch.from_numpy(x).bfloat16().float().numpy())


def _operand(rng, shape, transposed, strided):
    """A float32 (rows, cols) operand stored plainly, as a transposed view, or as a strided slice."""
    rows, cols = shape
    if transposed:
        return rng.standard_normal((cols, rows)).astype(np.float32).T
    if strided:
        return rng.standard_normal((rows, 2 * cols + 1)).astype(np.float32)[:, 1::2]
    return rng.standard_normal(shape).astype(np.float32)


@needs_bf16
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (7, 3, 33), (8, 2, 32), (9, 5, 31), (65, 129, 97), (300, 40, 70)])
@pytest.mark.parametrize("ta,tb", [(False, False), (False, True), (True, False)])
def test_kernel_matches_the_reference(M, K, N, ta, tb):
    """Shapes across every tile edge (8 rows, 32 columns, odd K), A @ B, A @ B.T, A.T @ B."""
    rng = np.random.default_rng(M * 1000 + K * 10 + N)
    a, b = _operand(rng, (M, K), ta, strided=not ta), _operand(rng, (K, N), tb, strided=False)
    want = G.matmul_bf16_reference(a, b).astype(np.float64)
    got = G.matmul_bf16(a, b)
    # float32 sums of K exact products, in another order: a few ulps of the sum of |products|
    bound = 4 * K * np.finfo(np.float32).eps * (np.abs(G.round_to_bf16(a)) @ np.abs(G.round_to_bf16(b)))
    assert (np.abs(got - want) <= bound + 1e-30).all()


@needs_bf16
# an even K packs a block's rows as one long row in passes of FLAT_PAIRS: (70, 130) crosses them mid-row
@pytest.mark.parametrize("M,K,N", [(1, 2, 1), (63, 33, 40), (130, 64, 97), (200, 129, 33), (70, 130, 40)])
@pytest.mark.parametrize("layout", ["plain", "rows apart"])
@pytest.mark.parametrize("threads", ["serial", "parallel"])
def test_a_row_major_a_is_packed_by_the_tasks_that_multiply_it(monkeypatch, M, K, N, layout, threads):
    """A row-major A is not packed whole: each task of the GEMM packs its 64 rows itself into the
    words pack_a makes, so the bits are those of the product of pack_a's A, across the blocks' and
    tiles' edges, with a bias and accumulation."""
    if threads == "parallel":
        monkeypatch.setattr(G, "PARALLEL_WORK", 0)
    rng = np.random.default_rng(M + K + N)
    a = rng.standard_normal((M, K + (3 if layout == "rows apart" else 0))).astype(np.float32)[:, :K]
    b, bias, before = (rng.standard_normal(s).astype(np.float32) for s in ((K, N), (N,), (M, N)))
    want = before.copy()
    G.matmul_bf16(G.pack_a(a), b, out=want, bias=bias, accumulate=True)

    def whole(a):
        raise AssertionError("the GEMM packed A whole")

    monkeypatch.setattr(G, "pack_a", whole)
    got = before.copy()
    G.matmul_bf16(a, b, out=got, bias=bias, accumulate=True)
    np.testing.assert_array_equal(got, want)
    reference = before + G.matmul_bf16_reference(a, b) + bias
    bound = 4 * (K + 2) * np.finfo(np.float32).eps * (np.abs(before) + np.abs(G.round_to_bf16(a)) @
                                                       np.abs(G.round_to_bf16(b)) + np.abs(bias))
    assert (np.abs(got - reference) <= bound).all()


@needs_bf16
# (200, 64, 40): blocks packed alongside, the last (8 rows) apart, and half the tiles cut by N, so
# that the packing left over runs after them; (256, 256, 64): every tile packs; K = 258 and
# N = 160 are past ALONGSIDE_K and ALONGSIDE_N; K odd packs row by row
@pytest.mark.parametrize("M,K,N,alongside", [(200, 64, 40, True), (256, 256, 64, True), (192, 2, 32, True),
                                             (200, 40, 64, True), (130, 258, 32, False), (192, 64, 160, False),
                                             (150, 33, 64, False)])
@pytest.mark.parametrize("parts", [1, 2, 3, 5])
@pytest.mark.parametrize("out_layout", ["plain", "transposed"])
def test_each_part_of_the_gemm_packs_its_next_block_while_it_multiplies(M, K, N, alongside, parts, out_layout):
    """However the blocks fall to the parts, each part's words are those of pack_a: the product
    has the bits of the product of pack_a's A, with a bias and accumulation. (192, 2, 32): a
    tile packs in every step of its k; an output whose columns are not adjacent leaves all the
    packing to after the tiles."""
    assert (K % 2 == 0 and K <= G.ALONGSIDE_K and N <= G.ALONGSIDE_N) == alongside
    rng = np.random.default_rng(M + K + N + parts)
    a, b, bias, before = (rng.standard_normal(s).astype(np.float32) for s in ((M, K), (K, N), (N,), (M, N)))

    def out_like(x):
        return x.copy() if out_layout == "plain" else np.asfortranarray(x)

    want = before.copy()
    G.matmul_bf16(G.pack_a(a), b, out=want, bias=bias, accumulate=True)
    got = out_like(before)
    G._gemm_rows(a, G.pack_b(b).panels, got, M, N, bias, True, parts)
    np.testing.assert_array_equal(got, want)
    fresh = out_like(np.full((M, N), np.nan, np.float32))
    G._gemm_rows(a, G.pack_b(b).panels, fresh, M, N, bias, False, parts)
    np.testing.assert_array_equal(fresh, G.matmul_bf16(G.pack_a(a), b, bias=bias))


@needs_bf16
@pytest.mark.parametrize("n", [0, 1, 5, 16, 40])
def test_the_packing_tile_is_the_tile_and_the_packer(n):
    """bf16_tile_into_packing's tile is bf16_tile_into's, bit for bit, and its first n steps of k
    (at most the tile's 16) pack 32 values each into the words pack_a makes of them."""
    numba = pytest.importorskip("numba")
    from fastformer.kernels._tiles import bf16_tile_into, bf16_tile_into_packing

    @numba.njit
    def both(ap, bp, kp, c_plain, c_packing, bias, src, dst, n):
        bf16_tile_into(ap, 0, kp, 1, bp, 0, 32, kp, c_plain, 0, 32, bias, 0, False)
        bf16_tile_into_packing(ap, 0, kp, 1, bp, 0, 32, kp, c_packing, 0, 32, bias, 0, False, src, 32, dst, 0, n)

    rng = np.random.default_rng(n)
    K = 32  # kp = 16 steps of k
    a, b, bias = rng.standard_normal((8, K)).astype(np.float32), rng.standard_normal((K, 32)).astype(np.float32), \
        rng.standard_normal(32).astype(np.float32)
    src = rng.standard_normal(32 * 50).astype(np.float32)
    src[40] = np.nan
    dst = np.zeros(16 * 50, np.uint32)
    c_plain, c_packing = np.empty((8, 32), np.float32), np.empty((8, 32), np.float32)
    both(G.pack_a(a).words, G.pack_b(b).panels.reshape(-1), K // 2, c_plain, c_packing, bias, src, dst, n)
    np.testing.assert_array_equal(c_packing, c_plain)
    np.testing.assert_array_equal(c_plain, G.matmul_bf16(G.pack_a(a), b, bias=bias))
    done = min(n, K // 2)
    np.testing.assert_array_equal(dst[:16 * done], G.pack_a(src[32:32 + 32 * done].reshape(1, -1)).words[:16 * done])
    assert not dst[16 * done:].any()


@needs_bf16
def test_bias_accumulate_read_only_and_packed_operands():
    rng = np.random.default_rng(2)
    a, b, bias = (rng.standard_normal(s).astype(np.float32) for s in ((40, 70), (70, 50), (50,)))
    a.setflags(write=False)
    b.setflags(write=False)
    want = G.matmul_bf16_reference(a, b)
    out = rng.standard_normal((40, 50)).astype(np.float32)
    before = out.copy()
    G.matmul_bf16(a, b, out=out, bias=bias, accumulate=True)
    np.testing.assert_allclose(out, before + want + bias, rtol=1e-5, atol=1e-4)
    packed = G.pack_b(b)
    np.testing.assert_allclose(G.matmul_bf16(a, packed), want, rtol=1e-5, atol=1e-4)
    view = np.zeros((50, 40), np.float32).T  # an output written through a transposed view
    G.matmul_bf16(a, packed, out=view)
    np.testing.assert_allclose(view, want, rtol=1e-5, atol=1e-4)


@needs_bf16
def test_outputs_and_bias_of_another_shape_are_refused_before_the_kernel_writes():
    a, b = np.ones((40, 70), np.float32), np.ones((70, 50), np.float32)
    f32 = np.float32
    cases = [({"out": np.zeros((40, 49), f32)}, "out"), ({"out": np.zeros((4, 50), f32)}, "out"),
             ({"out": np.zeros((40, 50))}, "out"), ({"bias": np.zeros(49, f32)}, "bias"),
             ({"bias": [0.0] * 50}, "bias"),
             ({"out": np.zeros((40, 50), f32), "gelu_out": np.zeros((40, 5), f32)}, "gelu_out")]
    for kwargs, name in cases:
        with pytest.raises(FastformerError, match=f"{name} must be a float32 array of shape"):
            G.matmul_bf16(a, b, **kwargs)
    with use_precision("bfloat16"), pytest.raises(FastformerError, match="out must be"):
        fastformer.get_ops().matmul(a, b, out=np.zeros((40, 49), np.float32))


@needs_bf16
@pytest.mark.parametrize("transposed", [False, True])
def test_packers_hold_the_rounded_values_in_pairs(transposed):
    rng = np.random.default_rng(3)
    b = _operand(rng, (5, 37), transposed, strided=False)  # K = 5: an odd row of pairs, N = 37: two panels
    panels = G.pack_b(b).panels  # (2, 3, 32)
    lo = (panels & 0xFFFF).astype(np.uint32) << 16
    hi = panels & np.uint32(0xFFFF0000)
    unpacked = np.stack((lo, hi), axis=2).view(np.float32)  # (2, 3, 2, 32): panel, pair, row of the pair, column
    rows = unpacked.transpose(1, 2, 0, 3).reshape(6, 64)[:5, :37]
    np.testing.assert_array_equal(rows, G.round_to_bf16(b))
    assert not unpacked.transpose(1, 2, 0, 3).reshape(6, 64)[5].any() and not rows.size == 0
    a = _operand(rng, (11, 5), transposed, strided=False)
    words, rows_apart, k_apart, M, K = G.pack_a(a)  # 16 rows (11 and zeros) of three pairs of k
    assert (M, K) == (11, 5)
    assert (rows_apart, k_apart) == ((1, 16) if transposed else (3, 1))
    at = np.arange(16)[:, None] * rows_apart + np.arange(3)[None, :] * k_apart
    got = words[at]
    pairs = np.stack(((got & 0xFFFF).astype(np.uint32) << 16, got & np.uint32(0xFFFF0000)), axis=2)
    rows = pairs.view(np.float32).reshape(16, 6)
    np.testing.assert_array_equal(rows[:11, :5], G.round_to_bf16(a))
    assert not rows[11:].any() and not rows[:, 5].any()


def _words_along_rows(x):
    """The reference's words of x (rows, K): pairs along each row, rounded by round_to_bf16."""
    r = G.round_to_bf16(x).view(np.uint32) >> np.uint32(16)
    if r.shape[1] % 2:
        r = np.pad(r, ((0, 0), (0, 1)))
    return r[:, 0::2] | (r[:, 1::2] << np.uint32(16))


SPECIAL = np.array([np.nan, -np.nan, np.inf, -np.inf, 1e-39, -1e-39, 1.1754942e-38, -1.1754942e-38,
                    1.17549435e-38, 0.0, -0.0, 1 + 2 ** -8, 1 + 3 * 2 ** -8, 3.4e38, -3.4e38], np.float32)


@needs_bf16
@pytest.mark.parametrize("K", [6, 64, 70, 77])
@pytest.mark.parametrize("packer", ["pack_a", "pack_a transposed", "pack_b", "pack_b transposed", "pack_a_and_b"])
def test_packers_round_every_value_as_the_reference(packer, K):
    """Every packer's words, in the CPU's conversion (32 values an instruction) and in the loops
    of the rest, are the reference's bits: NaNs quieted (a signalling one too), infinities, ties
    to even, overflow to infinity, subnormals to zeros of their sign."""
    rng = np.random.default_rng(K)
    M = 45
    x = rng.standard_normal((M, K)).astype(np.float32)
    at = rng.choice(M * K, 4 * SPECIAL.size, replace=False)
    x.reshape(-1)[at] = np.resize(SPECIAL, at.size)
    x.reshape(-1)[at[0]] = np.uint32(0x7F800001).view(np.float32)  # a signalling NaN
    K2 = (K + 1) // 2
    if packer == "pack_a":
        got = G.pack_a(x).words.reshape(-1, K2)[:M]
        want = _words_along_rows(x)
    elif packer == "pack_a transposed":  # A = x.T (K, M) from its rows' pairs down x, in panels of 16
        M2 = (M + 1) // 2
        got = G.pack_a(x.T).words
        got = got.reshape(-1, M2, 16).transpose(0, 2, 1).reshape(-1, M2)[:K]
        want = _words_along_rows(x.T)
    elif packer == "pack_b":  # B = x (M, K): column n's pairs down the rows
        got = G.pack_b(x).panels.transpose(0, 2, 1).reshape(-1, (M + 1) // 2)[:K]
        want = _words_along_rows(x.T)
    elif packer == "pack_b transposed":  # B = x.T (K, M): column m is row m of x
        got = G.pack_b(x.T).panels.transpose(0, 2, 1).reshape(-1, K2)[:M]
        want = _words_along_rows(x)
    else:
        a_rows, b = G.pack_a_and_b(x)
        np.testing.assert_array_equal(b.panels.transpose(0, 2, 1).reshape(-1, (M + 1) // 2)[:K],
                                      _words_along_rows(x.T))
        got, want = a_rows.words.reshape(-1, K2)[:M], _words_along_rows(x)
    np.testing.assert_array_equal(got, want)


@needs_bf16
@pytest.mark.parametrize("M,K", [(1, 2), (17, 64), (300, 30), (129, 33), (77, 130)])
@pytest.mark.parametrize("threads", ["serial", "parallel"])
def test_row_major_a_is_packed_in_pairs_along_its_rows(monkeypatch, M, K, threads):
    """pack_a of a row-major A: row m's pairs (x[m, 2kk], x[m, 2kk + 1]) rounded to bf16, a zero
    past an odd K, zero rows up to a multiple of 16; an even K is packed as one long row in passes
    of FLAT_PAIRS (here across pass edges: 300 x 15 and 77 x 65 pairs), an odd K row by row."""
    if threads == "parallel":
        monkeypatch.setattr(G, "PACK_PARALLEL", 0)
    a = np.random.default_rng(M + K).standard_normal((M, K)).astype(np.float32)
    words, rows_apart, k_apart, m, k = G.pack_a(a)
    K2, Mp = (K + 1) // 2, (M + 15) // 16 * 16
    assert (rows_apart, k_apart, m, k) == (K2, 1, M, K) and words.shape == (Mp * K2,)
    got = words.reshape(Mp, K2)
    values = np.stack(((got & 0xFFFF).astype(np.uint32) << 16, got & np.uint32(0xFFFF0000)), axis=2)
    values = values.view(np.float32).reshape(Mp, 2 * K2)
    np.testing.assert_array_equal(values[:M, :K], G.round_to_bf16(a))
    assert not values[M:].any() and not values[:, K:].any()


@needs_bf16
def test_nan_and_inf_propagate_as_in_the_reference():
    a = np.ones((9, 4), np.float32)
    b = np.ones((4, 33), np.float32)
    a[2, 1] = np.nan
    b[3, 5] = np.inf
    got, want = G.matmul_bf16(a, b), G.matmul_bf16_reference(a, b)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))


def test_reference_linear_layer_in_bfloat16_rounds_its_inputs(ref):
    rng = np.random.default_rng(4)
    x, w = rng.standard_normal((6, 10)).astype(np.float32), rng.standard_normal((10, 3)).astype(np.float32)
    with use_precision("bfloat16"):
        y, cache = ref.linear_forward(x, w)
    assert cache.precision == "bfloat16"
    np.testing.assert_array_equal(y, G.round_to_bf16(x) @ G.round_to_bf16(w))
    y32, _ = ref.linear_forward(x, w)  # float32 again outside the block
    np.testing.assert_array_equal(y32, x @ w)


@needs_bf16
def test_a_model_step_in_bfloat16_matches_the_reference(fast_ops, ref):
    """Loss and every gradient of a small LM in bfloat16: Numba's kernels (the GEMM, and the
    attention's register tiles: heads of 32 channels) against the reference's rounding, to
    float32 summation error; and both near the float32 step."""
    from fastformer import LMConfig, TransformerLM

    cfg = LMConfig(vocab_size=50, max_seq_len=16, d_model=64, n_heads=2, d_ff=64, n_layers=2)
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 50, size=(3, 16))
    results = {}
    for name in ("numpy", "numba"):
        with fastformer.use_backend(name), use_precision("bfloat16"):
            m = TransformerLM(cfg, seed=0)
            loss, grads = m.loss_and_grads(ids[:, :-1], ids[:, 1:])
            results[name] = (loss, m.flat.grad.copy())
    m = TransformerLM(cfg, seed=0)
    loss32, _ = m.loss_and_grads(ids[:, :-1], ids[:, 1:])
    (l_ref, g_ref), (l_nb, g_nb) = results["numpy"], results["numba"]
    assert abs(l_nb - l_ref) < 1e-5 * abs(l_ref)
    np.testing.assert_allclose(g_nb, g_ref, rtol=1e-3, atol=1e-5 * np.abs(g_ref).max())
    assert l_ref != loss32 and abs(l_ref - loss32) < 1e-2 * loss32  # bfloat16 inputs: close, not equal


def test_a_narrow_heads_bfloat16_chunks_keep_their_logits_in_l2():
    """The fused LM head's default chunk rows: 8 MiB of logits (at least 256 rows), but in
    bfloat16 with h of up to 128 columns 2 MiB (at least 64 rows)."""
    from fastformer.kernels.ops.cross_entropy import head_chunk_rows

    assert head_chunk_rows(4096, np.float32) == head_chunk_rows(4096, np.float32, 64, "float32") == 512
    assert head_chunk_rows(4096, np.float32, 128, "bfloat16") == 128
    assert head_chunk_rows(4096, np.float32, 129, "bfloat16") == 512
    assert head_chunk_rows(50257, np.float32, 64, "bfloat16") == 64
    assert head_chunk_rows(50257, np.float32, 768, "bfloat16") == 256


@needs_bf16
def test_the_fused_head_in_bfloat16_across_its_default_chunks_matches_the_reference(fast_ops, ref):
    """300 rows at V = 4096 and C = 32: three default bfloat16 chunks of 128 rows, loss and both
    gradients against the reference (which chunks alike and rounds as the kernel does)."""
    rng = np.random.default_rng(6)
    h, w = rng.standard_normal((300, 32)).astype(np.float32), rng.standard_normal((4096, 32)).astype(np.float32)
    t = rng.integers(0, 4096, size=300)
    with use_precision("bfloat16"):
        loss, (dh, dw) = fast_ops.linear_cross_entropy_forward(h, w, t, grad=True)
        loss_ref, (dh_ref, dw_ref) = ref.linear_cross_entropy_forward(h, w, t, grad=True)
    assert abs(loss - loss_ref) < 1e-5 * abs(loss_ref)
    for got, want in ((dh, dh_ref), (dw, dw_ref)):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5 * np.abs(want).max())


def test_precision_setting_is_checked():
    with pytest.raises(FastformerError, match="unknown precision 'fp16': valid values are float32, bfloat16"):
        fastformer.kernels.set_precision("fp16")
    assert fastformer.kernels.get_precision() == "float32"


def test_numba_backend_without_the_cpu_feature_refuses_bfloat16(monkeypatch):
    pytest.importorskip("numba")
    from fastformer.kernels.backends import NumbaOps

    monkeypatch.setattr(G, "cpu_has_bf16", lambda: False)
    ops = NumbaOps()
    assert ops.matmul_precisions["float32"] == ("float32",)
    with fastformer.use_backend("numba"):  # a backend made now, on the CPU without it; restored after
        with pytest.raises(FastformerError, match="bfloat16 needs a CPU with AVX-512 BF16"):
            fastformer.kernels.set_precision("bfloat16")


@needs_bf16
def test_tiled_attention_in_bfloat16_stays_near_float32(fast_ops, ref, tiled):
    """The tiled attention's block products in bfloat16 (the row kernels, which take these heads
    of 8 channels below ATTENTION_TILED_FROM, have none): within bfloat16's rounding of the
    float32 result, forward and backward."""
    rng = np.random.default_rng(6)
    B, T, H, hs = 2, 11, 2, 8
    qkv = rng.standard_normal((B, T, 3 * H * hs)).astype(np.float32)
    dout = rng.standard_normal((B, T, H * hs)).astype(np.float32)
    want, cache = ref.attention_qkv_forward(qkv, H)
    dwant = ref.attention_qkv_backward(dout, cache)
    with use_precision("bfloat16"):
        got, cache = fast_ops.attention_qkv_forward(qkv, H)
        dgot = fast_ops.attention_qkv_backward(dout, cache)
    assert not np.array_equal(got, want)  # the products really were bfloat16
    np.testing.assert_allclose(got, want, rtol=0, atol=3e-2 * np.abs(want).max())
    np.testing.assert_allclose(dgot, dwant, rtol=0, atol=3e-2 * np.abs(dwant).max())



def _dout(rng, shape, layout):
    """A float32 output gradient (rows, cols) stored plainly, as a strided slice, read-only, or as
    a transposed view."""
    if layout == "transposed":
        return rng.standard_normal(shape[::-1]).astype(np.float32).T
    d = _operand(rng, shape, transposed=False, strided=layout == "strided")
    d.setflags(write=layout != "read-only")
    return d


@needs_bf16
@pytest.mark.parametrize("M,N", [(1, 1), (2, 3), (7, 33), (16, 32), (17, 64), (33, 5), (65, 97), (300, 70)])
@pytest.mark.parametrize("layout", ["plain", "strided", "read-only", "transposed"])
@pytest.mark.parametrize("threads", ["serial", "parallel"])
def test_pack_a_and_b_makes_both_packers_words_and_the_column_sums(monkeypatch, M, N, layout, threads):
    """One pass over d gives the words of pack_a(d) and pack_b(d), across the edges of A's panels of
    16 rows (M), of B's pairs of rows (odd M) and panels of 32 columns (N), and of A's pairs (odd N);
    on one thread and in chunks of rows on the threads (each with its partial sums)."""
    if threads == "parallel":
        monkeypatch.setattr(G, "PARALLEL_WORK", 0)
    rng = np.random.default_rng(M * 100 + N)
    d = _dout(rng, (M, N), layout)
    sums = np.full(N, np.nan, np.float32)
    packed_a, packed_b = G.pack_a_and_b(d, sums=sums)
    want_a, want_b = G.pack_a(np.ascontiguousarray(d)), G.pack_b(np.ascontiguousarray(d))
    np.testing.assert_array_equal(packed_a.words, want_a.words)
    assert packed_a[1:] == want_a[1:]
    np.testing.assert_array_equal(packed_b.panels, want_b.panels)
    assert packed_b[1:] == want_b[1:]
    # float32 sums of M terms, in any order: within (M - 1) eps * sum |d| of the exact sum, and so
    # within twice that of NumPy's float32 sum
    exact = d.astype(np.float64).sum(axis=0)
    bound = max(M - 1, 1) * np.finfo(np.float32).eps * np.abs(d).astype(np.float64).sum(axis=0)
    assert (np.abs(sums - exact) <= bound).all()
    assert (np.abs(sums - d.sum(axis=0)) <= 2 * bound).all()
    again_a, again_b = G.pack_a_and_b(d)  # without the sums: the same words
    np.testing.assert_array_equal(again_a.words, packed_a.words)
    np.testing.assert_array_equal(again_b.panels, packed_b.panels)
    # as a linear layer's input: the words of pack_a(d) and of pack_a(d.T), d.T in panels of 16
    rows, cols = G.pack_a_and_at(d)
    want_t = G.pack_a(np.ascontiguousarray(d).T)
    np.testing.assert_array_equal(rows.words, want_a.words)
    assert rows[1:] == want_a[1:]
    assert cols[1:] == (1, G.A_PANEL, N, M)
    if want_t.k_apart == G.A_PANEL:  # pack_a reads d.T as rows where d has one row or column
        np.testing.assert_array_equal(cols.words, want_t.words)
    y = rng.standard_normal((M, 3)).astype(np.float32)
    np.testing.assert_array_equal(G.matmul_bf16(cols, y), G.matmul_bf16(np.ascontiguousarray(d).T, y))


@needs_bf16
@pytest.mark.parametrize("N,Cin,Cout", [(1, 1, 1), (7, 3, 33), (9, 5, 31), (16, 32, 32), (65, 129, 97),
                                        (300, 40, 70)])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("layout", ["plain", "strided", "read-only"])
def test_linear_backward_in_bfloat16_reads_dout_once(fast_ops, ref, N, Cin, Cout, with_bias, layout):
    """The Numba backend's linear backward (dout packed and summed in one pass) gives the bits of
    the reference's way on the same GEMM (two packers, then NumPy's sum for dbias, which it
    matches to float32 summation error), and the reference's results to float32 summation error;
    a weight stored as torch's (Cout, Cin) too."""
    from fastformer.kernels.ops import matmul

    rng = np.random.default_rng(N * 10000 + Cin * 100 + Cout)
    x = rng.standard_normal((N, Cin)).astype(np.float32)
    if Cout % 2:  # stored (Cout, Cin), read transposed
        w = rng.standard_normal((Cout, Cin)).astype(np.float32).T
    else:
        w = rng.standard_normal((Cin, Cout)).astype(np.float32)
    dout = _dout(rng, (N, Cout), layout)
    grads = {}
    for name, backward in (("fused", fast_ops.linear_backward),
                           ("fused, x in the cache", fast_ops.linear_backward),
                           ("two packers", lambda *a: matmul.linear_backward(fast_ops, *a)),
                           ("reference", ref.linear_backward)):
        on = ref if name == "reference" else fast_ops
        _, cache = on.linear_forward(x, w, precision="bfloat16")
        if name == "fused":  # the forward packed x^T for the weight gradient
            assert isinstance(cache.x2, G.PackedA) and (cache.x2.M, cache.x2.K) == (Cin, N)
        elif name != "reference":  # the reference's cache, x itself
            cache = matmul.LinearCache(x, w, "bfloat16")
        dw, db = np.full((Cin, Cout), np.nan, np.float32), np.full(Cout, np.nan, np.float32) if with_bias else None
        dx = backward(dout, cache, dw, db)
        grads[name] = dx, dw, db
    (dx, dw, db), (dx_ref, dw_ref, _) = grads["fused"], grads["reference"]
    for other in ("fused, x in the cache", "two packers"):
        dx2, dw2, db2 = grads[other]
        np.testing.assert_array_equal(dx, dx2)
        np.testing.assert_array_equal(dw, dw2)
    eps = np.finfo(np.float32).eps
    if with_bias:
        bound = max(N - 1, 1) * eps * np.abs(dout).sum(axis=0)
        assert (np.abs(db - db2) <= 2 * bound).all()
    d16, x16, w16 = (np.abs(G.round_to_bf16(a)) for a in (dout, x, w))
    assert (np.abs(dx - dx_ref) <= 4 * Cout * eps * (d16 @ w16.T) + 1e-30).all()
    assert (np.abs(dw - dw_ref) <= 4 * N * eps * (x16.T @ d16) + 1e-30).all()


def test_linear_backward_in_float32_stays_on_blas(fast_ops, ref):
    """precision float32: the Numba backend's linear backward is the reference's, BLAS's bits."""
    rng = np.random.default_rng(8)
    x, w, dout = (rng.standard_normal(s).astype(np.float32) for s in ((2, 9, 12), (12, 40), (2, 9, 40)))
    results = []
    for ops in (fast_ops, ref):
        _, cache = ops.linear_forward(x, w, precision="float32")
        dw, db = np.empty_like(w), np.empty(40, np.float32)
        results.append((ops.linear_backward(dout, cache, dw, db), dw, db))
    for got, want in zip(*results):
        np.testing.assert_array_equal(got, want)


@needs_bf16
@pytest.mark.parametrize("N,Cin,Cout", [(1, 1, 1), (7, 3, 33), (9, 5, 31), (16, 32, 32), (65, 129, 97),
                                        (300, 40, 70)])
@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("threads", ["serial", "parallel"])
def test_linear_gelu_forward_in_bfloat16_is_the_two_ops(monkeypatch, fast_ops, ref, N, Cin, Cout, approximate,
                                                        with_bias, threads):
    """The GELU in the bf16 GEMM's epilogue gives the bits of linear_forward then gelu_forward on the
    same backend, and its cache the same gradients; and the reference's results to float32
    summation error (the inputs rounded to bfloat16 alike). On one thread and on the threads."""
    if threads == "parallel":
        monkeypatch.setattr(G, "PARALLEL_WORK", 0)
    rng = np.random.default_rng(N * 10000 + Cin * 100 + Cout)
    x = rng.standard_normal((1, N, Cin)).astype(np.float32)
    w = rng.standard_normal((Cin, Cout)).astype(np.float32)
    bias = rng.standard_normal(Cout).astype(np.float32) if with_bias else None
    g, cache = fast_ops.linear_gelu_forward(x, w, bias, approximate=approximate, precision="bfloat16")
    f, linear = fast_ops.linear_forward(x, w, precision="bfloat16")
    want, gelu = fast_ops.gelu_forward(f, bias, approximate=approximate)
    np.testing.assert_array_equal(g, want)
    assert cache.linear.precision == "bfloat16"
    dg = rng.standard_normal(g.shape).astype(np.float32)
    for got, expected in zip(fast_ops.gelu_backward(dg, cache.gelu), fast_ops.gelu_backward(dg, gelu)):
        np.testing.assert_array_equal(got, expected)
    g_ref, _ = ref.linear_gelu_forward(x, w, bias, approximate=approximate, precision="bfloat16")
    # u = x @ w + bias within 4 K eps of sum |products|, and GELU's slope is below 1.2
    bound = 4 * Cin * np.finfo(np.float32).eps * (np.abs(G.round_to_bf16(x)) @ np.abs(G.round_to_bf16(w)))
    assert (np.abs(g - g_ref) <= 1.2 * bound + 1e-6 * np.abs(g_ref) + 1e-30).all()


def test_linear_gelu_forward_checks_the_bias_and_the_form_as_the_two_ops(ops):
    """A bias of the wrong length or an unknown form is refused in the words of gelu_forward, in
    float32 and (where the backend offers it) bfloat16, where the kernel checks before its GEMM."""
    x, w = np.ones((3, 4), np.float32), np.ones((4, 5), np.float32)
    for precision in ops.matmul_precisions["float32"]:
        with pytest.raises(FastformerError, match=r"bias must have shape \(5,\)"):
            ops.linear_gelu_forward(x, w, np.ones(6, np.float32), precision=precision)
        with pytest.raises(FastformerError, match="approximate must be one of tanh, none, got 'erf'"):
            ops.linear_gelu_forward(x, w, np.ones(5, np.float32), approximate="erf", precision=precision)


def test_linear_gelu_forward_in_float32_is_the_two_ops(ops):
    rng = np.random.default_rng(9)
    x, w, bias = (rng.standard_normal(s).astype(np.float32) for s in ((2, 9, 12), (12, 40), (40,)))
    g, cache = ops.linear_gelu_forward(x, w, bias, precision="float32")
    f, _ = ops.linear_forward(x, w, precision="float32")
    np.testing.assert_array_equal(g, ops.gelu_forward(f, bias)[0])
    np.testing.assert_array_equal(cache.gelu.x, f)
