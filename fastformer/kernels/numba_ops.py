"""The Numba backend: the kernel interface of numpy_ops.py on the jitted kernels of numba_kernels.py.

Each public method validates its inputs the way the reference does (float32/float64 only, one
dtype per call; non-contiguous arrays are copied to contiguous ones), allocates the outputs, and
calls one private kernel. Inputs a kernel does not handle (empty arrays, in-place updates of
non-contiguous arrays) go to the reference implementation inherited from `NumpyOps`.
Caches have the reference's layout wherever the backward needs the same things, so either
backward accepts the other's forward cache for layernorm and attention.

Importing this module raises ImportError when Numba is not installed.
"""

from collections import namedtuple

import numpy as np

from fastformer.kernels.numpy_ops import (
    GELU_FORMS,
    NumpyOps,
    as_float_array,
    as_int_array,
    as_vector,
    check_attention_inputs,
    check_gpt2_decode,
    check_out,
    check_qkv,
    check_targets,
    write_kv_cache,
)
from fastformer.kernels.threads import configure_threads

configure_threads()  # before the kernels load: compiling them starts Numba's thread pool
from fastformer.kernels import numba_kernels as K  # noqa: E402

ROW_CHUNKS = 64  # chunks of rows whose partial weight gradients are summed at the end

# GELU keeps x and the bias rather than u = x + bias (one array fewer written; the backward
# recomputes u), so its cache differs from the reference's (u, approximate, has_bias).
GeluCache = namedtuple("GeluCache", "x bias approximate has_bias")
ReluCache = namedtuple("ReluCache", "y has_bias")


def _bias_activation_backward(kernel, dy, saved, args, has_bias):
    """(dx, dbias or None) of y = act(x + bias) from `kernel`(dy, saved, *args, dx, db_part),
    `saved` being the array the forward kept (shaped like x), dbias summed over row chunks."""
    dy = as_float_array(dy, "dy", saved.dtype)
    if dy.shape != saved.shape:
        raise ValueError(f"dy must have the shape of the forward's x {saved.shape}, got {dy.shape}")
    N, C = saved.size // saved.shape[-1], saved.shape[-1]
    dx = np.empty_like(saved)
    db_part = np.empty((min(N, ROW_CHUNKS), C), saved.dtype)
    kernel(_rows(dy), _rows(saved), *args, _rows(dx), db_part)
    return dx, (db_part.sum(axis=0) if has_bias else None)


def _rows(x):
    """2-D (rows, last axis) view of a contiguous array."""
    return x.reshape(-1, x.shape[-1])


def _is_inplace_ok(a, dtype):
    return isinstance(a, np.ndarray) and a.dtype == dtype and a.flags.c_contiguous and a.flags.writeable


