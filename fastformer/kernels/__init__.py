"""The one kernel interface, and the choice of backend behind it.

Models and the trainer call `get_ops()` and use the object it returns; they never look at which
backend it is. The backend comes from, in order: `set_backend(name)` / `use_backend(name)`, else
the environment variable FASTFORMER_BACKEND (read when kernels are first asked for), else "auto".

    numpy  the reference kernels in numpy_ops.py (the specification)
    numba  the jitted kernels in numba_ops.py
    auto   numba when it imports, else numpy

Both accept and refuse the same inputs (checks.py), read-only arrays included, and treat NaN and
infinity alike; numpy_ops.py's docstring states the rules.
"""

import contextlib
import os

from fastformer.errors import FastformerError
from fastformer.kernels.numpy_ops import NumpyOps

BACKENDS = ("auto", "numpy", "numba")
ENV_VAR = "FASTFORMER_BACKEND"

_ops = None  # the resolved backend object, made on first use


def _numba_ops():
    from fastformer.kernels.numba_ops import NumbaOps  # raises ImportError when numba is not installed

    return NumbaOps()


def _numpy_ops():
    """The reference backend; the first time, FASTFORMER_NUM_THREADS (or the cores) is applied
    to BLAS, as the Numba backend does when it loads (fastformer.threads)."""
    from fastformer.kernels.threads import configure_threads, configured_threads

    if configured_threads() is None:
        configure_threads(numba_threads=False)
    return NumpyOps()


def _resolve(name):
    if name not in BACKENDS:
        raise FastformerError(f"unknown fastformer backend {name!r}: valid values are {', '.join(BACKENDS)}")
    if name == "numpy":
        return _numpy_ops()
    try:
        return _numba_ops()
    except ImportError as e:
        if name == "auto":
            return _numpy_ops()
        raise FastformerError(f"backend 'numba' is not available ({e}); valid values here are "
                              f"auto, numpy (install numba to use 'numba')") from None


def set_backend(name):
    """Select the kernel backend: "auto", "numpy" or "numba". Child processes inherit it."""
    global _ops
    _ops = _resolve(name)
    os.environ[ENV_VAR] = name


def get_ops():
    """The kernel object of the current backend (NumpyOps or a subclass)."""
    if _ops is None:
        set_backend(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto")
    return _ops


def get_backend():
    """Name of the backend in use: "numpy" or "numba"."""
    return get_ops().name


@contextlib.contextmanager
def use_backend(name):
    """Context manager: run a block with another backend, then restore the previous one."""
    global _ops
    prev_ops, prev_env = get_ops(), os.environ.get(ENV_VAR)
    set_backend(name)
    try:
        yield get_ops()
    finally:
        _ops = prev_ops
        if prev_env is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = prev_env
