"""The checks of the kernel interface, shared by both backends.

Every public kernel of `NumpyOps` (numpy_ops.py) and `NumbaOps` (numba_ops.py) starts with the
check of this file made for it, and nothing after that validates again: the reference math and
the jitted kernels trust what they get. So the two backends accept and refuse exactly the same
inputs, with the same `FastformerError` message, which names the argument, what it was and what
is allowed. A check returns the arrays the kernel works on: C-contiguous and aligned (a copy
only when an input is neither; read-only inputs are used in place), one float dtype per call
(float32 or float64), ids as int64 with every id in range.

A backward reads its forward's cache, which is just another input: the cache checks below
verify every array of it that a jitted kernel indexes (shapes, dtypes, ids in range), so a
cache that is not the forward's -- from another call, another size, or edited -- is refused
instead of being read out of bounds. The checks cost O(1) per call, or one vectorised min/max
where ids index an array (embedding, cross-entropy targets).

Shape letters: B batch, H heads, T query length, S key length, hs head size, C channels, V vocab.
"""

import functools
import math

import numpy as np

from fastformer.errors import FastformerError, check_bool, check_int, check_number, is_int

FLOAT_DTYPES = (np.float32, np.float64)
GELU_FORMS = ("tanh", "none")
_INT64_MAX = np.iinfo(np.int64).max


def _describe(a):
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
                              f"got {_describe(out)}")


def check_eps(eps):
    return check_number("eps", eps, low=0)


def check_finite(name, value, low, low_open=False):
    """A finite number (not NaN, not +-inf) >= `low` (> when `low_open`)."""
    v = check_number(name, value, low=low, low_open=low_open)
    if v == math.inf:
        raise FastformerError(f"{name} must be a finite number {'>' if low_open else '>='} {low}, got {value!r}")
    return v


# ----------------------------------------------------------------- caches
def cache_fields(cache, forward, fields):
    """The fields of the cache `forward` returned: a tuple of the names in `fields`."""
    names = fields.split()
    if not isinstance(cache, tuple) or len(cache) != len(names):
        got = f"a {type(cache).__name__} of {len(cache)}" if isinstance(cache, (tuple, list)) else _describe(cache)
        raise FastformerError(f"cache must be the cache {forward} returned, a tuple ({', '.join(names)}), got {got}")
    return cache


def cache_root(x, name, forward, ndim=None):
    """The array of a cache that the others are sized by: a float32/float64 ndarray with at
    least one axis (`ndim` axes when given), aligned."""
    if not isinstance(x, np.ndarray) or x.dtype not in FLOAT_DTYPES or x.ndim == 0 or (ndim and x.ndim != ndim):
        axes = f"{ndim} axes" if ndim else "at least one axis"
        raise FastformerError(f"{name} in the cache of {forward} must be a float32 or float64 array with {axes}, "
                              f"got {_describe(x)}")
    return aligned(x)


def cache_array(x, name, forward, shape, dtype):
    """An array of a cache as its backward reads it: of `shape` and `dtype`, aligned (any strides)."""
    if not isinstance(x, np.ndarray) or x.shape != tuple(shape) or x.dtype != dtype:
        raise FastformerError(f"{name} in the cache of {forward} must be an array of shape {tuple(shape)} and "
                              f"dtype {np.dtype(dtype)}, got {_describe(x)}")
    return aligned(x)


# ---------------------------------------------------------------- softmax
def softmax_inputs(x):
    return as_rows(x, "x")


def softmax_grad_inputs(dy, cache):
    """(dy, y) of the softmax backward; the cache is the forward's output y."""
    y = kernel_array(cache_root(cache, "y", "softmax_forward"))
    return check_grad(dy, "dy", y.shape, y.dtype), y


# -------------------------------------------------------------- layernorm
def layernorm_inputs(x, weight, bias, eps):
    """(x, weight, bias) of a LayerNorm over the last axis C of x."""
    x = as_rows(x, "x")
    check_eps(eps)
    return x, as_vector(weight, "weight", x.shape[-1], x.dtype), as_vector(bias, "bias", x.shape[-1], x.dtype)


