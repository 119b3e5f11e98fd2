"""gpt2_decode.weighted_rows, the decoding attention's p @ v: its register chains (float32, head
sizes 32 and 64) and its loops (other sizes, float64, NUMBA_DISABLE_JIT) against float64 NumPy."""

import numpy as np
import pytest

numba = pytest.importorskip("numba")


@pytest.fixture(scope="module")
def jitted():
    from fastformer.kernels.ops.gpt2_decode import weighted_rows

    @numba.njit
    def run(p, v, n, out, scratch):
        weighted_rows(p, v, n, out, scratch)
    return run


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("hs", [8, 32, 64])
@pytest.mark.parametrize("n", [1, 3, 4, 5, 8, 9, 116])
def test_weighted_rows_is_the_weighted_sum_of_the_first_n_rows(jitted, dtype, hs, n):
    from fastformer.kernels.ops.gpt2_decode import weighted_rows

    rng = np.random.default_rng(n * hs)
    v = rng.standard_normal((120, hs)).astype(dtype)
    v[n:] = np.nan  # rows past n are never read
    p = rng.random(130).astype(dtype)
    out = np.full(hs, np.nan, dtype)
    scratch = np.full(384, np.nan, np.float32)
    jitted(p, v, n, out, scratch)
    want = p[:n].astype(np.float64) @ v[:n].astype(np.float64)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(out, want, rtol=tol, atol=tol * np.abs(want).max())
    plain = np.full(hs, np.nan, dtype)  # the Python function itself: the same sums
    weighted_rows(p, v, n, plain, scratch)
    np.testing.assert_allclose(plain, want, rtol=tol, atol=tol * np.abs(want).max())