class NumbaOps(NumpyOps):
    """Jitted, fused and parallel kernels; same signatures and results as NumpyOps."""

    name = "numba"

    # ------------------------------------------------------------------ softmax
    def softmax_forward(self, x):
        x = as_float_array(x, "x")
        if x.ndim == 0 or x.size == 0:
            return super().softmax_forward(x)
        y = np.empty_like(x)
        K._softmax_fwd(_rows(x), _rows(y))
        return y, y

    def softmax_backward(self, dy, cache):
        y = cache
        dy = as_float_array(dy, "dy", y.dtype)
        if dy.shape != y.shape or y.ndim == 0 or y.size == 0:
            return super().softmax_backward(dy, cache)
        dx = np.empty_like(y)
        K._softmax_bwd(_rows(dy), _rows(y), _rows(dx))
        return dx

    # ---------------------------------------------------------------- layernorm
    def layernorm_forward(self, x, weight, bias, eps=1e-5):
        x = as_float_array(x, "x")
        if x.ndim == 0 or x.size == 0:
            return super().layernorm_forward(x, weight, bias, eps)
        C = x.shape[-1]
        weight = as_vector(weight, "weight", C, x.dtype)
        bias = as_vector(bias, "bias", C, x.dtype)
        y = np.empty_like(x)
        mean = np.empty(x.shape[:-1], x.dtype)
        rstd = np.empty(x.shape[:-1], x.dtype)
        K.sized(K._layernorm_fwd, x.size)(_rows(x), weight, bias, x.dtype.type(eps), _rows(y), mean.reshape(-1),
                                          rstd.reshape(-1))
        return y, (x, weight, mean, rstd)

    def layernorm_backward(self, dy, cache):
        return self._layernorm_backward(dy, None, cache)

    def residual_layernorm_forward(self, x, branch, weight, bias, eps=1e-5):
        x = as_float_array(x, "x")
        branch = as_float_array(branch, "branch", x.dtype)
        if branch.shape != x.shape:
            raise ValueError(f"branch must have the shape of x {x.shape}, got {branch.shape}")
        if x.ndim == 0 or x.size == 0:
            return super().residual_layernorm_forward(x, branch, weight, bias, eps)
        C = x.shape[-1]
        weight = as_vector(weight, "weight", C, x.dtype)
        bias = as_vector(bias, "bias", C, x.dtype)
        s, y = np.empty_like(x), np.empty_like(x)
        mean = np.empty(x.shape[:-1], x.dtype)
        rstd = np.empty(x.shape[:-1], x.dtype)
        K.sized(K._residual_layernorm_fwd, x.size)(_rows(x), _rows(branch), weight, bias, x.dtype.type(eps),
                                  _rows(s), _rows(y), mean.reshape(-1), rstd.reshape(-1))
        return (s, y), (s, weight, mean, rstd)

    def residual_layernorm_backward(self, dy, ds, cache):
        return self._layernorm_backward(dy, ds, cache)

    def _layernorm_backward(self, dy, ds, cache):
        """dx of layernorm, plus `ds` (the residual stream's gradient) when given, in one pass."""
        x, weight, mean, rstd = cache
        dy = as_float_array(dy, "dy", x.dtype)
        if dy.shape != x.shape:
            raise ValueError(f"dy must have the shape of the forward's input {x.shape}, got {dy.shape}")
        if ds is not None:
            ds = as_float_array(ds, "ds", x.dtype)
            if ds.shape != x.shape:
                raise ValueError(f"ds must have the shape of the forward's input {x.shape}, got {ds.shape}")
        if x.ndim == 0 or x.size == 0:
            dx, dw, db = super().layernorm_backward(dy, cache)
            return (dx if ds is None else dx + ds), dw, db
        N, C = x.size // x.shape[-1], x.shape[-1]
        P = min(N, ROW_CHUNKS)
        dx = np.empty_like(x)
        dw_part = np.empty((P, C), x.dtype)
        db_part = np.empty((P, C), x.dtype)
        K._layernorm_bwd(_rows(dy), _rows(x), weight, np.ascontiguousarray(mean).reshape(-1),
                         np.ascontiguousarray(rstd).reshape(-1), _rows(dy if ds is None else ds),
                         ds is not None, _rows(dx), dw_part, db_part)
        return dx, dw_part.sum(axis=0), db_part.sum(axis=0)

    # ---------------------------------------------------------------- attention
    def attention_forward(self, q, k, v, causal=False, key_padding_mask=None, scale=None):
        q = as_float_array(q, "q")
        k = as_float_array(k, "k", q.dtype)
        v = as_float_array(v, "v", q.dtype)
        key_padding_mask, scale = check_attention_inputs(q, k, v, causal, key_padding_mask, scale)
        out = np.empty_like(q)  # (B, H, T, hs)
        lse = self._attention(q, k, v, causal, key_padding_mask, scale, out)
        return out, (q, k, v, out, lse, causal, key_padding_mask, scale)

    def attention_qkv_forward(self, qkv, n_heads, causal=True, key_padding_mask=None, scale=None):
        qkv = as_float_array(qkv, "qkv")
        B, T, C, hs = check_qkv(qkv, n_heads)
        # strided (B, H, T, hs) views: the kernel reads the heads in place, no split copy
        q, k, v = qkv.reshape(B, T, 3, n_heads, hs).transpose(2, 0, 3, 1, 4)
        key_padding_mask, scale = check_attention_inputs(q, k, v, causal, key_padding_mask, scale)
        out = np.empty((B, T, C), qkv.dtype)  # written head by head through a (B, H, T, hs) view
        out_heads = out.reshape(B, T, n_heads, hs).transpose(0, 2, 1, 3)
        lse = self._attention(q, k, v, causal, key_padding_mask, scale, out_heads)
        return out, (q, k, v, out_heads, lse, causal, key_padding_mask, scale)

    def attention_cached(self, qkv, k_cache, v_cache, start, n_heads, key_padding_mask=None, scale=None):
        qkv = as_float_array(qkv, "qkv")
        B, T, C3 = qkv.shape
        q, end = write_kv_cache(qkv, k_cache, v_cache, start, n_heads)
        k, v = k_cache[:, :, :end], v_cache[:, :, :end]  # strided views: the kernel reads the cache in place
        kpm = None if key_padding_mask is None else np.ascontiguousarray(key_padding_mask[:, :end], dtype=bool)
        kpm, scale = check_attention_inputs(q, k, v, True, kpm, scale)
        out = np.empty((B, T, C3 // 3), qkv.dtype)
        self._attention(q, k, v, True, kpm, scale, out.reshape(B, T, n_heads, -1).transpose(0, 2, 1, 3))
        return out

    def gpt2_decode_step(self, weights, ids, positions, k_cache, v_cache, padding, start, eps=1e-5):
        flat, offsets, ids, positions, _ = check_gpt2_decode(weights, ids, positions, k_cache, v_cache,
                                                             padding, start)
        logits = np.empty((ids.shape[0], weights.vocab_size), flat.dtype)
        K._gpt2_decode(flat, offsets, int(weights.d_ff), ids, positions, k_cache, v_cache,
                       np.ascontiguousarray(padding), int(start), flat.dtype.type(eps), logits)
        return logits

    def _attention(self, q, k, v, causal, key_padding_mask, scale, out):
        """Run the forward kernel into `out` (B, H, T, hs); returns lse (B, H, T)."""
        B, H, T, hs = q.shape
        lse = np.empty((B, H, T), q.dtype)
        if q.size == 0 or k.shape[2] == 0:
            out[...] = 0.0
            lse[...] = -np.inf
            return lse
        kpm = key_padding_mask if key_padding_mask is not None else np.zeros((B, k.shape[2]), bool)
        K.sized(K._attention_fwd, q.size + k.size)(q, k, v, np.ascontiguousarray(kpm), key_padding_mask is not None,
                                                   bool(causal), q.dtype.type(scale), out, lse)
        return lse

    def attention_backward(self, dout, cache):
        q = cache[0]
        dout = as_float_array(dout, "dout", q.dtype)
        if dout.shape != q.shape:
            raise ValueError(f"dout must have the shape of q {q.shape}, got {dout.shape}")
        dq, dk, dv = np.empty_like(q), np.empty_like(cache[1]), np.empty_like(cache[2])
        self._attention_grads(dout, cache, dq, dk, dv)
        return dq, dk, dv

    def attention_qkv_backward(self, dout, cache):
        q = cache[0]
        B, H, T, hs = q.shape
        dout = as_float_array(dout, "dout", q.dtype)
        if dout.shape != (B, T, H * hs):
            raise ValueError(f"dout must have shape (B, T, C) = {(B, T, H * hs)}, got {dout.shape}")
        dqkv = np.empty((B, T, 3 * H * hs), q.dtype)
        dq, dk, dv = dqkv.reshape(B, T, 3, H, hs).transpose(2, 0, 3, 1, 4)
        self._attention_grads(dout.reshape(B, T, H, hs).transpose(0, 2, 1, 3), cache, dq, dk, dv)
        return dqkv

    def _attention_grads(self, dout, cache, dq, dk, dv):
        """Run the backward kernel, writing every entry of dq, dk, dv (any strides)."""
        q, k, v, out, lse, causal, key_padding_mask, scale = cache
        if q.size == 0 or k.shape[2] == 0:
            dq[...] = 0.0
            dk[...] = 0.0
            dv[...] = 0.0
            return
        B, S = q.shape[0], k.shape[2]
        kpm = key_padding_mask if key_padding_mask is not None else np.zeros((B, S), bool)
        K._attention_bwd(q, k, v, out, dout, np.ascontiguousarray(lse), np.ascontiguousarray(kpm),
                         key_padding_mask is not None, bool(causal), q.dtype.type(scale), dq, dk, dv)

    # ------------------------------------------------------------ cross-entropy
    def cross_entropy_forward(self, logits, targets, ignore_index=-100, out=None):
        """As the reference; the gradient of the mean loss is computed in the same pass and
        kept in the cache (one (N, V) array, no separate probabilities): `out` when given,
        which may be `logits` itself, else a new array."""
        logits = as_float_array(logits, "logits")
        targets = as_int_array(targets, "targets")
        if out is not None:
            check_out(out, logits, "out")
        if logits.ndim == 0 or logits.size == 0:
            return super().cross_entropy_forward(logits, targets, ignore_index, out)
        t, counted = check_targets(logits, targets, ignore_index)
        n = int(counted.sum())
        inv_n = logits.dtype.type(1.0 / max(n, 1))
        nll = np.empty(t.size, np.float64)
        if out is not None and np.may_share_memory(out, logits):
            if out.ctypes.data != logits.ctypes.data:  # a partial overlap: the reference copes
                return super().cross_entropy_forward(logits, targets, ignore_index, out)
            dlogits = out
            K._cross_entropy_fwd_inplace(_rows(logits), t, int(ignore_index), inv_n, nll)
        else:
            dlogits = np.empty_like(logits) if out is None else out
            K._cross_entropy_fwd(_rows(logits), t, int(ignore_index), inv_n, _rows(dlogits), nll)
        loss = float(nll.sum() / n) if n else 0.0
        return loss, dlogits

    # --------------------------------------------------------------------- GELU
    def gelu_forward(self, x, bias=None, approximate="tanh"):
        if approximate not in GELU_FORMS:
            raise ValueError(f"approximate must be one of {GELU_FORMS}, got {approximate!r}")
        x = as_float_array(x, "x")
        if x.ndim == 0 or x.size == 0:
            return super().gelu_forward(x, bias, approximate)
        C = x.shape[-1]
        b = np.zeros(C, x.dtype) if bias is None else as_vector(bias, "bias", C, x.dtype)
        y = np.empty_like(x)
        K.sized(K._gelu_fwd, x.size)(_rows(x), b, approximate == "none", _rows(y))
        return y, GeluCache(x, b, approximate, bias is not None)

    def gelu_backward(self, dy, cache):
        if not isinstance(cache, GeluCache):  # a reference forward's cache
            return super().gelu_backward(dy, cache)
        x, b, approximate, has_bias = cache
        return _bias_activation_backward(K._gelu_bwd, dy, x, (b, approximate == "none"), has_bias)

    # --------------------------------------------------------------------- ReLU
    def relu_forward(self, x, bias=None):
        x = as_float_array(x, "x")
        if x.ndim == 0 or x.size == 0:
            return super().relu_forward(x, bias)
        C = x.shape[-1]
        b = np.zeros(C, x.dtype) if bias is None else as_vector(bias, "bias", C, x.dtype)
        y = np.empty_like(x)
        K.sized(K._relu_fwd, x.size)(_rows(x), b, _rows(y))
        return y, ReluCache(y, bias is not None)  # y > 0 exactly where x + bias > 0

    def relu_backward(self, dy, cache):
        if not isinstance(cache, ReluCache):  # a reference forward's cache
            return super().relu_backward(dy, cache)
        y, has_bias = cache
        return _bias_activation_backward(K._relu_bwd, dy, y, (), has_bias)

    # ---------------------------------------------------------------- embedding
    def embedding_forward(self, weight, ids):
        weight = as_float_array(weight, "weight")
        ids = as_int_array(ids, "ids")
        if weight.ndim != 2:
            raise ValueError(f"weight must have shape (V, C), got {weight.shape}")
        V, C = weight.shape
        if ids.size and (ids.min() < 0 or ids.max() >= V):
            bad = ids[(ids < 0) | (ids >= V)][0]
            raise ValueError(f"ids must lie in [0, {V}), got {bad}")
        out = np.empty((*ids.shape, C), weight.dtype)
        if ids.size and C:
            K.sized(K._embedding_fwd, out.size)(weight, ids.reshape(-1), out.reshape(-1, C))
        return out, (ids, weight.shape, weight.dtype)

    def embedding_backward(self, dout, cache, dweight=None):
        ids, shape, dtype = cache
        dout = as_float_array(dout, "dout", dtype)
        if dout.shape != (*ids.shape, shape[1]):
            raise ValueError(f"dout must have shape {(*ids.shape, shape[1])}, got {dout.shape}")
        if dweight is None:
            dweight = np.zeros(shape, dtype=dtype)
        elif not _is_inplace_ok(dweight, dtype) or dweight.shape != shape:
            return super().embedding_backward(dout, cache, dweight)  # accumulate into any view
        if ids.size and shape[1]:
            K._embedding_bwd(dout.reshape(-1, shape[1]), ids.reshape(-1), dweight)
        return dweight

    # -------------------------------------------------------------------- AdamW
    def adamw_update(self, param, grad, m, v, *, lr, beta1=0.9, beta2=0.999, eps=1e-8,
                     weight_decay=0.0, step=1):
        arrays = (param, grad, m, v)
        if not all(isinstance(a, np.ndarray) for a in arrays) or not (param.shape == grad.shape == m.shape == v.shape):
            return super().adamw_update(param, grad, m, v, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                        weight_decay=weight_decay, step=step)
        dtype = param.dtype
        if dtype not in (np.float32, np.float64) or not all(_is_inplace_ok(a, dtype) for a in (param, m, v)) \
                or grad.dtype != dtype or not grad.flags.c_contiguous:
            return super().adamw_update(param, grad, m, v, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                        weight_decay=weight_decay, step=step)
        if step < 1:
            raise ValueError(f"step counts from 1, got {step}")
        F = dtype.type
        K._adamw(param.reshape(-1), grad.reshape(-1), m.reshape(-1), v.reshape(-1),
                 F(beta1), F(1.0 - beta1), F(beta2), F(1.0 - beta2), F(eps), F(1.0 - lr * weight_decay),
                 F(lr / (1.0 - beta1 ** step)), F(1.0 - beta2 ** step))