def residual_layernorm_inputs(x, branch, weight, bias, eps):
    """(x, branch, weight, bias) of `s = x + branch; y = layernorm(s)`: branch shaped as x."""
    x = as_rows(x, "x")
    branch = as_float_array(branch, "branch", x.dtype)
    if branch.shape != x.shape:
        raise FastformerError(f"branch must have the shape of x {x.shape}, got {branch.shape}")
    check_eps(eps)
    return x, branch, as_vector(weight, "weight", x.shape[-1], x.dtype), as_vector(bias, "bias", x.shape[-1], x.dtype)


def layernorm_cache(cache, forward="layernorm_forward"):
    """The cache (x, weight, mean, rstd) of a LayerNorm over the last axis C of x: weight (C,),
    mean and rstd shaped as x without its last axis, one dtype, all C-contiguous."""
    x, weight, mean, rstd = cache_fields(cache, forward, "x weight mean rstd")
    x = kernel_array(cache_root(x, "x", forward))
    rows = x.shape[:-1]
    return (x, kernel_array(cache_array(weight, "weight", forward, x.shape[-1:], x.dtype)),
            kernel_array(cache_array(mean, "mean", forward, rows, x.dtype)),
            kernel_array(cache_array(rstd, "rstd", forward, rows, x.dtype)))


def layernorm_grad_inputs(dy, cache):
    """(dy, cache) of the LayerNorm backward."""
    cache = layernorm_cache(cache)
    return check_grad(dy, "dy", cache[0].shape, cache[0].dtype), cache


def residual_layernorm_grads(dy, ds, cache):
    """(dy, ds or None, cache) of the residual LayerNorm's backward, dy and ds shaped as its output."""
    cache = layernorm_cache(cache, "residual_layernorm_forward")
    x = cache[0]
    dy = check_grad(dy, "dy", x.shape, x.dtype)
    return dy, None if ds is None else check_grad(ds, "ds", x.shape, x.dtype), cache


# -------------------------------------------------------------- attention
def _attention_scale(scale, hs):
    """The score scale: 1 / sqrt(hs) by default (1 for heads of size 0), else a finite number > 0:
    a NaN or infinite scale would make every score NaN, which is refused rather than computed."""
    if scale is None:
        return 1.0 / math.sqrt(hs) if hs else 1.0
    return check_finite("scale", scale, low=0, low_open=True)


def _key_padding_mask(key_padding_mask, B, S):
    """(B, S) bool, True where the key is padding; None stays None."""
    if key_padding_mask is None:
        return None
    key_padding_mask = np.asarray(key_padding_mask, dtype=bool)
    if key_padding_mask.shape != (B, S):
        raise FastformerError(f"key_padding_mask must have shape (B, S) = {(B, S)}, got {key_padding_mask.shape}")
    return key_padding_mask


def check_attention_inputs(q, k, v, causal, key_padding_mask, scale):
    """The shapes of an attention call on float arrays q (B, H, T, hs), k, v (B, H, S, hs);
    returns (key_padding_mask as bool or None, scale)."""
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise FastformerError(f"attention expects q (B, H, T, hs) and k, v (B, H, S, hs), "
                              f"got q {q.shape}, k {k.shape}, v {v.shape}")
    B, H, T, hs = q.shape
    S = k.shape[2]
    if S == 0:
        raise FastformerError(f"attention needs at least one key, got k and v {k.shape} (S = 0)")
    if check_bool("causal", causal) and S < T:
        raise FastformerError(f"causal attention needs at least as many keys as queries, got T={T}, S={S}")
    return _key_padding_mask(key_padding_mask, B, S), _attention_scale(scale, hs)


def attention_inputs(q, k, v, causal, key_padding_mask, scale):
    """(q, k, v, key_padding_mask, scale) of `attention_forward`."""
    q = as_float_array(q, "q")
    k = as_float_array(k, "k", q.dtype)
    v = as_float_array(v, "v", q.dtype)
    return (q, k, v, *check_attention_inputs(q, k, v, causal, key_padding_mask, scale))


