"""The row maximum of the softmax, cross-entropy and argmax kernels (kernels/_jit.row_max): a
contiguous float32 row goes 64 values a step in 16-lane vectors, everything else in scalar
running maxima; both skip NaN the way a plain loop from -inf does."""

import numpy as np
import pytest

from fastformer.kernels import _jit

numba = pytest.importorskip("numba")


@numba.njit(**_jit._JIT_FLAGS)
def _maxima(x, n):
    """row_max of each row's first n values, as the kernels call it on their rows."""
    out = np.empty(x.shape[0], x.dtype)
    for r in range(x.shape[0]):
        out[r] = _jit.row_max(x[r], n)
    return out


@numba.njit(**_jit._JIT_FLAGS)
def _first_lanes(x, n):
    return _jit.lanes_max(x, n)


def _plain(row):
    """The definition: the maximum of the non-NaN values, -inf when there are none."""
    kept = row[~np.isnan(row)]
    return kept.max() if kept.size else -np.inf


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_row_max_is_the_largest_value_that_is_not_nan(dtype, layout):
    rng = np.random.default_rng(5)
    for n in (0, 1, 7, 8, 63, 64, 65, 127, 128, 200, 4096):
        x = rng.standard_normal((6, n)).astype(dtype) if n else np.empty((6, 0), dtype)
        if n:
            x[1, rng.integers(0, n, max(1, n // 5))] = np.nan  # NaNs here and there, the maximum elsewhere
            x[2] = np.nan  # all NaN: -inf
            x[3, -1] = np.inf  # in the scalar tail past the last 64
            x[4, 0] = 1e30  # in the first vector
            x[5] = -np.inf
        rows = np.repeat(x, 2, axis=1)[:, ::2] if layout == "strided" else x
        want = [_plain(r) for r in rows]
        np.testing.assert_array_equal(_maxima(rows, n), np.array(want, dtype))


def test_a_contiguous_float32_row_goes_in_lanes_of_64():
    """The vector part covers n - n % 64 values on float32 rows and nothing elsewhere, so the
    test above exercises both paths; its maximum alone is that of those values."""
    x = np.arange(200, dtype=np.float32)[::-1].copy()
    x[5] = np.nan
    m, c = _first_lanes(x, 200)
    assert c == 192 and m == 199
    m, c = _first_lanes(x[:63], 63)
    assert c == 0 and m == -np.inf
    assert _first_lanes(x.astype(np.float64), 200)[1] == 0
    assert _first_lanes(x[::2], 100)[1] == 0
