"""The NumPy reference kernels: the specification of every fastformer kernel, and the fallback.

Every hot-path operation of the models is a method of `NumpyOps`, written as a forward/backward
pair: `X_forward(...) -> (out, cache)` and `X_backward(dout, cache) -> grads` in the order of the
forward's inputs. Faster backends subclass `NumpyOps` and override only what they speed up, so
this file is also the documentation of what each kernel must compute. Nothing here knows about
models -- arrays in, arrays out -- except `gpt2_decode_step`, which fuses a whole GPT-2 decoding
step because at batch 1 the calls, not the arithmetic, are what a step costs. What each kernel
accepts is written once, in checks.py, and every backend calls the same check.

Inputs may be read-only (np.memmap(mode="r"), np.frombuffer, arrays with writeable=False),
strided or unaligned on every backend; only the arrays a kernel updates in place (KV caches,
AdamW's param, m and v, `out`, `dweight`) must be writeable.

NaN and infinity, the same on every backend:
- softmax, and the probabilities of attention: -inf is a masked entry and gets exactly 0; a row
  that is all -inf gives zeros (attention: a zero output and lse = -inf). A row holding a NaN
  or +inf gives a row of NaN (in attention: NaN at the keys it may attend to, 0 at the others).
- cross-entropy: a counted row holding a NaN or +inf gives a NaN loss and a NaN gradient row;
  an ignored row gives 0 and a zero gradient whatever it holds.
- everything else propagates NaN and inf as IEEE arithmetic does. A NaN or inf that meets a
  zero probability (a masked key's value, say) may make a product NaN on the reference (a
  matrix product computes 0 * NaN) and not on Numba (which skips masked keys): the rows and
  gradients that depend on a non-finite value are non-finite on both.
- a NaN or infinite attention scale, eps, learning rate or other setting is refused.

Shape letters: B batch, H heads, T query length, S key length, hs head size, C channels, V vocab.
"""

import math
from collections import namedtuple

import numpy as np

from fastformer.errors import check_int
from fastformer.kernels.checks import (
    activation_inputs,
    adamw_inputs,
    attention_grad_inputs,
    attention_inputs,
    cached_attention_inputs,
    check_gpt2_decode,
    cross_entropy_grad_inputs,
    cross_entropy_inputs,
    embedding_grad_inputs,
    embedding_inputs,
    gelu_grad_inputs,
    gelu_inputs,
    layernorm_grad_inputs,
    layernorm_inputs,
    linear_cross_entropy_grad_inputs,
    linear_cross_entropy_inputs,
    qkv_attention_grad_inputs,
    qkv_attention_inputs,
    relu_grad_inputs,
    residual_layernorm_grads,
    residual_layernorm_inputs,
    softmax_grad_inputs,
    softmax_inputs,
)

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)

ATTENTION_BLOCK = 512  # query and key rows of a block of `_attention_tiled` (benchmarks/attention_crossover.py)
HEAD_CHUNK_BYTES = 8 << 20  # logits per chunk of the fused LM head, per thread: in L3 beside the other's
HEAD_CHUNK_MIN_ROWS = 256  # fewer rows make dweight's GEMM (K = rows) and its sum memory-bound