def check_qkv(qkv, n_heads):
    """A fused projection qkv (B, T, 3C) for `n_heads` heads; returns (B, T, C, hs)."""
    check_int("n_heads", n_heads)
    if qkv.ndim != 3 or qkv.shape[2] % 3 or (qkv.shape[2] // 3) % n_heads:
        raise FastformerError(f"qkv must have shape (B, T, 3C) with C divisible by n_heads, got qkv {qkv.shape} "
                              f"and n_heads={n_heads!r}")
    B, T, C3 = qkv.shape
    return B, T, C3 // 3, C3 // (3 * n_heads)


def qkv_attention_inputs(qkv, n_heads, causal, key_padding_mask, scale):
    """(qkv, (B, T, C, hs), key_padding_mask, scale) of `attention_qkv_forward`."""
    qkv = as_float_array(qkv, "qkv")
    B, T, C, hs = dims = check_qkv(qkv, n_heads)
    if T == 0:
        raise FastformerError(f"attention needs at least one key, got qkv {qkv.shape} (T = 0)")
    check_bool("causal", causal)
    return qkv, dims, _key_padding_mask(key_padding_mask, B, T), _attention_scale(scale, hs)


def attention_cache(cache, forward="attention_forward"):
    """The cache (q, k, v, out, lse, causal, key_padding_mask, scale) of an attention forward,
    as check_attention_inputs accepts its inputs, with out (B, H, T, hs) and lse (B, H, T);
    the arrays keep their strides. attention_qkv_forward's (self-attention) also needs S = T."""
    q, k, v, out, lse, causal, key_padding_mask, scale = cache_fields(
        cache, forward, "q k v out lse causal key_padding_mask scale")
    q = cache_root(q, "q", forward, ndim=4)
    k, v = (cache_root(a, name, forward, ndim=4) for a, name in ((k, "k"), (v, "v")))
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise FastformerError(f"k and v in the cache of {forward} must have the dtype of q {q.dtype}, "
                              f"got {k.dtype} and {v.dtype}")
    key_padding_mask, scale = check_attention_inputs(q, k, v, causal, key_padding_mask, scale)
    if forward == "attention_qkv_forward" and k.shape != q.shape:
        raise FastformerError(f"q, k and v in the cache of {forward} must have one shape, got q {q.shape}, "
                              f"k {k.shape}")
    out = cache_array(out, "out", forward, q.shape, q.dtype)
    lse = kernel_array(cache_array(lse, "lse", forward, q.shape[:3], q.dtype))
    kpm = None if key_padding_mask is None else kernel_array(key_padding_mask)
    return q, k, v, out, lse, bool(causal), kpm, scale


def attention_grad_inputs(dout, cache):
    """(dout (B, H, T, hs), cache) of attention_backward."""
    cache = attention_cache(cache)
    return check_grad(dout, "dout", cache[0].shape, cache[0].dtype), cache


def qkv_attention_grad_inputs(dout, cache):
    """(dout (B, T, C), cache) of attention_qkv_backward."""
    cache = attention_cache(cache, "attention_qkv_forward")
    B, H, T, hs = cache[0].shape
    return check_grad(dout, "dout", (B, T, H * hs), cache[0].dtype), cache


def cached_attention_inputs(qkv, k_cache, v_cache, start, n_heads, key_padding_mask, scale):
    """The inputs of `attention_cached`: Tn new tokens' qkv (B, Tn, 3C), writeable caches
    (B, H, Tmax, hs) of qkv's dtype, `start` + Tn <= Tmax, and a key_padding_mask (B, >= start + Tn).
    Returns (qkv, (B, Tn, C, hs), end = start + Tn, key_padding_mask[:, :end] as bool or None, scale)."""
    qkv = as_float_array(qkv, "qkv")
    B, T, C, hs = dims = check_qkv(qkv, n_heads)
    Tmax = k_cache.shape[2] if isinstance(k_cache, np.ndarray) and k_cache.ndim == 4 else -1
    expected = (B, n_heads, Tmax, hs)
    if not all(isinstance(c, np.ndarray) and c.shape == expected and c.dtype == qkv.dtype and c.flags.writeable
               for c in (k_cache, v_cache)):
        raise FastformerError(f"k_cache and v_cache must be writeable {qkv.dtype} arrays (B, H, Tmax, hs) = "
                              f"{expected}, got {_describe(k_cache)} and {_describe(v_cache)}")
    if not is_int(start):
        raise FastformerError(f"start must be an integer, got {start!r}")
    end = start + T
    if not 0 <= start <= end <= Tmax:
        raise FastformerError(f"{T} new tokens at position {start} do not fit a cache of {Tmax} positions")
    if end == 0:
        raise FastformerError("attention needs at least one key, got no new token and start=0")
    if key_padding_mask is not None:
        key_padding_mask = np.asarray(key_padding_mask, dtype=bool)
        if key_padding_mask.ndim != 2 or key_padding_mask.shape[0] != B or key_padding_mask.shape[1] < end:
            raise FastformerError(f"key_padding_mask must have shape (B, >= start + Tn) = ({B}, >= {end}), "
                                  f"got {key_padding_mask.shape}")
        key_padding_mask = np.ascontiguousarray(key_padding_mask[:, :end])
    return qkv, dims, int(end), key_padding_mask, _attention_scale(scale, hs)


# ---------------------------------------------------------- cross-entropy
def check_targets(logits, targets, ignore_index):
    """Integer targets for logits (..., V); returns (t (N,) int64, counted (N,) bool)."""
    V = logits.shape[-1]
    if targets.shape != logits.shape[:-1]:
        raise FastformerError(f"targets must have shape {logits.shape[:-1]} (logits without the last axis), "
                              f"got {targets.shape}")
    t = targets.reshape(-1)
    counted = t != ignore_index
    bad = counted & ((t < 0) | (t >= V))
    if bad.any():
        raise FastformerError(f"targets must lie in [0, {V}) or equal ignore_index={ignore_index}, got {t[bad][0]}")
    return t, counted


def cross_entropy_inputs(logits, targets, ignore_index, out):
    """(logits, t (N,) int64, counted (N,) bool) of `cross_entropy_forward`; `out`, when given,
    is checked as the array the gradient is written into."""
    logits = as_rows(logits, "logits")
    if out is not None:
        check_out(out, logits, "out")
    return (logits, *check_targets(logits, as_int_array(targets, "targets"), check_ignore_index(ignore_index)))


def check_ignore_index(ignore_index):
    """The target id a cross-entropy leaves out: an integer that fits int64."""
    if not is_int(ignore_index):
        raise FastformerError(f"ignore_index must be an integer, got {ignore_index!r}")
    if not -_INT64_MAX - 1 <= ignore_index <= _INT64_MAX:
        raise FastformerError(f"ignore_index must fit int64, got {ignore_index}")
    return ignore_index


def check_dloss(dloss):
    """dloss, the gradient reaching a loss, as a finite float."""
    number = isinstance(dloss, (int, float, np.integer, np.floating)) and not isinstance(dloss, (bool, np.bool_))
    try:
        value = float(dloss) if number else math.nan
    except OverflowError:  # an int beyond the float range
        value = math.inf
    if not math.isfinite(value):
        raise FastformerError(f"dloss must be a finite number, got {dloss!r}")
    return value


def cross_entropy_grad_inputs(dloss, cache):
    """(dloss, cache) of cross_entropy_backward: the cache is the float gradient array the forward
    wrote, or the reference's (logits, targets, counted, lse, n) with every counted target in range."""
    dloss = check_dloss(dloss)
    forward = "cross_entropy_forward"
    if isinstance(cache, np.ndarray):  # the gradient written by the forward
        if cache.dtype not in FLOAT_DTYPES:
            raise FastformerError(f"cache must be the float32 or float64 gradient {forward} returned, "
                                  f"got {_describe(cache)}")
        return dloss, aligned(cache)
    logits, t, counted, lse, n = cache_fields(cache, forward, "logits targets counted lse n")
    logits = kernel_array(cache_root(logits, "logits", forward))
    V = logits.shape[-1]
    if V == 0:
        raise FastformerError(f"logits in the cache of {forward} must have a non-empty last axis, got {logits.shape}")
    N = logits.size // V
    t = cache_array(t, "targets", forward, (N,), np.int64)
    counted = cache_array(counted, "counted", forward, (N,), bool)
    check_index_range(t, f"targets in the cache of {forward}", V, allowed=counted)
    lse = cache_array(lse, "lse", forward, (N,), logits.dtype)
    return dloss, (logits, t, counted, lse, check_int(f"n in the cache of {forward}", n, minimum=0))


# ------------------------------------------------------------ activations
def activation_inputs(x, bias):
    """(x, bias or None) of y = act(x + bias)."""
    x = as_float_array(x, "x")
    return x, None if bias is None else as_vector(bias, "bias", x.shape[-1], x.dtype)


def _gelu_form(name, approximate):
    """GELU's form, "tanh" or "none"; anything else (an array too) is refused."""
    if not (isinstance(approximate, str) and approximate in GELU_FORMS):
        raise FastformerError(f"{name} must be one of {', '.join(GELU_FORMS)}, got {approximate!r}")
    return approximate


def gelu_inputs(x, bias, approximate):
    """(x, bias or None) of y = gelu(x + bias) in the form `approximate`."""
    _gelu_form("approximate", approximate)
    return activation_inputs(x, bias)


def gelu_grad_inputs(dy, cache):
    """(dy, cache) of gelu_backward; the cache (x, bias, approximate, has_bias) holds a bias of
    shape (C,) even when the forward had none (then zeros)."""
    forward = "gelu_forward"
    x, bias, approximate, has_bias = cache_fields(cache, forward, "x bias approximate has_bias")
    x = kernel_array(cache_root(x, "x", forward))
    bias = kernel_array(cache_array(bias, "bias", forward, x.shape[-1:], x.dtype))
    _gelu_form(f"approximate in the cache of {forward}", approximate)
    has_bias = check_bool(f"has_bias in the cache of {forward}", has_bias)
    return check_grad(dy, "dy", x.shape, x.dtype), (x, bias, approximate, has_bias)


def relu_grad_inputs(dy, cache):
    """(dy, cache) of relu_backward; the cache is (y, has_bias)."""
    y, has_bias = cache_fields(cache, "relu_forward", "y has_bias")
    y = kernel_array(cache_root(y, "y", "relu_forward"))
    has_bias = check_bool("has_bias in the cache of relu_forward", has_bias)
    return check_grad(dy, "dy", y.shape, y.dtype), (y, has_bias)


# -------------------------------------------------------------- embedding
def embedding_inputs(weight, ids):
    """(weight (V, C), ids int64 with every id in [0, V))."""
    weight = as_float_array(weight, "weight")
    if weight.ndim != 2:
        raise FastformerError(f"weight must have shape (V, C), got {weight.shape}")
    ids = as_int_array(ids, "ids")
    check_index_range(ids, "ids", weight.shape[0])
    return weight, ids


def embedding_grad_inputs(dout, cache, dweight):
    """(dout (*ids.shape, C), ids, shape, dtype) of the embedding's backward from the cache
    (ids, (V, C), dtype), every id in [0, V); `dweight`, when given, must be a writeable array of
    the weight's shape and dtype (any strides: it is added into)."""
    forward = "embedding_forward"
    ids, shape, dtype = cache_fields(cache, forward, "ids shape dtype")
    if not (isinstance(shape, tuple) and len(shape) == 2 and all(is_int(n) and n >= 0 for n in shape)):
        raise FastformerError(f"shape in the cache of {forward} must be the weight's shape (V, C), got {shape!r}")
    if not (isinstance(dtype, (np.dtype, type)) and dtype in FLOAT_DTYPES):
        raise FastformerError(f"dtype in the cache of {forward} must be the weight's dtype, float32 or float64, "
                              f"got {dtype!r}")
    shape, dtype = (int(shape[0]), int(shape[1])), np.dtype(dtype)
    ids = as_int_array(ids, f"ids in the cache of {forward}")
    check_index_range(ids, f"ids in the cache of {forward}", shape[0])
    dout = check_grad(dout, "dout", (*ids.shape, shape[1]), dtype)
    if dweight is not None and not (isinstance(dweight, np.ndarray) and dweight.shape == shape
                                    and dweight.dtype == dtype and dweight.flags.writeable):
        raise FastformerError(f"dweight must be a writeable {np.dtype(dtype)} array of the weight's shape "
                              f"{shape}, got {_describe(dweight)}")
    return dout, ids, shape, dtype


# ------------------------------------------------------------------ AdamW
def adamw_inputs(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step):
    """The arrays and settings of `adamw_update`: param, m, v writeable float arrays updated in
    place, grad of their shape and dtype; returns step as an int."""
    arrays = {"param": param, "grad": grad, "m": m, "v": v}
    if not all(isinstance(a, np.ndarray) for a in arrays.values()) or param.dtype not in FLOAT_DTYPES \
            or not (param.shape == grad.shape == m.shape == v.shape) \
            or not (param.dtype == grad.dtype == m.dtype == v.dtype):
        raise FastformerError("adamw_update needs param, grad, m, v as float32 or float64 arrays of one shape and "
                              "dtype, got " + ", ".join(f"{n} {_describe(a)}" for n, a in arrays.items()))
    for name in ("param", "m", "v"):
        if not arrays[name].flags.writeable:
            raise FastformerError(f"{name} must be writeable: adamw_update updates it in place")
    check_finite("lr", lr, low=0)
    check_number("beta1", beta1, low=0, high=1, high_open=True)
    check_number("beta2", beta2, low=0, high=1, high_open=True)
    check_finite("eps", eps, low=0)
    check_finite("weight_decay", weight_decay, low=0)
    return check_int("step", step)


# ------------------------------------------------- the fused GPT-2 decoding step
@functools.lru_cache(maxsize=16)
def gpt2_param_shapes(L, C, F, V, Tmax):
    """The shape of each parameter, in the order of PackedGPT2.offsets, and their sizes."""
    # the shapes of GPT2_LAYER_SLOTS
    layer = [(C,), (C,), (C, 3 * C), (3 * C,), (C, C), (C,), (C,), (C,), (C, F), (F,), (F, C), (C,)]
    shapes = tuple(layer * L + [(V, C), (Tmax, C), (C,), (C,), (V, C)])
    return shapes, np.array([math.prod(s) for s in shapes])


@functools.lru_cache(maxsize=64)
def _offsets_inside(offsets_bytes, dims, flat_size):
    """Whether every parameter at these offsets (int64 bytes) lies inside a flat buffer of
    flat_size values. Cached on the bytes themselves: a decoding loop passes the same table
    every token, and a changed table is a new key."""
    offsets = np.frombuffer(offsets_bytes, dtype=np.int64)
    return bool(offsets.min() >= 0 and (offsets + gpt2_param_shapes(*dims)[1]).max() <= flat_size)


def check_gpt2_decode(weights, ids, positions, k_cache, v_cache, padding, start, eps):
    """Validate gpt2_decode_step's inputs (the Numba kernel reads them unchecked).
    Returns (flat, offsets int64, ids int64 (B,), positions int64 (B,), padding, shapes)."""
    if not all(hasattr(weights, f) for f in ("flat", "offsets", "vocab_size", "d_ff")):
        raise FastformerError(f"weights must be a PackedGPT2 (flat, offsets, vocab_size, d_ff), got "
                              f"{type(weights).__name__}")
    flat = np.asarray(weights.flat)
    if flat.ndim != 1 or flat.dtype not in FLOAT_DTYPES or not flat.flags.c_contiguous:
        raise FastformerError(f"weights.flat must be a contiguous 1-D float32/float64 array, got {flat.dtype} "
                              f"{flat.shape}")
    flat = aligned(flat)
    V = check_int("weights.vocab_size", weights.vocab_size)
    d_ff = check_int("weights.d_ff", weights.d_ff)
    if not all(isinstance(c, np.ndarray) and c.ndim == 5 and c.dtype == flat.dtype and c.flags.c_contiguous
               and c.flags.writeable for c in (k_cache, v_cache)) or k_cache.shape != v_cache.shape:
        raise FastformerError(f"k_cache and v_cache must be contiguous {flat.dtype} arrays (L, B, H, Tmax, hs), "
                              f"writeable and of one shape, got {_describe(k_cache)} and {_describe(v_cache)}")
    L, B, H, Tmax, hs = k_cache.shape
    if H == 0 or hs == 0:
        raise FastformerError(f"k_cache and v_cache must have H >= 1 heads of size hs >= 1, got {k_cache.shape}")
    dims = (L, H * hs, d_ff, V, Tmax)
    shapes, _ = gpt2_param_shapes(*dims)
    offsets = as_int_array(weights.offsets, "weights.offsets")
    if offsets.shape != (len(shapes),) or not _offsets_inside(offsets.tobytes(), dims, flat.size):
        raise FastformerError(f"weights.offsets must hold {len(shapes)} offsets of parameters that lie inside "
                              f"weights.flat ({flat.size} values) for L={L}, C={H * hs}, F={d_ff}, "
                              f"V={V}, Tmax={Tmax}")
    ids = np.array(as_int_array(ids, "ids"))  # (B,) copies, writeable whatever they were
    positions = np.array(as_int_array(positions, "positions"))
    if ids.shape != (B,) or positions.shape != (B,):
        raise FastformerError(f"ids and positions must have shape (B,) = ({B},), got {ids.shape} and {positions.shape}")
    id_list, pos_list = ids.tolist(), positions.tolist()  # B is small: Python's min and max are quicker
    if B and (min(id_list) < 0 or max(id_list) >= V or min(pos_list) < 0 or max(pos_list) >= Tmax):
        raise FastformerError(f"ids must lie in [0, {V}) and positions in [0, {Tmax}), "
                              f"got ids {id_list} and positions {pos_list}")
    padding = np.asarray(padding)
    if padding.shape != (B, Tmax) or padding.dtype != bool:
        raise FastformerError(f"padding must be a bool array (B, Tmax) = {(B, Tmax)}, got {padding.dtype} "
                              f"{padding.shape}")
    if not is_int(start) or not 0 <= start < Tmax:
        raise FastformerError(f"start must lie in [0, {Tmax}) (an integer): the cache holds {Tmax} positions, "
                              f"got {start!r}")
    check_eps(eps)
    return flat, offsets, ids, positions, kernel_array(padding), shapes


# ------------------------------------------- LM head fused with cross-entropy
def linear_cross_entropy_grad_inputs(dloss, cache):
    """(dloss, (dh, dweight)) of linear_cross_entropy_backward: the cache of a forward with
    grad=True, two writeable float arrays of one dtype."""
    dloss = check_dloss(dloss)
    if cache is None:
        raise FastformerError("linear_cross_entropy_backward needs the cache of a forward with grad=True")
    if not (isinstance(cache, tuple) and len(cache) == 2 and all(isinstance(a, np.ndarray) for a in cache)
            and cache[0].dtype in FLOAT_DTYPES and cache[1].dtype == cache[0].dtype
            and cache[1].ndim == 2 and cache[0].shape[-1] == cache[1].shape[1]
            and all(a.flags.writeable for a in cache)):
        raise FastformerError(f"the cache of linear_cross_entropy_forward must be (dh (..., C), dweight (V, C)), "
                              f"writeable float arrays of one dtype, got {_describe(cache)}")
    return dloss, cache


def linear_cross_entropy_inputs(h, weight, targets, ignore_index, grad, dweight):
    """(h (..., C), weight (V, C), t (N,) int64, counted (N,) bool) of
    `linear_cross_entropy_forward`; `dweight`, when given with grad, is checked as the (V, C)
    array the weight's gradient is written into."""
    check_bool("grad", grad)
    h = as_float_array(h, "h")
    weight = as_float_array(weight, "weight", h.dtype)
    if weight.ndim != 2 or weight.shape[1] != h.shape[-1] or weight.shape[0] == 0:
        raise FastformerError(f"weight must have shape (V >= 1, C={h.shape[-1]}) for h {h.shape}, got {weight.shape}")
    if dweight is not None:
        check_out(dweight, weight, "dweight")
    targets, ignore_index = as_int_array(targets, "targets"), check_ignore_index(ignore_index)
    V = weight.shape[0]
    logits = np.broadcast_to(np.zeros((), h.dtype), (*h.shape[:-1], V))  # the logits' shape, no memory
    t, counted = check_targets(logits, targets, ignore_index)
    return h, weight, t, counted
