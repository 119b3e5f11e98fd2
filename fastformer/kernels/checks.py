"""The checks of the kernel interface, shared by both backends.

Every public kernel of `NumpyOps` (numpy_ops.py) and `NumbaOps` (numba_ops.py) starts with the
check of this file made for it, and nothing after that validates again: the reference math and
the jitted kernels trust what they get. So the two backends accept and refuse exactly the same
inputs, with the same `FastformerError` message, which names the argument, what it was and what
is allowed. A check returns the arrays the kernel works on: C-contiguous, one float dtype per
call (float32 or float64), ids as int64.

Shape letters: B batch, H heads, T query length, S key length, hs head size, C channels, V vocab.
"""

import functools
import math

import numpy as np

from fastformer.errors import FastformerError, check_bool, check_choice, check_int, check_number, is_int

FLOAT_DTYPES = (np.float32, np.float64)
GELU_FORMS = ("tanh", "none")


def _describe(a):
    """How an argument shows in a message: "float32 (2, 3)" for an array, else its type."""
    return f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__


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
    return np.ascontiguousarray(x)


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
    return np.ascontiguousarray(x, dtype=np.int64)


def check_grad(g, name, shape, dtype):
    """The gradient reaching a forward's output: an array of that output's shape and dtype."""
    g = np.asarray(g)
    if g.dtype != dtype or g.shape != tuple(shape):
        raise FastformerError(f"{name} must be a {np.dtype(dtype)} array of the forward's output shape "
                              f"{tuple(shape)}, got {g.dtype} {g.shape}")
    return np.ascontiguousarray(g)


def check_out(out, like, name):
    """An output array that a kernel writes in place: a writeable C-contiguous ndarray of the
    shape and dtype of `like` (it may be `like` itself)."""
    if not isinstance(out, np.ndarray) or out.shape != like.shape or out.dtype != like.dtype \
            or not out.flags.c_contiguous or not out.flags.writeable:
        raise FastformerError(f"{name} must be a writeable C-contiguous {like.dtype} array of shape {like.shape}, "
                              f"got {_describe(out)}")


def check_eps(eps):
    return check_number("eps", eps, low=0)


# ---------------------------------------------------------------- softmax
def softmax_inputs(x):
    return as_rows(x, "x")


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


def residual_layernorm_grads(dy, ds, x):
    """(dy, ds or None) of the residual LayerNorm's backward, both shaped as its output."""
    dy = check_grad(dy, "dy", x.shape, x.dtype)
    return dy, None if ds is None else check_grad(ds, "ds", x.shape, x.dtype)


# -------------------------------------------------------------- attention
def _attention_scale(scale, hs):
    """The score scale: 1 / sqrt(hs) by default, else a number > 0."""
    return 1.0 / math.sqrt(hs) if scale is None else check_number("scale", scale, low=0, low_open=True)


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
    targets = as_int_array(targets, "targets")
    if not is_int(ignore_index):
        raise FastformerError(f"ignore_index must be an integer, got {ignore_index!r}")
    return (logits, *check_targets(logits, targets, ignore_index))


# ------------------------------------------------------------ activations
def activation_inputs(x, bias, approximate=None):
    """(x, bias or None) of y = act(x + bias); `approximate` is GELU's form (None for ReLU)."""
    if approximate is not None:
        check_choice("approximate", approximate, GELU_FORMS)
    x = as_float_array(x, "x")
    return x, None if bias is None else as_vector(bias, "bias", x.shape[-1], x.dtype)


# -------------------------------------------------------------- embedding
def embedding_inputs(weight, ids):
    """(weight (V, C), ids int64 with every id in [0, V))."""
    weight = as_float_array(weight, "weight")
    if weight.ndim != 2:
        raise FastformerError(f"weight must have shape (V, C), got {weight.shape}")
    ids = as_int_array(ids, "ids")
    V = weight.shape[0]
    if ids.size and (ids.min() < 0 or ids.max() >= V):
        bad = ids[(ids < 0) | (ids >= V)].flat[0]
        raise FastformerError(f"ids must lie in [0, {V}), got {bad}")
    return weight, ids


def embedding_grad_inputs(dout, ids, shape, dtype, dweight):
    """dout (*ids.shape, C) of the embedding's backward; `dweight`, when given, must be a
    writeable array of the weight's shape and dtype (any strides: it is added into)."""
    dout = check_grad(dout, "dout", (*ids.shape, shape[1]), dtype)
    if dweight is not None and not (isinstance(dweight, np.ndarray) and dweight.shape == tuple(shape)
                                    and dweight.dtype == dtype and dweight.flags.writeable):
        raise FastformerError(f"dweight must be a writeable {np.dtype(dtype)} array of the weight's shape "
                              f"{tuple(shape)}, got {_describe(dweight)}")
    return dout


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
    check_number("lr", lr, low=0)
    check_number("beta1", beta1, low=0, high=1, high_open=True)
    check_number("beta2", beta2, low=0, high=1, high_open=True)
    check_number("eps", eps, low=0)
    check_number("weight_decay", weight_decay, low=0)
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