def head_chunk_rows(V, dtype):
    """Rows per chunk of `linear_cross_entropy_forward` for a vocabulary of V: a chunk's (rows, V)
    logits take about HEAD_CHUNK_BYTES, and never fewer than HEAD_CHUNK_MIN_ROWS rows."""
    return max(HEAD_CHUNK_MIN_ROWS, HEAD_CHUNK_BYTES // (V * np.dtype(dtype).itemsize))
_erf = np.frompyfunc(math.erf, 1, 1)  # exact erf, element by element (NumPy has no erf ufunc)


def attention_allowed(T, S, causal, key_padding_mask):
    """Boolean mask of the keys each query may attend to, broadcastable to (B, H, T, S), or None.

    Causal attention with T queries and S >= T keys aligns the queries with the last T keys
    (query i sits at position S - T + i), which is what decoding with a key/value cache needs.
    `key_padding_mask` is (B, S) bool, True where the key is padding and must be ignored.
    """
    allowed = None
    if causal:
        allowed = np.tril(np.ones((T, S), dtype=bool), k=S - T)[None, None]  # (1, 1, T, S)
    if key_padding_mask is not None:
        keep = ~key_padding_mask[:, None, None, :]  # (B, 1, 1, S)
        allowed = keep if allowed is None else (allowed & keep)
    return allowed


def write_kv_cache(qkv, k_cache, v_cache, start, n_heads):
    """Split the fused projection of Tn new tokens and store their keys and values in the caches
    (B, H, Tmax, hs) at [start, start + Tn). Returns the queries, a (B, H, Tn, hs) view.
    The inputs are those `cached_attention_inputs` accepted."""
    B, T, C3 = qkv.shape
    q, k, v = qkv.reshape(B, T, 3, n_heads, C3 // (3 * n_heads)).transpose(2, 0, 3, 1, 4)  # each (B, H, Tn, hs)
    k_cache[:, :, start:start + T] = k
    v_cache[:, :, start:start + T] = v
    return q


def _padding_rows(key_padding_mask, B):
    """Each batch row's key padding (S,) bool, C-contiguous, or None for every row without a mask."""
    if key_padding_mask is None:
        return [None] * B
    return [np.array(row, np.bool_) for row in key_padding_mask]  # writeable copies: S bools each


def _keys_allowed(shape, row0, c0, mask):
    """(R, n) bool of a tiled attention block: rows at key positions row0.. against keys
    c0..c0+n, True where a key is at or before the row's position and not padding (mask (S,) or
    None)."""
    R, n = shape
    keys = c0 + np.arange(n)
    allowed = keys[None, :] <= (row0 + np.arange(R))[:, None]
    return allowed if mask is None else allowed & ~mask[c0:c0 + n][None, :]


def _layernorm(x, weight, bias, eps):
    """LayerNorm of checked inputs: (y, cache)."""
    mean = x.mean(axis=-1, keepdims=True)
    xc = x - mean
    var = (xc * xc).mean(axis=-1, keepdims=True)
    rstd = (1.0 / np.sqrt(var + eps)).astype(x.dtype)
    y = xc * rstd * weight + bias
    return y, (x, weight, mean[..., 0], rstd[..., 0])


def _layernorm_grads(dy, cache):
    """(dx, dweight, dbias) of LayerNorm for a checked dy."""
    # forward: y = (x - mean) * rstd * weight + bias
    x, weight, mean, rstd = cache
    C = x.shape[-1]
    xhat = (x - mean[..., None]) * rstd[..., None]
    dbias = dy.reshape(-1, C).sum(axis=0)
    dweight = (dy * xhat).reshape(-1, C).sum(axis=0)
    dxhat = dy * weight
    dx = (dxhat - dxhat.mean(axis=-1, keepdims=True)
          - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True)) * rstd[..., None]
    return dx, dweight, dbias


# The weights of a GPT-2 model for gpt2_decode_step: `flat` is the 1-D parameter buffer and
# `offsets` (L * 12 + 5,) int64 where each array starts in it -- per layer its 12 slots, in the
# order of GPT2_LAYER_SLOTS (shapes: (C,), (C,), (C, 3C), (3C,), (C, C), (C,), (C,), (C,),
# (C, F), (F,), (F, C), (C,); matrices stored (in, out)); then the token embedding (V, C), the
# position embedding (Tmax, C), the final norm's gain and bias (C,) and the output head (V, C)
# (the token embedding again when tied). The model that packs itself names its parameters for
# these slots (TransformerLM.decode_layout).
PackedGPT2 = namedtuple("PackedGPT2", "flat offsets vocab_size d_ff")
# What gelu_forward and relu_forward keep, on every backend: GELU keeps x and the bias (zeros when
# there is none) rather than u = x + bias (the backward recomputes u), ReLU its output (y > 0
# exactly where x + bias > 0).
GeluCache = namedtuple("GeluCache", "x bias approximate has_bias")
ReluCache = namedtuple("ReluCache", "y has_bias")
GPT2_LAYER_SLOTS = ("norm1 gain", "norm1 bias", "qkv weight", "qkv bias", "attention output weight",
                    "attention output bias", "norm2 gain", "norm2 bias", "hidden weight", "hidden bias",
                    "output weight", "output bias")


class NumpyOps:
    """Reference implementation of the kernel interface (pure NumPy). Each public method checks
    its inputs with fastformer.kernels.checks, as the other backends do, and then trusts them."""

    name = "numpy"

    # ------------------------------------------------------------------ softmax
    def softmax_forward(self, x):
        """Softmax over the last axis. Entries equal to -inf get exactly 0; a row that is all
        -inf gives all zeros (not NaN); a row holding a NaN or +inf gives all NaN. Returns (y, cache)."""
        x = softmax_inputs(x)
        m = x.max(axis=-1, keepdims=True)  # NaN when the row holds one: exp(x - m) is then NaN
        m = np.where(m == -np.inf, 0.0, m).astype(x.dtype)
        e = np.exp(x - m)
        s = e.sum(axis=-1, keepdims=True)
        y = e / np.where(s == 0, 1.0, s).astype(x.dtype)
        return y, y

    def softmax_backward(self, dy, cache):
        # forward: y = exp(x - max) / sum(exp(x - max))
        dy, y = softmax_grad_inputs(dy, cache)
        return y * (dy - (dy * y).sum(axis=-1, keepdims=True))

    # ---------------------------------------------------------------- layernorm
    def layernorm_forward(self, x, weight, bias, eps=1e-5):
        """LayerNorm over the last axis C. Returns (y, cache) with cache = (x, weight, mean, rstd)."""
        return _layernorm(*layernorm_inputs(x, weight, bias, eps), eps)

    def layernorm_backward(self, dy, cache):
        """Returns (dx, dweight, dbias)."""
        return _layernorm_grads(*layernorm_grad_inputs(dy, cache))

    def residual_layernorm_forward(self, x, branch, weight, bias, eps=1e-5):
        """The pre-LN step `s = x + branch; y = layernorm(s)`. Returns ((s, y), cache)."""
        x, branch, weight, bias = residual_layernorm_inputs(x, branch, weight, bias, eps)
        s = x + branch
        y, cache = _layernorm(s, weight, bias, eps)
        return (s, y), cache

    def residual_layernorm_backward(self, dy, ds, cache):
        """`dy` is the gradient of y, `ds` (or None) the gradient reaching s along the residual
        stream. Returns (dsum, dweight, dbias); dsum is the gradient of both x and branch."""
        # forward: s = x + branch; y = layernorm(s)
        dy, ds, cache = residual_layernorm_grads(dy, ds, cache)
        dsum, dweight, dbias = _layernorm_grads(dy, cache)
        if ds is not None:
            dsum += ds
        return dsum, dweight, dbias

    # ---------------------------------------------------------------- attention
    def attention_forward(self, q, k, v, causal=False, key_padding_mask=None, scale=None):
        """Multi-head scaled dot-product attention.

        q (B, H, T, hs), k and v (B, H, S >= 1, hs); `key_padding_mask` (B, S) bool, True = padding.
        A query with no key left to attend to gets a zero output and lse = -inf; one whose scores
        hold a NaN or +inf gets a NaN output and lse (see the module's docstring).
        Returns (out (B, H, T, hs), cache); the cache keeps the inputs, the output and the row
        log-sum-exp (B, H, T) only -- the backward recomputes the probabilities.
        """
        q, k, v, key_padding_mask, scale = attention_inputs(q, k, v, causal, key_padding_mask, scale)
        return self._attention_forward(q, k, v, causal, key_padding_mask, scale)

    def _attention_forward(self, q, k, v, causal, key_padding_mask, scale):
        """attention_forward on checked C-contiguous inputs."""
        p, lse = self._attention_probs(q, k, causal, key_padding_mask, scale, lse=None)
        out = p @ v  # (B, H, T, hs)
        return out, (q, k, v, out, lse, causal, key_padding_mask, scale)

    def _attention_probs(self, q, k, causal, key_padding_mask, scale, lse):
        """Probabilities (B, H, T, S) and the row log-sum-exp; recomputed from `lse` if given."""
        T, S = q.shape[2], k.shape[2]
        s = (q @ k.transpose(0, 1, 3, 2)) * q.dtype.type(scale)  # (B, H, T, S)
        allowed = attention_allowed(T, S, causal, key_padding_mask)
        if allowed is not None:
            s = np.where(allowed, s, -np.inf)
        if lse is None:
            m = s.max(axis=-1)  # NaN or +inf in a row make its lse NaN, and so its probabilities
            m = np.where(m == -np.inf, 0.0, m).astype(q.dtype)
            total = np.exp(s - m[..., None]).sum(axis=-1)
            with np.errstate(divide="ignore"):
                lse = (m + np.log(total)).astype(q.dtype)  # -inf where every key is masked
        lse_safe = np.where(lse == -np.inf, np.inf, lse).astype(q.dtype)  # p = 0 where no key is left
        p = np.exp(s - lse_safe[..., None])
        return (p if allowed is None else np.where(allowed, p, 0.0).astype(q.dtype)), lse

    def attention_backward(self, dout, cache):
        """Returns (dq, dk, dv)."""
        # forward: p = softmax(q @ k^T * scale + mask); out = p @ v
        return self._attention_grads_reference(*attention_grad_inputs(dout, cache))

    def _attention_grads_reference(self, dout, cache):
        """(dq, dk, dv) of attention for a checked dout (B, H, T, hs)."""
        q, k, v, out, lse, causal, key_padding_mask, scale = cache
        p, _ = self._attention_probs(q, k, causal, key_padding_mask, scale, lse=lse)
        dv = p.transpose(0, 1, 3, 2) @ dout
        dp = dout @ v.transpose(0, 1, 3, 2)
        D = (dout * out).sum(axis=-1, keepdims=True)  # rowsum(dO * O) = rowsum(P * dP)
        ds = p * (dp - D) * q.dtype.type(scale)
        dq = ds @ k
        dk = ds.transpose(0, 1, 3, 2) @ q
        return dq, dk, dv

    # ------------------------------------------ attention on BLAS tiles (long sequences)
    # The flash-attention structure: query blocks x key blocks, every block product a GEMM, an
    # online softmax (running max m and sum l per row) between them, and a backward that
    # recomputes each block's probabilities from the saved lse; no (T, S) array per head. The
    # elementwise steps are the three `_flash_*` methods and the heads run through `_run_tasks`,
    # which a backend overrides; the loops and the GEMMs are written once, here. A backend uses
    # them above its measured crossover (numba_ops.ATTENTION_TILED_FROM); the reference itself
    # keeps the plain form above as the specification.

    def _attention_tiled(self, q, k, v, causal, key_padding_mask, scale, out):
        """Attention of checked q (B, H, T, hs), k, v (B, H, S, hs), any strides with unit
        last stride, written into out (B, H, T, hs); returns lse (B, H, T). Same masks and lse
        convention as `attention_forward`."""
        B, H, T, hs = q.shape
        lse = np.empty((B, H, T), q.dtype)
        masks = _padding_rows(key_padding_mask, B)
        self._run_tasks([(self._tiled_head, (q[b, h], k[b, h], v[b, h], masks[b], causal, scale, out[b, h], lse[b, h]))
                         for b in range(B) for h in range(H)])
        return lse

    def _tiled_head(self, q, k, v, mask, causal, scale, out, lse):
        """One head of `_attention_tiled`: q (T, hs), k, v (S, hs), mask (S,) or None -> out, lse."""
        (T, hs), S = q.shape, k.shape[0]
        off, dt, block = S - T, q.dtype, ATTENTION_BLOCK  # query i is at key position i + off
        scores = np.empty(block * block, dt)  # one block of scores, then of p
        pv = np.empty(block * hs, dt)
        for r0 in range(0, T, block):
            R = min(T, r0 + block) - r0
            qs = q[r0:r0 + R] * dt.type(scale)  # (R, hs)
            m = np.full(R, -np.inf, dt)  # running max of each row's scores
            total = np.zeros(R, dt)  # running sum of exp(score - m)
            acc = np.zeros((R, hs), dt)  # running sum of exp(score - m) v
            end = min(S, r0 + R + off) if causal else S  # the keys the block's last row sees
            for c0 in range(0, end, block):
                n = min(end, c0 + block) - c0
                sc = np.matmul(qs, k[c0:c0 + n].T, out=scores[:R * n].reshape(R, n))  # (R, n)
                self._flash_softmax_block(sc, m, total, acc, r0 + off if causal else S, c0, mask)
                acc += np.matmul(sc, v[c0:c0 + n], out=pv[:R * hs].reshape(R, hs))  # p @ v
            self._flash_finish(acc, m, total, out[r0:r0 + R], lse[r0:r0 + R])

    def _attention_tiled_grads(self, dout, cache, dq, dk, dv):
        """(dq, dk, dv) of `_attention_tiled` for dout (B, H, T, hs), written into dq, dk, dv
        (any strides with unit last stride)."""
        q, k, v, out, lse, causal, key_padding_mask, scale = cache
        B, H = q.shape[:2]
        masks = _padding_rows(key_padding_mask, B)
        self._run_tasks([(self._tiled_head_grads, (q[b, h], k[b, h], v[b, h], out[b, h], lse[b, h], dout[b, h],
                                                   masks[b], causal, scale, dq[b, h], dk[b, h], dv[b, h]))
                         for b in range(B) for h in range(H)])

    def _tiled_head_grads(self, q, k, v, out, lse, dout, mask, causal, scale, dq, dk, dv):
        """One head of `_attention_tiled_grads`: (T, hs) and (S, hs) arrays, mask (S,) or None."""
        # forward: p = softmax(q k^T * scale + mask); out = p v
        #   dv = p^T dout;  dp = dout v^T;  ds = p * (dp - D) * scale, D = rowsum(dout * out)
        #   dq = ds k;  dk = ds^T q
        (T, hs), S = q.shape, k.shape[0]
        off, dt, block = S - T, q.dtype, ATTENTION_BLOCK
        p_buf, dp_buf, part = np.empty(block * block, dt), np.empty(block * block, dt), np.empty(block * hs, dt)
        D = np.einsum("td,td->t", dout, out)  # (T,)
        dq[...] = 0
        for c0 in range(0, S, block):
            n = min(S, c0 + block) - c0
            kj, vj, dkj, dvj = k[c0:c0 + n], v[c0:c0 + n], dk[c0:c0 + n], dv[c0:c0 + n]
            dkj[...] = 0
            dvj[...] = 0
            first = max(0, c0 - off) // block * block if causal else 0  # earlier rows see none of these keys
            for r0 in range(first, T, block):
                R = min(T, r0 + block) - r0
                p = np.matmul(q[r0:r0 + R] * dt.type(scale), kj.T, out=p_buf[:R * n].reshape(R, n))  # scores
                self._flash_probs_block(p, lse[r0:r0 + R], r0 + off if causal else S, c0, mask)
                dvj += np.matmul(p.T, dout[r0:r0 + R], out=part[:n * hs].reshape(n, hs))
                ds = np.matmul(dout[r0:r0 + R], vj.T, out=dp_buf[:R * n].reshape(R, n))  # dp (R, n)
                self._flash_dscores_block(p, ds, D[r0:r0 + R], dt.type(scale))  # now ds
                dq[r0:r0 + R] += np.matmul(ds, kj, out=part[:R * hs].reshape(R, hs))
                dkj += np.matmul(ds.T, q[r0:r0 + R], out=part[:n * hs].reshape(n, hs))

    def _task_threads(self):
        """How many of `_run_tasks`' tasks run at once: 1 here."""
        return 1

    def _run_tasks(self, tasks):
        """Run every (function, args) of `tasks` -- the heads of a tiled attention, the chunk
        groups of the fused LM head -- one by one. A backend may run them side by side: they
        write to disjoint arrays."""
        for fn, args in tasks:
            fn(*args)

    def _flash_softmax_block(self, sc, m, total, acc, row0, c0, mask):
        """One key block of the online softmax, in place: sc (R, n) holds the scores of rows
        row0.. (their key positions, S when nothing is causal) against keys c0..c0+n; a key
        after the row's own position or padded (mask (S,) True) is left out. Updates the
        running max m (R,), total (R,) and acc (R, hs) (rescaled to the new max) and turns sc
        into exp(score - new max), 0 where left out."""
        allowed = _keys_allowed(sc.shape, row0, c0, mask)
        sc[~allowed] = -np.inf
        new = np.maximum(m, sc.max(axis=1))  # NaN where a score is NaN: the row stays NaN
        base = np.where(np.isfinite(new), new, 0).astype(sc.dtype)
        alpha = np.exp(m - base)  # 0 while nothing was seen (m = -inf)
        np.exp(sc - base[:, None], out=sc)
        total *= alpha
        total += sc.sum(axis=1)
        acc *= alpha[:, None]
        m[...] = new

    def _flash_finish(self, acc, m, total, out, lse):
        """out (R, hs) = acc / total and lse = m + log(total); a row that saw no key (total 0)
        gets 0 and -inf, a row that met a NaN (total NaN) NaN."""
        seen = total != 0
        out[...] = np.where(seen[:, None], acc / np.where(seen, total, 1)[:, None], 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            lse[...] = np.where(seen, m + np.log(np.where(seen, total, 1)), -np.inf)

    def _flash_probs_block(self, sc, lse, row0, c0, mask):
        """sc (R, n) scores -> p = exp(score - lse) in place, 0 where left out (as in
        `_flash_softmax_block`) and on rows with lse = -inf (they saw no key)."""
        seen = lse != -np.inf  # a NaN lse gives NaN probabilities, as on the row kernels
        allowed = _keys_allowed(sc.shape, row0, c0, mask) & seen[:, None]
        np.exp(np.where(allowed, sc - np.where(seen, lse, 0)[:, None], -np.inf), out=sc)

    def _flash_dscores_block(self, p, dp, D, scale):
        """dp (R, n) -> ds = p * (dp - D) * scale in place."""
        dp -= D[:, None]
        dp *= p
        dp *= scale

    def attention_qkv_forward(self, qkv, n_heads, causal=True, key_padding_mask=None, scale=None):
        """Self-attention straight from a fused projection, as GPT-2's c_attn makes it.

        qkv (B, T, 3C) holds [q | k | v] along the last axis, head h at columns h*hs:(h+1)*hs of
        each part. Returns (out (B, T, C) with the heads merged back, cache). Same masks and
        lse convention as `attention_forward`, which it is defined by.
        """
        qkv, (B, T, C, hs), kpm, scale = qkv_attention_inputs(qkv, n_heads, causal, key_padding_mask, scale)
        q, k, v = (np.ascontiguousarray(a) for a in qkv.reshape(B, T, 3, n_heads, hs).transpose(2, 0, 3, 1, 4))
        out, cache = self._attention_forward(q, k, v, causal, kpm, scale)  # q, k, v each (B, H, T, hs)
        return out.transpose(0, 2, 1, 3).reshape(B, T, C), cache

    def attention_cached(self, qkv, k_cache, v_cache, start, n_heads, key_padding_mask=None, scale=None):
        """Causal self-attention of Tn new tokens over a key/value cache, for decoding.

        qkv (B, Tn, 3C) is the fused projection of the tokens at positions start .. start+Tn-1.
        Their keys and values are written into k_cache, v_cache (B, H, Tmax, hs) at
        [start, start + Tn); then new query i attends to the cached keys [0, start + i].
        `key_padding_mask` (B, >= start + Tn) is True at padding. Returns out (B, Tn, C).
        Inference only: there is no backward.
        """
        qkv, (B, T, C, hs), end, kpm, scale = cached_attention_inputs(qkv, k_cache, v_cache, start, n_heads,
                                                                      key_padding_mask, scale)
        q = write_kv_cache(qkv, k_cache, v_cache, start, n_heads)
        k, v = (np.ascontiguousarray(c[:, :, :end]) for c in (k_cache, v_cache))
        out, _ = self._attention_forward(np.ascontiguousarray(q), k, v, True, kpm, scale)
        return out.transpose(0, 2, 1, 3).reshape(B, T, C)

    def gpt2_decode_step(self, weights, ids, positions, k_cache, v_cache, padding, start, eps=1e-5):
        """One new token per row through a GPT-2 model that continues the sequences in a
        key/value cache: embedding, L pre-LN blocks (causal attention over the cache, GELU-tanh
        MLP), ln_f and the LM head. weights: a PackedGPT2; ids and positions (B,) ints;
        k_cache, v_cache (L, B, H, Tmax, hs), whose keys and values [0, start) are used and which
        receive the new ones at `start`; padding (B, Tmax) True at padded positions, read for
        [0, start]. Inference only. Returns logits (B, V)."""
        flat, offsets, ids, positions, padding, shapes = check_gpt2_decode(weights, ids, positions, k_cache,
                                                                           v_cache, padding, start, eps)
        P = [flat[o:o + math.prod(s)].reshape(s) for o, s in zip(offsets.tolist(), shapes)]
        wte, wpe, ln_fw, ln_fb, head = P[-5:]
        x = (wte[ids] + wpe[positions])[:, None]  # (B, 1, C)
        for i in range(k_cache.shape[0]):
            s = i * len(GPT2_LAYER_SLOTS)
            ln1w, ln1b, wqkv, bqkv, wo, bo, ln2w, ln2b, wfc, bfc, wm, bm = P[s:s + len(GPT2_LAYER_SLOTS)]
            h, _ = _layernorm(x, ln1w, ln1b, eps)  # the arrays are views of the checked buffer
            a = self.attention_cached(h @ wqkv + bqkv, k_cache[i], v_cache[i], start, k_cache.shape[2], padding)
            x = x + (a @ wo + bo)
            h, _ = _layernorm(x, ln2w, ln2b, eps)
            g, _ = self.gelu_forward(h @ wfc, bfc, approximate="tanh")
            x = x + (g @ wm + bm)
        h, _ = _layernorm(x, ln_fw, ln_fb, eps)
        return h[:, 0] @ head.T


    def attention_qkv_backward(self, dout, cache):
        """Returns dqkv (B, T, 3C), the gradient of the fused projection."""
        # forward: q, k, v = split(qkv); out = merge(attention(q, k, v))
        dout, cache = qkv_attention_grad_inputs(dout, cache)
        B, H, T, hs = cache[0].shape
        dout = dout.reshape(B, T, H, hs).transpose(0, 2, 1, 3)
        dq, dk, dv = self._attention_grads_reference(np.ascontiguousarray(dout), cache)  # dout (B, H, T, hs)
        return np.stack((dq, dk, dv)).transpose(1, 3, 0, 2, 4).reshape(B, T, 3 * H * hs)

    # ------------------------------------------------------------ cross-entropy
    def cross_entropy_forward(self, logits, targets, ignore_index=-100, out=None):
        """Mean cross-entropy of softmax(logits) against integer targets, over the tokens whose
        target is not `ignore_index`. logits (..., V >= 1), targets (...). If every target is
        ignored the loss is 0.0 and the gradient is zero. Returns (loss: float, cache).

        With `out` (a writeable C-contiguous array of the shape and dtype of logits, which may be
        `logits` itself) the gradient of the mean loss is written into it during the forward and
        the cache is `out`: the gradient needs no array of its own, and
        `cross_entropy_backward(1.0, cache)` returns `out`. `logits` is overwritten when it is `out`.
        """
        logits, t, counted = cross_entropy_inputs(logits, targets, ignore_index, out)
        V = logits.shape[-1]
        x = logits.reshape(-1, V)
        m = x.max(axis=-1)
        lse = m + np.log(np.exp(x - m[:, None]).sum(axis=-1))  # (N,)
        n = int(counted.sum())
        tc = np.where(counted, t, 0)
        nll = np.where(counted, lse - x[np.arange(len(t)), tc], 0.0)
        loss = float(nll.sum() / n) if n else 0.0
        cache = (logits, t, counted, lse, n)
        if out is None:
            return loss, cache
        out[...] = NumpyOps.cross_entropy_backward(self, 1.0, cache)  # computed before logits is overwritten
        return loss, out

    def cross_entropy_backward(self, dloss, cache):
        """Returns dlogits, shaped like logits; when the forward had `out` and dloss is 1, that
        array itself."""
        # forward: loss = sum_counted (lse - x[target]) / n
        dloss, cache = cross_entropy_grad_inputs(dloss, cache)
        if isinstance(cache, np.ndarray):  # the gradient of the mean loss, written by the forward
            return cache if dloss == 1.0 else cache * cache.dtype.type(dloss)
        logits, t, counted, lse, n = cache
        V = logits.shape[-1]
        x = logits.reshape(-1, V)
        dx = np.exp(x - lse[:, None])
        dx[np.arange(len(t)), np.where(counted, t, 0)] -= 1.0
        dx *= x.dtype.type(dloss / max(n, 1))
        dx[~counted] = 0.0  # an ignored row's gradient is 0, even where its logits are not finite
        return dx.reshape(logits.shape)

    def _cross_entropy_rows(self, x, t, ignore_index, inv_n):
        """nll (R,) float64 of logits rows x (R, V) against t (R,), and x overwritten by the
        gradient of the mean loss, (softmax(x) - onehot(t)) * inv_n (zero on ignored rows)."""
        counted = t != ignore_index
        tc = np.where(counted, t, 0)
        rows = np.arange(len(t))
        m = x.max(axis=-1, keepdims=True)
        np.subtract(x, m, out=x)
        xt = x[rows, tc]
        np.exp(x, out=x)
        total = x.sum(axis=-1)
        nll = np.where(counted, np.log(total) - xt, 0.0)
        x *= (inv_n / total)[:, None].astype(x.dtype)
        x[rows, tc] -= np.where(counted, inv_n, 0).astype(x.dtype)
        x[~counted] = 0  # an ignored row's gradient is 0, even where its logits are not finite
        return nll

    # ------------------------------------------- LM head fused with cross-entropy
    def linear_cross_entropy_forward(self, h, weight, targets, ignore_index=-100, grad=False, dweight=None,
                                     chunk_rows=None):
        """Mean cross-entropy of the LM head's logits = h @ weight.T against integer targets,
        without an (N, V) logits array: the rows go through in chunks of `chunk_rows` (default
        `head_chunk_rows`); one GEMM makes a chunk's logits, which become its loss and, in the
        same place, its gradient while they are in cache, and with grad=True two more GEMMs
        consume that gradient at once into dh and the (accumulated) dweight.

        h (..., C), weight (V, C), targets (...): ignore_index and the mean over counted tokens
        as in `cross_entropy_forward`. With grad=True the cache is (dh (..., C), dweight (V, C))
        of the mean loss, dweight written into `dweight` when given (a gradient buffer);
        `linear_cross_entropy_backward(dloss, cache)` returns them. With grad=False (an
        evaluation) the cache is None. Returns (loss: float, cache).
        """
        h, w, t, counted = linear_cross_entropy_inputs(h, weight, targets, ignore_index, grad, dweight)
        h2 = h.reshape(-1, h.shape[-1])  # (N, C)
        N, V = h2.shape[0], w.shape[0]
        n = int(counted.sum())
        inv_n = h2.dtype.type(1.0 / max(n, 1))
        rows = head_chunk_rows(V, h2.dtype) if chunk_rows is None else check_int("chunk_rows", chunk_rows)
        starts = list(range(0, N, rows))
        nll = np.zeros(N, np.float64)
        dh = np.empty_like(h2) if grad else None  # (N, C)
        dw = (np.zeros_like(w) if dweight is None else dweight) if grad else None  # (V, C)
        if grad and N == 0:
            dw[...] = 0
        # the chunks in contiguous groups, one per thread of _run_tasks; each group but the first
        # sums its share of dweight in an array of its own, added in at the end (so dweight's
        # last bits depend on the thread count, as a threaded GEMM's may)
        workers = max(1, min(self._task_threads(), len(starts)))
        groups = [g.tolist() for g in np.array_split(np.array(starts, np.int64), workers)]
        parts = [dw] + [np.empty_like(w) for _ in groups[1:]] if grad else [None] * workers
        self._run_tasks([(self._head_chunks, (h2, w, t, ignore_index, inv_n, rows, group, nll, dh, part))
                         for group, part in zip(groups, parts)])
        for part in parts[1:] if grad else ():
            dw += part
        loss = float(nll.sum() / n) if n else 0.0
        return loss, ((dh.reshape(h.shape), dw) if grad else None)

    def _head_chunks(self, h2, w, t, ignore_index, inv_n, rows, starts, nll, dh, dw):
        """The chunks of `linear_cross_entropy_forward` beginning at `starts`, one after
        another: nll[rows] and, when dh is given, dh[rows] and dw (overwritten, then summed
        over the chunks)."""
        N, V = h2.shape[0], w.shape[0]
        buf = np.empty((max(1, min(rows, N)), V), h2.dtype)  # (R, V): a chunk's logits, then their gradient
        part = np.empty_like(w) if dh is not None and len(starts) > 1 else None
        for i, s in enumerate(starts):
            e = min(N, s + rows)
            x = np.matmul(h2[s:e], w.T, out=buf[:e - s])  # logits of rows s..e
            nll[s:e] = self._cross_entropy_rows(x, t[s:e], ignore_index, inv_n)  # x is now dlogits
            if dh is not None:
                # logits = h @ w.T  ->  dh = dlogits @ w, dw = sum over the chunks of dlogits^T @ h
                np.matmul(x, w, out=dh[s:e])
                np.matmul(x.T, h2[s:e], out=dw if i == 0 else part)
                if i:
                    dw += part

    def linear_cross_entropy_backward(self, dloss, cache):
        """Returns (dh, dweight) of `linear_cross_entropy_forward(..., grad=True)` scaled by
        dloss: the forward's arrays themselves when dloss is 1."""
        # forward: loss = sum_counted (lse(h @ w.T) - (h @ w.T)[target]) / n
        dloss, (dh, dw) = linear_cross_entropy_grad_inputs(dloss, cache)
        if dloss != 1.0:
            dh *= dh.dtype.type(dloss)
            dw *= dw.dtype.type(dloss)
        return dh, dw

    # --------------------------------------------------------------------- GELU
    def gelu_forward(self, x, bias=None, approximate="tanh"):
        """y = gelu(x + bias). `approximate` is "tanh" (GPT-2) or "none" (exact erf, as
        torch.nn.functional.gelu). Returns (y, GeluCache)."""
        x, bias = gelu_inputs(x, bias, approximate)
        b = np.zeros(x.shape[-1], x.dtype) if bias is None else bias
        u = x + b
        if approximate == "tanh":
            y = 0.5 * u * (1.0 + np.tanh(_SQRT_2_OVER_PI * (u + 0.044715 * u ** 3)))
        else:
            y = 0.5 * u * (1.0 + _erf(u / math.sqrt(2.0)).astype(u.dtype))
        return y.astype(u.dtype), GeluCache(x, b, approximate, bias is not None)

    def gelu_backward(self, dy, cache):
        """Returns (dx, dbias); dbias is None when the forward had no bias."""
        dy, (x, b, approximate, has_bias) = gelu_grad_inputs(dy, cache)
        u = x + b
        if approximate == "tanh":
            # forward: y = 0.5 * u * (1 + tanh(a * (u + 0.044715 u^3)))
            th = np.tanh(_SQRT_2_OVER_PI * (u + 0.044715 * u ** 3))
            dth = (1.0 - th * th) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * u * u)
            dydu = 0.5 * (1.0 + th) + 0.5 * u * dth
        else:
            # forward: y = 0.5 * u * (1 + erf(u / sqrt(2)))
            cdf = 0.5 * (1.0 + _erf(u / math.sqrt(2.0)).astype(u.dtype))
            dydu = cdf + u * np.exp(-0.5 * u * u) / math.sqrt(2.0 * math.pi)
        dx = (dy * dydu).astype(u.dtype)
        dbias = dx.reshape(-1, u.shape[-1]).sum(axis=0) if has_bias else None
        return dx, dbias

    # --------------------------------------------------------------------- ReLU
    def relu_forward(self, x, bias=None):
        """y = max(x + bias, 0), the signature of `gelu_forward` without its form. Returns (y, ReluCache)."""
        u, bias = activation_inputs(x, bias)
        if bias is not None:
            u = u + bias
        y = np.maximum(u, 0).astype(u.dtype)
        return y, ReluCache(y, bias is not None)

    def relu_backward(self, dy, cache):
        """Returns (dx, dbias); dbias is None when the forward had no bias."""
        dy, (y, has_bias) = relu_grad_inputs(dy, cache)
        # forward: y = max(u, 0) with u = x + bias  ->  dx = dy where u > 0, dbias = sum over rows of dx
        dx = np.where(y > 0, dy, 0).astype(dy.dtype)
        return dx, (dx.reshape(-1, dx.shape[-1]).sum(axis=0) if has_bias else None)

    # ---------------------------------------------------------------- embedding
    def embedding_forward(self, weight, ids):
        """Gather rows: out[..., :] = weight[ids[...], :] for weight (V, C). Returns (out, cache)."""
        weight, ids = embedding_inputs(weight, ids)
        return weight[ids], (ids, weight.shape, weight.dtype)

    def embedding_backward(self, dout, cache, dweight=None):
        """Scatter-add of `dout` into the rows named by the forward's ids. When `dweight` is
        given the gradient is added into it in place (for tied weights); returns dweight."""
        # forward: out = weight[ids]
        dout, ids, shape, dtype = embedding_grad_inputs(dout, cache, dweight)
        if dweight is None:
            dweight = np.zeros(shape, dtype=dtype)
        np.add.at(dweight, ids.reshape(-1), dout.reshape(-1, shape[1]))
        return dweight

    # -------------------------------------------------------------------- AdamW
    def adamw_update(self, param, grad, m, v, *, lr, beta1=0.9, beta2=0.999, eps=1e-8,
                     weight_decay=0.0, step=1):
        """One AdamW step in place on `param`, `m` and `v` (same shape and dtype as `grad`).

        As torch.optim.AdamW: p *= 1 - lr * wd; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
        p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps). `step` t counts from 1.
        """
        step = adamw_inputs(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step)
        bc1 = 1.0 - beta1 ** step
        bc2 = 1.0 - beta2 ** step
        param *= param.dtype.type(1.0 - lr * weight_decay)
        m *= beta1
        m += (1.0 - beta1) * grad
        v *= beta2
        v += (1.0 - beta2) * (grad * grad)
        param -= (lr / bc1) * m / (np.sqrt(v / bc2) + eps)
