"""The Numba backend: the kernel interface of numpy_ops.py on the jitted kernels of numba_kernels.py.

Each public method checks its inputs with the reference's own check (fastformer.kernels.checks:
float32/float64 only, one dtype per call, every id and every array of a backward's cache
checked against the sizes the kernel loops over; non-contiguous or unaligned inputs are copied,
read-only ones used in place), allocates the outputs, and calls one private kernel. Inputs a
kernel does not handle (empty arrays, in-place updates of non-contiguous or unaligned arrays)
go to the reference implementation inherited from `NumpyOps`. Caches have the reference's
layout, so either backward accepts the other's forward cache, and both refuse the same bad ones.

Importing this module raises ImportError when Numba is not installed.
"""

import concurrent.futures

import numpy as np

from fastformer.kernels.checks import (
    activation_inputs,
    adamw_inputs,
    attention_grad_inputs,
    attention_inputs,
    cached_attention_inputs,
    check_gpt2_decode,
    cross_entropy_inputs,
    embedding_grad_inputs,
    embedding_inputs,
    gelu_grad_inputs,
    gelu_inputs,
    layernorm_grad_inputs,
    layernorm_inputs,
    qkv_attention_grad_inputs,
    qkv_attention_inputs,
    relu_grad_inputs,
    residual_layernorm_grads,
    residual_layernorm_inputs,
    softmax_grad_inputs,
    softmax_inputs,
)
from fastformer.kernels.numpy_ops import GeluCache, NumpyOps, ReluCache, write_kv_cache
from fastformer.kernels.threads import blas_threads, configure_threads, configured_threads

configure_threads()  # before the kernels load: compiling them starts Numba's thread pool
from fastformer.kernels import numba_kernels as K  # noqa: E402

# Query rows from which attention runs on BLAS tiles (NumpyOps._attention_tiled) instead of the
# row kernels: the crossover measured by benchmarks/attention_crossover.py.
ATTENTION_TILED_FROM = 1024
_head_pool = None  # (threads, executor) of NumbaOps._run_tasks, made at their first use
_NO_PADDING = np.zeros(0, np.bool_)  # the tiled attention's block kernels, without a mask: never read

ROW_CHUNKS = 64  # chunks of rows whose partial weight gradients are summed at the end


def _jit_writable(*arrays):
    """Whether a kernel can update these arrays in place: C-contiguous and aligned, as its
    signature requires (the reference updates any other array)."""
    return all(a.flags.c_contiguous and a.flags.aligned for a in arrays)


def _bias_activation_backward(kernel, dy, saved, args, has_bias):
    """(dx, dbias or None) of y = act(x + bias) from `kernel`(dy, saved, *args, dx, db_part),
    `saved` being the array the forward kept (shaped like x, not empty), dy checked against it,
    dbias summed over row chunks."""
    N, C = saved.size // saved.shape[-1], saved.shape[-1]
    dx = np.empty_like(saved)
    db_part = np.empty((min(N, ROW_CHUNKS), C), saved.dtype)
    kernel(_rows(dy), _rows(saved), *args, _rows(dx), db_part)
    return dx, (db_part.sum(axis=0) if has_bias else None)


def _rows(x):
    """2-D (rows, last axis) view of a contiguous array."""
    return x.reshape(-1, x.shape[-1])


