"""The one kernel interface, and the choice of backend behind it.

Models and the trainer call `get_ops()` and use the object it returns; they never look at which
backend it is. The backend comes from, in order: `set_backend(name)` / `use_backend(name)`, else
the environment variable FASTFORMER_BACKEND (read when kernels are first asked for), else "auto".

    numpy  the NumPy references of the op modules (the specification)
    numba  their Numba kernels
    auto   numba when it imports, else numpy

Both accept and refuse the same inputs, read-only arrays included, and treat NaN and infinity
alike (docs/architecture.md states the rules). The op modules live in `ops/`, one per op;
`backends.py` binds them.

Choosing a backend the first time also applies the process settings (threads, allocator, BLAS
spin: `process.apply_process_settings`); nothing is applied when this package is imported.
"""

import contextlib
import os

from fastformer.errors import FastformerError
from fastformer.kernels.checks import IGNORE_INDEX  # noqa: F401 (the kernel interface's constant)

BACKENDS = ("auto", "numpy", "numba")
ENV_VAR = "FASTFORMER_BACKEND"

_ops = None  # the resolved backend object, made on first use


def _numba_ops():
    from fastformer.kernels.backends import NumbaOps  # raises ImportError when numba is not installed

    ops = NumbaOps()
    from fastformer.kernels.process import apply_process_settings, numba_threads_started

    if not numba_threads_started():  # before any kernel runs: a parallel kernel starts Numba's threads
        apply_process_settings()
    return ops


def _numpy_ops():
    """The reference backend; the first time, the process settings without Numba's threads."""
    from fastformer.kernels.backends import NumpyOps
    from fastformer.kernels.process import applied_threads, apply_process_settings

    if applied_threads() is None:
        apply_process_settings(numba_threads=False)
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
    """Select the kernel backend: "auto", "numpy" or "numba", for this process. (A child process
    reads FASTFORMER_BACKEND; set that to choose its backend.)"""
    global _ops
    _ops = _resolve(name)


def get_ops():
    """The kernel object of the current backend (NumpyOps or NumbaOps)."""
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
    prev = get_ops()
    set_backend(name)
    try:
        yield get_ops()
    finally:
        _ops = prev
