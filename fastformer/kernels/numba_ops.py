"""Numba backend (placeholder): the jitted kernels are not written yet, so every operation
falls back to the NumPy reference it inherits."""

import warnings

import numba  # noqa: F401  (ImportError here means the backend is unavailable)

from .numpy_ops import NumpyOps


class NumbaOps(NumpyOps):
    name = "numba"

    def __init__(self):
        warnings.warn("fastformer: the numba backend has no jitted kernels yet; using the NumPy "
                      "reference kernels", stacklevel=3)