class NumbaOps(NumpyOps):
    """Jitted, fused and parallel kernels; same signatures and results as NumpyOps."""

    name = "numba"

    # ------------------------------------------------------------------ softmax
    def softmax_forward(self, x):
        x = softmax_inputs(x)
        if x.size == 0:
            return super().softmax_forward(x)
        y = np.empty_like(x)
        K._softmax_fwd(_rows(x), _rows(y))
        return y, y

    def softmax_backward(self, dy, cache):
        dy, y = softmax_grad_inputs(dy, cache)
        if y.size == 0:
            return super().softmax_backward(dy, cache)
        dx = np.empty_like(y)
        K._softmax_bwd(_rows(dy), _rows(y), _rows(dx))
        return dx

    # ---------------------------------------------------------------- layernorm
    def layernorm_forward(self, x, weight, bias, eps=1e-5):
        x, weight, bias = layernorm_inputs(x, weight, bias, eps)
        if x.size == 0:
            return super().layernorm_forward(x, weight, bias, eps)
        y = np.empty_like(x)
        mean = np.empty(x.shape[:-1], x.dtype)
        rstd = np.empty(x.shape[:-1], x.dtype)
        K.sized(K._layernorm_fwd, x.size)(_rows(x), weight, bias, x.dtype.type(eps), _rows(y), mean.reshape(-1),
                                          rstd.reshape(-1))
        return y, (x, weight, mean, rstd)

    def layernorm_backward(self, dy, cache):
        dy, cache = layernorm_grad_inputs(dy, cache)
        return self._layernorm_backward(dy, None, cache)

    def residual_layernorm_forward(self, x, branch, weight, bias, eps=1e-5):
        x, branch, weight, bias = residual_layernorm_inputs(x, branch, weight, bias, eps)
        if x.size == 0:
            return super().residual_layernorm_forward(x, branch, weight, bias, eps)
        s, y = np.empty_like(x), np.empty_like(x)
        mean = np.empty(x.shape[:-1], x.dtype)
        rstd = np.empty(x.shape[:-1], x.dtype)
        K.sized(K._residual_layernorm_fwd, x.size)(_rows(x), _rows(branch), weight, bias, x.dtype.type(eps),
                                  _rows(s), _rows(y), mean.reshape(-1), rstd.reshape(-1))
        return (s, y), (s, weight, mean, rstd)

    def residual_layernorm_backward(self, dy, ds, cache):
        return self._layernorm_backward(*residual_layernorm_grads(dy, ds, cache))

    def _layernorm_backward(self, dy, ds, cache):
        """dx of layernorm, plus `ds` (the residual stream's gradient) when given, in one pass;
        dy, ds and the cache as the checks return them."""
        x, weight, mean, rstd = cache
        if x.size == 0:
            dx, dw, db = super().layernorm_backward(dy, cache)
            return (dx if ds is None else dx + ds), dw, db
        N, C = x.size // x.shape[-1], x.shape[-1]
        P = min(N, ROW_CHUNKS)
        dx = np.empty_like(x)
        dw_part = np.empty((P, C), x.dtype)
        db_part = np.empty((P, C), x.dtype)
        K._layernorm_bwd(_rows(dy), _rows(x), weight, mean.reshape(-1), rstd.reshape(-1),
                         _rows(dy if ds is None else ds),
                         ds is not None, _rows(dx), dw_part, db_part)
        return dx, dw_part.sum(axis=0), db_part.sum(axis=0)

    # ---------------------------------------------------------------- attention
    def attention_forward(self, q, k, v, causal=False, key_padding_mask=None, scale=None):
        q, k, v, key_padding_mask, scale = attention_inputs(q, k, v, causal, key_padding_mask, scale)
        out = np.empty_like(q)  # (B, H, T, hs)
        lse = self._attention(q, k, v, causal, key_padding_mask, scale, out)
        return out, (q, k, v, out, lse, causal, key_padding_mask, scale)

    def attention_qkv_forward(self, qkv, n_heads, causal=True, key_padding_mask=None, scale=None):
        qkv, (B, T, C, hs), key_padding_mask, scale = qkv_attention_inputs(qkv, n_heads, causal, key_padding_mask,
                                                                           scale)
        # strided (B, H, T, hs) views: the kernel reads the heads in place, no split copy
        q, k, v = qkv.reshape(B, T, 3, n_heads, hs).transpose(2, 0, 3, 1, 4)
        out = np.empty((B, T, C), qkv.dtype)  # written head by head through a (B, H, T, hs) view
        out_heads = out.reshape(B, T, n_heads, hs).transpose(0, 2, 1, 3)
        lse = self._attention(q, k, v, causal, key_padding_mask, scale, out_heads)
        return out, (q, k, v, out_heads, lse, causal, key_padding_mask, scale)

    def attention_cached(self, qkv, k_cache, v_cache, start, n_heads, key_padding_mask=None, scale=None):
        qkv, (B, T, C, hs), end, kpm, scale = cached_attention_inputs(qkv, k_cache, v_cache, start, n_heads,
                                                                      key_padding_mask, scale)
        if not (k_cache.flags.aligned and v_cache.flags.aligned):  # the kernel reads them in place
            return super().attention_cached(qkv, k_cache, v_cache, start, n_heads, kpm, scale)
        q = write_kv_cache(qkv, k_cache, v_cache, start, n_heads)
        k, v = k_cache[:, :, :end], v_cache[:, :, :end]  # strided views: the kernel reads the cache in place
        out = np.empty((B, T, C), qkv.dtype)
        self._attention(q, k, v, True, kpm, scale, out.reshape(B, T, n_heads, hs).transpose(0, 2, 1, 3))
        return out

    def gpt2_decode_step(self, weights, ids, positions, k_cache, v_cache, padding, start, eps=1e-5):
        flat, offsets, ids, positions, padding, _ = check_gpt2_decode(weights, ids, positions, k_cache, v_cache,
                                                                      padding, start, eps)
        if not _jit_writable(k_cache, v_cache):
            return super().gpt2_decode_step(weights, ids, positions, k_cache, v_cache, padding, start, eps)
        logits = np.empty((ids.shape[0], int(weights.vocab_size)), flat.dtype)
        K._gpt2_decode(flat, offsets, int(weights.d_ff), ids, positions, k_cache, v_cache, padding, int(start),
                       flat.dtype.type(eps), logits)
        return logits

    def _attention(self, q, k, v, causal, key_padding_mask, scale, out):
        """Run the forward kernel into `out` (B, H, T, hs); returns lse (B, H, T)."""
        B, H, T, hs = q.shape
        if q.size == 0 or k.shape[2] == 0:
            out[...] = 0.0
            return np.full((B, H, T), -np.inf, q.dtype)
        if T >= ATTENTION_TILED_FROM:
            return self._attention_tiled(q, k, v, causal, key_padding_mask, scale, out)
        lse = np.empty((B, H, T), q.dtype)
        kpm = key_padding_mask if key_padding_mask is not None else np.zeros((B, k.shape[2]), bool)
        K.sized(K._attention_fwd, q.size + k.size)(q, k, v, np.ascontiguousarray(kpm), key_padding_mask is not None,
                                                   bool(causal), q.dtype.type(scale), out, lse)
        return lse

    def attention_backward(self, dout, cache):
        dout, cache = attention_grad_inputs(dout, cache)
        dq, dk, dv = (np.empty_like(a) for a in cache[:3])
        self._attention_grads(dout, cache, dq, dk, dv)
        return dq, dk, dv

    def attention_qkv_backward(self, dout, cache):
        dout, cache = qkv_attention_grad_inputs(dout, cache)
        q = cache[0]
        B, H, T, hs = q.shape
        dqkv = np.empty((B, T, 3 * H * hs), q.dtype)
        dq, dk, dv = dqkv.reshape(B, T, 3, H, hs).transpose(2, 0, 3, 1, 4)
        self._attention_grads(dout.reshape(B, T, H, hs).transpose(0, 2, 1, 3), cache, dq, dk, dv)
        return dqkv

    def _attention_grads(self, dout, cache, dq, dk, dv):
        """Run the backward kernel, writing every entry of dq, dk, dv (any strides); the cache as
        attention_cache returns it."""
        q, k, v, out, lse, causal, key_padding_mask, scale = cache
        if q.size == 0 or k.shape[2] == 0:
            dq[...] = 0.0
            dk[...] = 0.0
            dv[...] = 0.0
            return
        if q.shape[2] >= ATTENTION_TILED_FROM:
            return self._attention_tiled_grads(dout, cache, dq, dk, dv)
        B, S = q.shape[0], k.shape[2]
        kpm = key_padding_mask if key_padding_mask is not None else np.zeros((B, S), bool)
        K._attention_bwd(q, k, v, out, dout, lse, np.ascontiguousarray(kpm),
                         key_padding_mask is not None, bool(causal), q.dtype.type(scale), dq, dk, dv)

    def _task_threads(self):
        return configured_threads() or 1

    def _run_tasks(self, tasks):
        """The tasks side by side, one per thread of a pool of the configured thread count, each
        on one BLAS thread with serial kernels (Numba kernels and NumPy's GEMMs release the
        GIL): no parallel region per block or chunk hands the cores back and forth between
        the BLAS and the Numba thread pools, which on a busy machine wait for each other."""
        threads = min(len(tasks), self._task_threads())
        if threads < 2:
            return super()._run_tasks(tasks)
        global _head_pool
        if _head_pool is None or _head_pool[0] != threads:
            _head_pool = threads, concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="fastformer-tasks")
        with blas_threads(1):
            for f in [_head_pool[1].submit(fn, *args) for fn, args in tasks]:
                f.result()

    def _flash_softmax_block(self, sc, m, total, acc, row0, c0, mask):
        K._flash_softmax_block(sc, m, total, acc, row0, c0, _NO_PADDING if mask is None else mask, mask is not None)

    def _flash_probs_block(self, sc, lse, row0, c0, mask):
        K._flash_probs_block(sc, np.ascontiguousarray(lse), row0, c0, _NO_PADDING if mask is None else mask,
                             mask is not None)

    def _flash_dscores_block(self, p, dp, D, scale):
        K._flash_dscores_block(p, dp, np.ascontiguousarray(D), scale)

    # ------------------------------------------------------------ cross-entropy
    def cross_entropy_forward(self, logits, targets, ignore_index=-100, out=None):
        """As the reference; the gradient of the mean loss is computed in the same pass and
        kept in the cache (one (N, V) array, no separate probabilities): `out` when given,
        which may be `logits` itself, else a new array."""
        logits, t, counted = cross_entropy_inputs(logits, targets, ignore_index, out)
        if logits.size == 0 or (out is not None and not out.flags.aligned):
            return super().cross_entropy_forward(logits, targets, ignore_index, out)
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

    def _cross_entropy_rows(self, x, t, ignore_index, inv_n):
        """The reference's, in one serial pass over the rows of a chunk of the fused LM head
        (the chunks run side by side: _run_tasks)."""
        nll = np.empty(x.shape[0], np.float64)
        K.serial(K._cross_entropy_fwd_inplace)(x, np.ascontiguousarray(t), int(ignore_index), inv_n, nll)
        return nll

    # --------------------------------------------------------------------- GELU
    def gelu_forward(self, x, bias=None, approximate="tanh"):
        x, bias = gelu_inputs(x, bias, approximate)
        if x.size == 0:
            return super().gelu_forward(x, bias, approximate)
        b = np.zeros(x.shape[-1], x.dtype) if bias is None else bias
        y = np.empty_like(x)
        K.sized(K._gelu_fwd, x.size)(_rows(x), b, approximate == "none", _rows(y))
        return y, GeluCache(x, b, approximate, bias is not None)

    def gelu_backward(self, dy, cache):
        dy, (x, b, approximate, has_bias) = gelu_grad_inputs(dy, cache)
        if x.size == 0:
            return super().gelu_backward(dy, cache)
        return _bias_activation_backward(K._gelu_bwd, dy, x, (b, approximate == "none"), has_bias)

    # --------------------------------------------------------------------- ReLU
    def relu_forward(self, x, bias=None):
        x, bias = activation_inputs(x, bias)
        if x.size == 0:
            return super().relu_forward(x, bias)
        b = np.zeros(x.shape[-1], x.dtype) if bias is None else bias
        y = np.empty_like(x)
        K.sized(K._relu_fwd, x.size)(_rows(x), b, _rows(y))
        return y, ReluCache(y, bias is not None)  # y > 0 exactly where x + bias > 0

    def relu_backward(self, dy, cache):
        dy, (y, has_bias) = relu_grad_inputs(dy, cache)
        if y.size == 0:
            return super().relu_backward(dy, cache)
        return _bias_activation_backward(K._relu_bwd, dy, y, (), has_bias)

    # ---------------------------------------------------------------- embedding
    def embedding_forward(self, weight, ids):
        weight, ids = embedding_inputs(weight, ids)
        C = weight.shape[1]
        out = np.empty((*ids.shape, C), weight.dtype)
        if ids.size and C:
            K.sized(K._embedding_fwd, out.size)(weight, ids.reshape(-1), out.reshape(-1, C))
        return out, (ids, weight.shape, weight.dtype)

    def embedding_backward(self, dout, cache, dweight=None):
        dout, ids, shape, dtype = embedding_grad_inputs(dout, cache, dweight)
        if dweight is None:
            dweight = np.zeros(shape, dtype=dtype)
        elif not _jit_writable(dweight):
            return super().embedding_backward(dout, cache, dweight)  # accumulate into any view
        if ids.size and shape[1]:
            K._embedding_bwd(dout.reshape(-1, shape[1]), ids.reshape(-1), dweight)
        return dweight

    # -------------------------------------------------------------------- AdamW
    def adamw_update(self, param, grad, m, v, *, lr, beta1=0.9, beta2=0.999, eps=1e-8,
                     weight_decay=0.0, step=1):
        step = adamw_inputs(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step)
        if not _jit_writable(param, grad, m, v):  # strided or unaligned: updated in place by the reference
            return super().adamw_update(param, grad, m, v, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                        weight_decay=weight_decay, step=step)
        F = param.dtype.type
        K._adamw(param.reshape(-1), grad.reshape(-1), m.reshape(-1), v.reshape(-1),
                 F(beta1), F(1.0 - beta1), F(beta2), F(1.0 - beta2), F(eps), F(1.0 - lr * weight_decay),
                 F(lr / (1.0 - beta1 ** step)), F(1.0 - beta2 ** step))
