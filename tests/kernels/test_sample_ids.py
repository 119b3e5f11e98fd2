"""ops.sample_ids (kernels/ops/sampling.py): the Numba kernel draws the reference's ids, and the
reference draws from the distribution it states."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastformer import FastformerError
from fastformer.kernels import _resolve
from fastformer.kernels.ops import sampling

REF, NUMBA = _resolve("numpy"), _resolve("numba")


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), N=st.integers(1, 5), V=st.integers(1, 300),
       dtype=st.sampled_from([np.float32, np.float64]), scale=st.sampled_from([0.1, 1.0, 8.0]),
       ties=st.booleans(), temperature=st.sampled_from([0.3, 1.0, 2.5]),
       top_k=st.one_of(st.none(), st.integers(1, 310)))
def test_kernel_draws_the_references_ids(seed, N, V, dtype, scale, ties, temperature, top_k):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((N, V)) * scale).astype(dtype)
    if ties:  # many equal logits: the k-th largest is shared by several ids, all kept
        logits = np.round(logits)
    u = rng.random(N)
    np.testing.assert_array_equal(NUMBA.sample_ids(logits, u, temperature, top_k),
                                  REF.sample_ids(logits, u, temperature, top_k))


def test_masked_ids_are_never_drawn_and_the_ends_of_u_land_on_ids_with_mass():
    logits = np.array([[-np.inf, 1.0, -np.inf, 2.0, -np.inf]] * 3, np.float32)
    u = np.array([0.0, 0.5, np.nextafter(1.0, 0.0)])
    for ops in (REF, NUMBA):
        ids = ops.sample_ids(logits, u, 1.0)
        assert ids.tolist() == [1, ids[1], 3] and ids[1] in (1, 3)
        assert ops.sample_ids(logits, u, 1.0, top_k=1).tolist() == [3, 3, 3]


def test_top_k_keeps_every_id_tied_with_the_kth():
    logits = np.array([[3.0, 1.0, 3.0, 1.0, 0.0]], np.float32)  # top_k=2 and 3: ids 0 and 2 only
    for ops in (REF, NUMBA):
        for k in (1, 2):
            drawn = {int(ops.sample_ids(logits, np.array([u]), 1.0, k)[0]) for u in np.linspace(0, 0.999, 50)}
            assert drawn == {0, 2}
        drawn = {int(ops.sample_ids(logits, np.array([u]), 1.0, 3)[0]) for u in np.linspace(0, 0.999, 50)}
        assert drawn == {0, 1, 2, 3}


def test_the_draws_follow_the_tempered_distribution():
    rng = np.random.default_rng(0)
    logits = np.array([[2.0, 0.5, 1.0, -1.0, 0.0]], np.float32)
    u = rng.random(20000)
    want = sampling.next_token_probs(logits, 0.7, top_k=4)[0]
    for ops in (REF, NUMBA):
        ids = ops.sample_ids(np.repeat(logits, u.size, axis=0), u, 0.7, 4)
        freq = np.bincount(ids, minlength=5) / u.size
        np.testing.assert_allclose(freq, want, atol=0.01)
        assert freq[3] == 0  # the id below the 4th largest


def test_top_p_runs_the_reference_on_both_backends():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((4, 50)).astype(np.float32)
    u = rng.random(4)
    np.testing.assert_array_equal(NUMBA.sample_ids(logits, u, 1.0, 10, 0.8), REF.sample_ids(logits, u, 1.0, 10, 0.8))


def test_the_serial_and_the_parallel_kernel_agree(monkeypatch):
    from fastformer.kernels import _jit as K

    rng = np.random.default_rng(2)
    logits, u = rng.standard_normal((16, 4096)).astype(np.float32), rng.random(16)
    parallel = NUMBA.sample_ids(logits, u, 1.0, 50)
    monkeypatch.setattr(sampling, "sized", lambda kernel, work, small=None: K.serial(kernel))
    np.testing.assert_array_equal(NUMBA.sample_ids(logits, u, 1.0, 50), parallel)


@pytest.mark.parametrize("ops", [REF, NUMBA], ids=["numpy", "numba"])
@pytest.mark.parametrize("call,message", [
    (lambda ops: ops.sample_ids(np.ones(4, np.float32), np.zeros(1), 1.0), "logits must be"),
    (lambda ops: ops.sample_ids(np.ones((2, 0), np.float32), np.zeros(2), 1.0), "logits must be"),
    (lambda ops: ops.sample_ids(np.ones((2, 4), np.int64), np.zeros(2), 1.0), "logits must be"),
    (lambda ops: ops.sample_ids(np.ones((2, 4), np.float32), np.zeros(3), 1.0), "one uniform draw per row"),
    (lambda ops: ops.sample_ids(np.ones((2, 4), np.float32), np.zeros(2), 0.0), "temperature"),
    (lambda ops: ops.sample_ids(np.ones((2, 4), np.float32), np.zeros(2), 1.0, 0), "top_k"),
    (lambda ops: ops.sample_ids(np.ones((2, 4), np.float32), np.zeros(2), 1.0, None, 1.5), "top_p"),
    (lambda ops: ops.sample_ids(np.ones((2, 4), np.float32), np.array([0.5, 1.0]), 1.0), r"u must hold .* \[0, 1\)"),
    (lambda ops: ops.sample_ids(np.ones((2, 4), np.float32), np.array([-0.5, 0.1]), 1.0), r"\[0, 1\), got -0.5"),
    (lambda ops: ops.sample_ids(np.ones((2, 4), np.float32), np.array([np.nan, 0.1]), 1.0), r"\[0, 1\), got nan"),
    (lambda ops: ops.sample_ids(np.array([[1, np.nan, 3, 0]] * 2), np.zeros(2), 1.0, 2), "a NaN in row 0"),
    (lambda ops: ops.sample_ids(np.array([[1, 2], [np.inf, 0]]), np.zeros(2), 1.0), r"\+inf in row 1"),
    (lambda ops: ops.sample_ids(np.array([[1, 2], [-np.inf] * 2]), np.zeros(2), 1.0), "-inf at every id in row 1"),
])
def test_bad_input_is_refused_in_one_line(ops, call, message):
    with pytest.raises(FastformerError, match=message):
        call(ops)


@pytest.mark.parametrize("V", [4096, 50257, 33])
def test_wide_rows_with_ties_and_masks_draw_the_references_ids(V):
    """Rows of a real vocabulary's width (not a multiple of the kernel's 16-id blocks): the k-th
    largest found through the blocks' maxima, at every k from 1 past the number of blocks to V,
    with ties across blocks and masked ids, draws the reference's ids."""
    rng = np.random.default_rng(V)
    logits = np.round(rng.standard_normal((3, V)) * 4).astype(np.float32)  # few values: ties everywhere
    logits[0, rng.random(V) < 0.5] = -np.inf
    logits[2, :V // 2] = logits[2].max()  # the largest logit in every block of the first half
    u = np.array([0.0, 0.37, np.nextafter(1.0, 0.0)])
    blocks = -(-V // sampling.BLOCK)
    for k in (1, 2, 50, blocks - 1, blocks, blocks + 1, V - 1, V, None):
        np.testing.assert_array_equal(NUMBA.sample_ids(logits, u, 0.8, k), REF.sample_ids(logits, u, 0.8, k),
                                      err_msg=f"top_k {k}")


def test_the_kernels_float64_exp_is_within_an_ulp_of_libms():
    """exp_nonpositive64 (the draw's exp over the kept ids): within 1 ulp of libm's exp from 0 down
    to the subnormal results, exactly 1 at 0 and exactly 0 at -inf."""
    pytest.importorskip("numba")
    import numba

    from fastformer.kernels._jit import exp_nonpositive64

    @numba.njit
    def run(x, out):
        for i in range(x.size):
            out[i] = exp_nonpositive64(x[i])

    rng = np.random.default_rng(0)
    x = -np.concatenate([rng.random(100_000) * 708, np.linspace(0, 745, 20_001), rng.random(1000) * 1e-8,
                         [0.0, np.inf, 1000.0, 746.0]])
    got = np.empty_like(x)
    run(x, got)
    want = np.exp(x)
    normal = want >= np.finfo(np.float64).tiny
    ulps = np.abs(got - want)[normal] / np.spacing(want[normal])
    assert ulps.max() <= 1.0, f"{ulps.max()} ulp at exp({x[normal][np.argmax(ulps)]})"
    np.testing.assert_allclose(got[~normal], want[~normal], rtol=0, atol=2 * np.finfo(np.float64).smallest_subnormal)
    assert got[-4:].tolist() == [1.0, 0.0, 0.0, 0.0]
