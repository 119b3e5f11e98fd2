"""Weights for inference (kernels/ops/quantized.py): the packers, the reference's quantisation and
exact integer sums, and the vpdpbusd / vdpbf16ps kernels against the reference."""

import numpy as np
import pytest

from fastformer import FastformerError
from fastformer.kernels import use_backend
from fastformer.kernels.ops import quantized as Q

needs = {"int8": pytest.mark.skipif(not Q.cpu_has_vnni(), reason="no AVX-512 VNNI: the int8 kernel is not compiled"),
         "bf16": pytest.mark.skipif(not Q.cpu_has_bf16(), reason="no AVX-512 BF16: the bf16 kernel is not compiled")}
PACKED = [pytest.param(f, marks=needs[f]) for f in ("int8", "bf16")]
# rows across the 2-row tile, K across a word (4 or 2 k's), N across a panel (16) and a group (128)
SHAPES = [(1, 1, 1), (1, 4, 16), (2, 5, 17), (3, 7, 127), (4, 8, 128), (5, 9, 129), (7, 64, 256), (16, 130, 300)]


def _x(rng, M, K, strided=False):
    if strided:
        return rng.standard_normal((M, 2 * K + 1)).astype(np.float32)[:, 1::2]
    return rng.standard_normal((M, K)).astype(np.float32)


