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

The precision of the matrix products on float32 arrays (`set_precision`, `use_precision`):
"float32" (BLAS) by default, or "bfloat16" (bfloat16 products, float32 sums: kernels/ops/gemm_bf16.py),
which the Numba backend runs on a CPU with AVX-512 BF16 and the reference emulates anywhere.
Everything else (layernorm, softmax, the loss, the optimizer) stays float32 either way.

Choosing a backend the first time also applies the process settings (threads, allocator, BLAS
spin: `process.apply_process_settings`); nothing is applied when this package is imported.
"""

import contextlib
import os

from fastformer.errors import FastformerError
from fastformer.kernels.checks import IGNORE_INDEX  # noqa: F401 (the kernel interface's constant)

BACKENDS = ("auto", "numpy", "numba")
PRECISIONS = ("float32", "bfloat16")  # of the matrix products of float32 arrays
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


def check_precision(name):
    """`name` when the current backend can multiply float32 arrays in it here; else one line
    saying what is missing (an unknown name, or the CPU feature bfloat16 needs)."""
    if name not in PRECISIONS:
        raise FastformerError(f"unknown precision {name!r}: valid values are {', '.join(PRECISIONS)}")
    if name not in get_ops().matmul_precisions["float32"]:
        get_ops().require_precision(name)
    return name


def fastest_precision():
    """The faster precision of float32 matrix products on the current backend here: "bfloat16" where
    it runs natively (the Numba backend on a CPU with AVX-512 BF16), else "float32". (The NumPy
    reference offers bfloat16 everywhere, as a specification, not for speed.)"""
    ops = get_ops()
    return "bfloat16" if ops.name != "numpy" and "bfloat16" in ops.matmul_precisions["float32"] else "float32"


def set_precision(name):
    """The precision of every matrix product of float32 arrays that does not name its own:
    "float32" or "bfloat16" (refused, in one line, on a backend or CPU that cannot run it)."""
    from fastformer.kernels.ops import matmul  # the setting lives where the products read it

    matmul._setting["precision"] = check_precision(name)


def get_precision():
    """The precision of the matrix products of float32 arrays: "float32" or "bfloat16"."""
    from fastformer.kernels.ops.matmul import current_precision

    return current_precision()


@contextlib.contextmanager
def use_precision(name):
    """Context manager: run a block with another matmul precision, then restore the previous one."""
    prev = get_precision()
    set_precision(name)
    try:
        yield name
    finally:
        from fastformer.kernels.ops import matmul

        matmul._setting["precision"] = prev
