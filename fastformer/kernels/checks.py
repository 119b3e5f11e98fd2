"""The checks every op's own checks are made of, shared by both backends.

Each op module (fastformer/kernels/ops/) starts every public kernel, reference and Numba alike,
with the check written beside it, built from these; nothing after that validates again: the
reference math and the jitted kernels trust what they get. So the two backends accept and refuse
exactly the same inputs, with the same `FastformerError` message, which names the argument, what
it was and what is allowed. A check returns the arrays the kernel works on: C-contiguous and
aligned (a copy only when an input is neither; read-only inputs are used in place), one float
dtype per call (float32 or float64), ids as int64 with every id in range.

A backward reads its forward's cache, which is just another input: the cache checks verify every
array of it that a jitted kernel indexes (shapes, dtypes, ids in range), so a cache that is not
the forward's -- from another call, another size, or edited -- is refused instead of being read
out of bounds. The checks cost O(1) per call, or one vectorised min/max where ids index an array.
"""

import functools

import numpy as np

from fastformer.errors import FastformerError, check_number

FLOAT_DTYPES = (np.float32, np.float64)
IGNORE_INDEX = -100  # the target id a cross-entropy counts for nothing, as in torch.nn.functional.cross_entropy
_INT64_MAX = np.iinfo(np.int64).max


def quiet(fn):
    """A reference kernel (or a BLAS product) run with NumPy's floating-point warnings off: NaN and
    infinity follow the rules of ops/__init__.py on both backends, and only the reference would
    otherwise print a RuntimeWarning where the Numba kernel, computing the same, says nothing."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with np.errstate(all="ignore"):
            return fn(*args, **kwargs)

    return run


ALIGN = 64  # bytes: a cache line, and one AVX-512 register


_DTYPE_NAMES = {np.dtype(d): np.dtype(d).name for d in FLOAT_DTYPES}


def dtype_name(dtype):
    """np.dtype(dtype).name, without reading NumPy's `name` property (about 1.5 us each time) for
    the float dtypes the kernels take: the products and attention read it at every call."""
    dtype = np.dtype(dtype)
    return _DTYPE_NAMES.get(dtype) or dtype.name


def aligned_zeros(shape, dtype):
    """np.zeros(shape, dtype) whose first element starts on a 64-byte boundary. NumPy only
    promises 16: a buffer that starts mid-line makes every vector load of a row span two cache
    lines, which a batch-1 decoding step (bound by streaming weights) pays at every load."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape))
    raw = np.zeros(n * dtype.itemsize + ALIGN, dtype=np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start:start + n * dtype.itemsize].view(dtype).reshape(shape)


def describe(a):
    """How an argument shows in a message: "float32 (2, 3)" for an array, else its type."""
    return f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__


def aligned(x):
    """`x` itself when its items are aligned (as the jitted kernels' signatures require), else an
    aligned copy: only an array made at an odd byte offset (np.frombuffer) is copied."""
    return x if x.flags.aligned else x.copy()


def kernel_array(x):
    """`x` C-contiguous and aligned, copied only when it is not; a read-only array stays as it is."""
    return aligned(np.ascontiguousarray(x))


# ----------------------------------------------------------------- arrays
def as_float_array(x, name, dtype=None):
    """`x` as a C-contiguous float32/float64 array with at least one axis (of `dtype` when
    given: the dtype of the call's other inputs)."""
    x = np.asarray(x)
    if dtype is None:
        if x.dtype not in FLOAT_DTYPES:
            raise FastformerError(f"{name} must be a float32 or float64 array, got dtype {x.dtype}")
    elif x.dtype != dtype:
        raise FastformerError(f"{name} must have dtype {np.dtype(dtype)} like the other inputs, got {x.dtype}")
    if x.ndim == 0:
        raise FastformerError(f"{name} must be an array with at least one axis, got a 0-d array")
    return kernel_array(x)


def as_rows(x, name):
    """A float array whose last axis is not empty: the rows a softmax, a LayerNorm or a
    cross-entropy normalises over."""
    x = as_float_array(x, name)
    if x.shape[-1] == 0:
        raise FastformerError(f"{name} must have a non-empty last axis, got shape {x.shape}")
    return x