@pytest.mark.parametrize("fmt", ["int8", "bf16"])
@pytest.mark.parametrize("K,N", [(1, 1), (5, 17), (9, 130), (64, 256)])
def test_packer_puts_each_value_where_the_layout_says(fmt, K, N):
    rng = np.random.default_rng(K * N)
    dtype = np.int8 if fmt == "int8" else np.uint16
    values = rng.integers(-127 if fmt == "int8" else 0, 128 if fmt == "int8" else 1 << 16, (K, N)).astype(dtype)
    words = Q.pack_words(values, fmt)
    per, Kw, G = Q.K_PER_WORD[fmt], Q.words_per_row(fmt, K), Q.groups(N)
    assert words.dtype == np.uint32 and words.shape == (G * Kw * Q.GROUP_N,)
    lanes = words.view(dtype)
    for k, n in [(0, 0), (K - 1, N - 1), (K // 2, N // 3), (K - 1, 0), (0, N - 1)]:
        g, p, j = n // Q.GROUP_N, n % Q.GROUP_N // Q.PANEL_N, n % Q.PANEL_N
        word = ((g * Kw + k // per) * Q.PANELS + p) * Q.PANEL_N + j
        assert lanes[word * per + k % per] == values[k, n]
    np.testing.assert_array_equal(Q.unpack_words(words, fmt, K, N), values)
    # the padding (K to whole words, N to whole groups) is zero
    assert np.count_nonzero(lanes) == np.count_nonzero(values)


def test_int8_weight_quantisation_is_symmetric_per_column(ref):
    w = np.array([[1.0, -0.5, 0.0], [-2.0, 0.25, 0.0]], np.float32)
    qw = ref.quantize_weight(w, "int8")
    q = Q.unpack_words(qw.words, "int8", 2, 3)
    np.testing.assert_array_equal(q, [[64, -127, 0], [-127, 64, 0]])
    np.testing.assert_array_equal(qw.scale[:3], np.float32([2.0, 0.5, 0.0]) * Q.INV_127)
    np.testing.assert_array_equal(qw.correction[:3], [-128 * -63, -128 * -63, 0])  # -128 * the column sums
    assert not qw.scale[3:].any() and not qw.correction[3:].any()
    assert np.abs(Q.weight_value(qw) - w).max() <= 2.0 / 127 / 2 + 1e-7


def test_activation_quantisation_rows():
    x = np.array([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0], [1.0, np.nan, 2.0], [np.inf, 1.0, 1.0]], np.float32)
    q, s = Q.quantize_rows_int8(x)
    np.testing.assert_array_equal(q[0], [127, -64, 32])  # rint(63.5) = 64, ties to even
    np.testing.assert_array_equal(q[1:], 0)
    assert s[0] == np.float32(1.0) * Q.INV_127 and s[1] == 0 and np.isnan(s[2:]).all()


def test_int8_sums_are_exact_integers(ref):
    """The reference's sums through u8 = q + 128 and the column sums are the int64 products."""
    rng = np.random.default_rng(0)
    qx = rng.integers(-127, 128, (5, 300)).astype(np.int8)
    qx[:, 0] = 127
    w = rng.integers(-127, 128, (300, 70)).astype(np.float32)
    w[0] = -127
    qw = ref.quantize_weight(w, "int8")
    np.testing.assert_array_equal(Q.unpack_words(qw.words, "int8", 300, 70), w.astype(np.int8))
    want = qx.astype(np.int64) @ w.astype(np.int64)
    np.testing.assert_array_equal(Q.int8_sums(qx, qw), want)
    assert np.abs(want).max() > 1 << 16  # sums well past int16


@pytest.mark.parametrize("fmt", PACKED)
def test_exact_integer_sums_through_the_kernel(fast_ops, ref, fmt):
    """Integer x and w whose quantisation is exact (int8: row and column maxima 127, so the
    quantised values are the inputs; bf16: integers below 256 are bfloat16 values, and sums below
    2**24 are exact in float32): both backends give the integer product itself, times the scales."""
    rng = np.random.default_rng(1)
    one = np.float32(127) * Q.INV_127  # int8's scales s_x and s_n here: 127 / 127, rounded
    for M, K, N in SHAPES[1:]:
        x = rng.integers(-127, 128, (M, K)).astype(np.float32)
        x[:, 0] = 127
        w = rng.integers(-127, 128, (K, N)).astype(np.float32)
        w[0] = -127
        want = (x.astype(np.int64) @ w.astype(np.int64)).astype(np.float32)
        if fmt == "int8":
            want = want * (one * one)
        qw = fast_ops.quantize_weight(w, fmt)
        for ops in (ref, fast_ops):
            np.testing.assert_array_equal(ops.linear_quantized(x, qw), want)


def _bound(fmt, x, qw, K):
    """float32 rounding of the result: int8 a few ulps of the output (one rounding of the sum,
    the scale products and a possibly fused multiply-add); bf16 float32 sums of K exact products
    in another order: a few ulps of the sum of |products|."""
    eps = np.finfo(np.float32).eps
    if fmt == "int8":
        return 4 * eps * (np.abs(x).max(axis=-1, keepdims=True) * np.abs(Q.weight_value(qw)).max(axis=0) * K + 1)
    return 4 * K * eps * (np.abs(Q.round_to_bf16(x)) @ np.abs(Q.weight_value(qw))) + 1e-30


@pytest.mark.parametrize("fmt", PACKED)
@pytest.mark.parametrize("M,K,N", SHAPES)
def test_kernel_matches_the_reference(fast_ops, ref, fmt, M, K, N):
    rng = np.random.default_rng(M * 10000 + K * 10 + N)
    x, w, b = _x(rng, M, K, strided=M % 2 == 1), rng.standard_normal((K, N)).astype(np.float32), \
        rng.standard_normal(N).astype(np.float32)
    qw = fast_ops.quantize_weight(w, fmt)
    for bias in (None, b):
        want = ref.linear_quantized(x, qw, bias)
        got = fast_ops.linear_quantized(x, qw, bias)
        assert got.shape == (M, N) and got.dtype == np.float32
        assert (np.abs(got - want) <= _bound(fmt, x, qw, K)).all()
    if fmt == "int8":  # the integer sums themselves are the reference's: at most the epilogue's rounding apart
        qx, sx = Q.quantize_rows_int8(x)
        sums = Q.int8_sums(qx, qw).astype(np.float32) * (sx[:, None] * qw.scale[None, :N])
        assert (np.abs(fast_ops.linear_quantized(x, qw) - sums) <= 2 * np.finfo(np.float32).eps * np.abs(sums)).all()


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8"])
def test_close_to_the_float32_product(ops, fmt):
    if fmt != "fp32" and ops.name != "numpy" and not Q.format_runs_natively(fmt):
        pytest.skip("the CPU lacks the format's instruction")
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((4, 512)).astype(np.float32), rng.standard_normal((512, 600)).astype(np.float32)
    exact = x.astype(np.float64) @ w.astype(np.float64)
    got = ops.linear_quantized(x, ops.quantize_weight(w, fmt))
    # int8: 1.1e-2 of the largest output measured at this size; bf16 2.4e-3; fp32 float32 sums
    tol = {"fp32": 1e-5, "bf16": 6e-3, "int8": 2.5e-2}[fmt]
    assert np.abs(got - exact).max() <= tol * np.abs(exact).max()


@pytest.mark.parametrize("fmt", PACKED)
def test_read_only_batched_and_out(fast_ops, ref, fmt):
    rng = np.random.default_rng(4)
    w = rng.standard_normal((40, 50)).astype(np.float32)
    w.flags.writeable = False
    x = rng.standard_normal((2, 3, 40)).astype(np.float32)
    x.flags.writeable = False
    bias = np.frombuffer(rng.standard_normal(50).astype(np.float32).tobytes(), np.float32)
    qw = fast_ops.quantize_weight(w.T.copy().T, fmt)  # a Fortran-ordered weight packs the same
    assert np.array_equal(qw.words, fast_ops.quantize_weight(np.ascontiguousarray(w), fmt).words)
    want = ref.linear_quantized(x, qw, bias)
    out = np.full((2, 3, 50), np.nan, np.float32)
    assert fast_ops.linear_quantized(x, qw, bias, out=out) is out
    assert want.shape == (2, 3, 50)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", PACKED)
def test_nan_rows(fast_ops, ref, fmt):
    """int8: a row of x holding NaN or inf gives a NaN row (its scale is NaN), the other rows are
    untouched; bf16: NaN and inf propagate as IEEE products do. Both backends alike."""
    rng = np.random.default_rng(5)
    x, w = rng.standard_normal((3, 20)).astype(np.float32), rng.standard_normal((20, 30)).astype(np.float32)
    x[1, 3] = np.nan
    x[2, 0] = np.inf
    qw = fast_ops.quantize_weight(w, fmt)
    for ops in (ref, fast_ops):
        y = ops.linear_quantized(x, qw)
        assert np.isfinite(y[0]).all() and np.isnan(y[1]).all() and not np.isfinite(y[2]).any()
        if fmt == "int8":
            assert np.isnan(y[2]).all()


def test_int8_refuses_a_weight_holding_nan(ref):
    w = np.ones((3, 4), np.float32)
    w[1, 1] = np.inf
    with pytest.raises(FastformerError, match="must be finite"):
        ref.quantize_weight(w, "int8")


def test_refusals_are_one_line(ops):
    w = np.ones((3, 4), np.float32)
    with pytest.raises(FastformerError, match="unknown weight format 'int4': valid values are fp32, bf16, int8"):
        ops.quantize_weight(w, "int4")
    with pytest.raises(FastformerError, match="2-D float32"):
        ops.quantize_weight(w.astype(np.float64), "fp32")
    qw = ops.quantize_weight(w, "fp32")
    with pytest.raises(FastformerError, match=r"x must be a float32 array \(\.\.\., 3\)"):
        ops.linear_quantized(np.ones((2, 4), np.float32), qw)
    with pytest.raises(FastformerError, match=r"bias must be a float32 array \(4,\)"):
        ops.linear_quantized(np.ones((2, 3), np.float32), qw, np.ones(3, np.float32))
    with pytest.raises(FastformerError, match="QuantizedWeight"):
        ops.linear_quantized(np.ones((2, 3), np.float32), w)


@pytest.mark.parametrize("fmt,flag", [("int8", "cpu_has_vnni"), ("bf16", "cpu_has_bf16")])
def test_a_cpu_without_the_instruction_is_refused_by_name(monkeypatch, fmt, flag):
    """Nothing is compiled: the check runs before any kernel (LLVM would abort the process)."""
    monkeypatch.setattr(Q, flag, lambda: False)
    assert not Q.format_runs_natively(fmt) and Q.format_runs_natively("fp32")
    w = np.ones((3, 4), np.float32)
    with use_backend("numpy") as ref:  # the reference emulates the format anywhere
        qw = ref.quantize_weight(w, fmt)
    pytest.importorskip("numba")
    with use_backend("numba") as nb:
        feature = {"int8": "avx512_vnni", "bf16": "avx512_bf16"}[fmt]
        with pytest.raises(FastformerError, match=f"weight format {fmt} needs a CPU with .*{feature}.*use fp32"):
            nb.quantize_weight(w, fmt)
        with pytest.raises(FastformerError, match=feature):
            nb.linear_quantized(np.ones((1, 3), np.float32), qw)


def test_fp32_is_the_float32_product(ops):
    rng = np.random.default_rng(6)
    x, w, b = rng.standard_normal((2, 7)).astype(np.float32), rng.standard_normal((7, 9)).astype(np.float32), \
        rng.standard_normal(9).astype(np.float32)
    np.testing.assert_allclose(ops.linear_quantized(x, ops.quantize_weight(w, "fp32"), b), x @ w + b, rtol=1e-6)


def test_a_weight_not_made_by_quantize_weight_is_refused(ops):
    qw = ops.quantize_weight(np.ones((5, 20), np.float32), "int8") if ops.name == "numpy" or \
        Q.format_runs_natively("int8") else pytest.skip("no int8 instruction")
    x = np.ones((1, 5), np.float32)
    for bad in (qw._replace(words=qw.words[:-1]), qw._replace(K=9), qw._replace(N=200),
                qw._replace(correction=qw.correction.astype(np.int64)), qw._replace(format="bf16"),
                qw._replace(scale=None)):
        with pytest.raises(FastformerError, match="qw must be a QuantizedWeight as ops.quantize_weight makes it"):
            ops.linear_quantized(x, bad)
    with pytest.raises(FastformerError, match="at most 32768 rows"):
        ops.quantize_weight(np.ones((Q.MAX_INT8_K + 1, 1), np.float32), "int8")