def check_gpt2_decode(weights, ids, positions, k_cache, v_cache, padding, start):
    """Validate gpt2_decode_step's inputs (the Numba kernel reads them unchecked).
    Returns (flat, offsets int64, ids int64 (B,), positions int64 (B,), shapes)."""
    flat = np.asarray(weights.flat)
    if flat.ndim != 1 or flat.dtype not in FLOAT_DTYPES or not flat.flags.c_contiguous:
        raise FastformerError(f"weights.flat must be a contiguous 1-D float32/float64 array, got {flat.dtype} "
                              f"{flat.shape}")
    if k_cache.ndim != 5 or k_cache.shape != v_cache.shape or k_cache.dtype != flat.dtype \
            or v_cache.dtype != flat.dtype or not (k_cache.flags.c_contiguous and v_cache.flags.c_contiguous):
        raise FastformerError(f"k_cache and v_cache must be contiguous {flat.dtype} arrays (L, B, H, Tmax, hs), got "
                         f"{k_cache.dtype} {k_cache.shape} and {v_cache.dtype} {v_cache.shape}")
    L, B, H, Tmax, hs = k_cache.shape
    dims = (L, H * hs, int(weights.d_ff), int(weights.vocab_size), Tmax)
    shapes, _ = gpt2_param_shapes(*dims)
    offsets = np.ascontiguousarray(weights.offsets, dtype=np.int64)
    if offsets.shape != (len(shapes),) or not _offsets_inside(offsets.tobytes(), dims, flat.size):
        raise FastformerError(f"weights.offsets must hold {len(shapes)} offsets of parameters that lie inside "
                         f"weights.flat ({flat.size} values) for L={L}, C={H * hs}, F={weights.d_ff}, "
                         f"V={weights.vocab_size}, Tmax={Tmax}")
    ids = np.array(as_int_array(ids, "ids"))  # (B,) copies, writeable whatever they were
    positions = np.array(as_int_array(positions, "positions"))
    if ids.shape != (B,) or positions.shape != (B,):
        raise FastformerError(f"ids and positions must have shape (B,) = ({B},), got {ids.shape} and {positions.shape}")
    id_list, pos_list = ids.tolist(), positions.tolist()  # B is small: Python's min and max are quicker
    if B and (min(id_list) < 0 or max(id_list) >= weights.vocab_size or min(pos_list) < 0 or max(pos_list) >= Tmax):
        raise FastformerError(f"ids must lie in [0, {weights.vocab_size}) and positions in [0, {Tmax}), "
                         f"got ids {ids.tolist()} and positions {positions.tolist()}")
    if padding.shape != (B, Tmax) or padding.dtype != bool:
        raise FastformerError(f"padding must be a bool array (B, Tmax) = {(B, Tmax)}, got {padding.dtype} "
                              f"{padding.shape}")
    if not 0 <= start < Tmax:
        raise FastformerError(f"start must lie in [0, {Tmax}): the cache holds {Tmax} positions, got {start}")
    return flat, offsets, ids, positions, shapes


# ------------------------------------------- LM head fused with cross-entropy
def linear_cross_entropy_inputs(h, weight, targets, ignore_index, dweight):
    """(h2 (N, C), weight (V, C), t (N,) int64, counted (N,) bool) of
    `linear_cross_entropy_forward`; `dweight`, when given, is checked as the (V, C) array the
    weight's gradient is written into."""
    h = as_float_array(h, "h")
    weight = as_float_array(weight, "weight", h.dtype)
    if weight.ndim != 2 or weight.shape[1] != h.shape[-1] or weight.shape[0] == 0:
        raise FastformerError(f"weight must have shape (V >= 1, C={h.shape[-1]}) for h {h.shape}, got {weight.shape}")
    if dweight is not None:
        check_out(dweight, weight, "dweight")
    targets = as_int_array(targets, "targets")
    if not is_int(ignore_index):
        raise FastformerError(f"ignore_index must be an integer, got {ignore_index!r}")
    V = weight.shape[0]
    logits = np.broadcast_to(np.zeros((), h.dtype), (*h.shape[:-1], V))  # the logits' shape, no memory
    t, counted = check_targets(logits, targets, ignore_index)
    return h.reshape(-1, h.shape[-1]), weight, t, counted