def as_vector(x, name, C, dtype):
    """A (C,) float array of `dtype`: a per-channel weight or bias."""
    x = as_float_array(x, name, dtype)
    if x.shape != (C,):
        raise FastformerError(f"{name} must have shape ({C},) to match the last axis of x, got {x.shape}")
    return x


def as_int_array(x, name):
    """`x` as a C-contiguous int64 array (with at least one axis, as np.ascontiguousarray makes it)."""
    x = np.asarray(x)
    if x.dtype.kind not in "iu":
        raise FastformerError(f"{name} must be an integer array, got dtype {x.dtype}")
    if x.dtype == np.uint64 and x.size and x.max() > _INT64_MAX:  # would wrap to a negative int64
        raise FastformerError(f"{name} must hold values that fit int64, got {x.max()}")
    return kernel_array(np.ascontiguousarray(x, dtype=np.int64))


def check_index_range(ids, name, V, allowed=None):
    """Every entry of the int64 array `ids` in [0, V), checked with one vectorised min and max;
    the message names the first id outside. `allowed` (bool, ids' shape) limits the check to
    the entries it marks (the targets that are not ignored)."""
    if not ids.size:
        return
    if allowed is None:
        if ids.min() >= 0 and ids.max() < V:
            return
        bad = (ids < 0) | (ids >= V)
    else:
        bad = allowed & ((ids < 0) | (ids >= V))
        if not bad.any():
            return
    raise FastformerError(f"{name} must lie in [0, {V}), got {ids[bad].flat[0]}")


def check_grad(g, name, shape, dtype):
    """The gradient reaching a forward's output: an array of that output's shape and dtype."""
    g = np.asarray(g)
    if g.dtype != dtype or g.shape != tuple(shape):
        raise FastformerError(f"{name} must be a {np.dtype(dtype)} array of the forward's output shape "
                              f"{tuple(shape)}, got {g.dtype} {g.shape}")
    return kernel_array(g)


def check_out(out, like, name):
    """An output array that a kernel writes in place: a writeable C-contiguous ndarray of the
    shape and dtype of `like` (it may be `like` itself)."""
    if not isinstance(out, np.ndarray) or out.shape != like.shape or out.dtype != like.dtype \
            or not out.flags.c_contiguous or not out.flags.writeable:
        raise FastformerError(f"{name} must be a writeable C-contiguous {like.dtype} array of shape {like.shape}, "
                              f"got {describe(out)}")


def check_eps(eps):
    return check_number("eps", eps, low=0)


def check_finite(name, value, low=None, low_open=False):
    """A finite number (not NaN, not +-inf) >= `low` (> when `low_open`; None: any finite number),
    refused in check_number's words."""
    return check_number(name, value, low=low, low_open=low_open, finite=True)


# ----------------------------------------------------------------- caches
def cache_fields(cache, forward, fields):
    """The fields of the cache `forward` returned: a tuple of the names in `fields`."""
    names = fields.split()
    if not isinstance(cache, tuple) or len(cache) != len(names):
        got = f"a {type(cache).__name__} of {len(cache)}" if isinstance(cache, (tuple, list)) else describe(cache)
        raise FastformerError(f"cache must be the cache {forward} returned, a tuple ({', '.join(names)}), got {got}")
    return cache


def cache_root(x, name, forward, ndim=None):
    """The array of a cache that the others are sized by: a float32/float64 ndarray with at
    least one axis (`ndim` axes when given), aligned."""
    if not isinstance(x, np.ndarray) or x.dtype not in FLOAT_DTYPES or x.ndim == 0 or (ndim and x.ndim != ndim):
        axes = f"{ndim} axes" if ndim else "at least one axis"
        raise FastformerError(f"{name} in the cache of {forward} must be a float32 or float64 array with {axes}, "
                              f"got {describe(x)}")
    return aligned(x)


def cache_array(x, name, forward, shape, dtype):
    """An array of a cache as its backward reads it: of `shape` and `dtype`, aligned (any strides)."""
    if not isinstance(x, np.ndarray) or x.shape != tuple(shape) or x.dtype != dtype:
        raise FastformerError(f"{name} in the cache of {forward} must be an array of shape {tuple(shape)} and "
                              f"dtype {np.dtype(dtype)}, got {describe(x)}")
    return aligned(x)
