"""The decoder-only language model: GPT-2's architecture and parameter names, forward and
hand-written backward on the kernel interface.

    x = wte[ids] + wpe[:T]                      # (B, T, C)
    for each block:  x = x + proj(attn(ln_1(x)))  ;  x = x + mlp(ln_2(x))
    logits = ln_f(x) @ wte.T                    # (B, T, V)  (lm_head.weight when untied)

Each residual add is fused with the layernorm that reads it (`residual_layernorm_forward`), so a
block's activations are: LN output, QKV, attention output, MLP hidden, in the order llm.c keeps.
Weights are stored (in, out) as in Hugging Face's GPT-2 (Conv1D), so state dicts interchange.
"""

import math

import numpy as np

from fastformer.kernels import get_ops
from fastformer.kernels.numpy_ops import GPT2_LAYER_PARAMS, PackedGPT2
from fastformer.models.config import LMConfig
from fastformer.nn.layers import dropout_backward, dropout_forward, linear_backward, linear_forward
from fastformer.nn.params import FlatModel, FlatParams, aligned_zeros


class KVCache:
    """Keys and values of every layer for the tokens decoded so far, so that each new token costs
    one O(T) attention per layer instead of a forward over the whole sequence.

    k, v: (L, B, H, Tmax, hs); padding: (B, Tmax) True at padded prompt positions; length: the
    number of positions filled.
    """

    def __init__(self, config, batch_size, dtype=np.float32):
        L, H, Tmax = config.n_layers, config.n_heads, config.max_seq_len
        shape = (L, batch_size, H, Tmax, config.d_model // H)
        self.k = aligned_zeros(shape, dtype)
        self.v = aligned_zeros(shape, dtype)
        self.padding = np.zeros((batch_size, Tmax), dtype=bool)
        self.length = 0


class TransformerLM(FlatModel):
    """GPT-2-architecture language model on NumPy arrays.

    Args:
        config: an LMConfig.
        seed: seeds the weight initialisation and the dropout generator (`self.rng`).
        dtype: np.float32 (default) or np.float64 (for gradient checks).

    Parameters are views into one flat buffer (`self.flat.data`); gradients are views into
    another (`self.flat.grad`), overwritten by every `loss_and_grads` call.
    """

    def __init__(self, config, seed=0, dtype=np.float32):
        if not isinstance(config, LMConfig):
            raise ValueError(f"config must be an LMConfig, got {type(config).__name__}")
        if np.dtype(dtype) not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {np.dtype(dtype)}")
        self.config = config
        shapes = self._param_shapes()
        decay = {n for n, s in shapes.items() if len(s) == 2 and n != "transformer.wpe.weight"}
        self.flat = FlatParams(shapes, decay, dtype)
        self.params = self.flat.params
        self.grads = self.flat.grads
        init_seq, dropout_seq = np.random.SeedSequence(seed).spawn(2)
        self.rng = np.random.default_rng(dropout_seq)  # dropout masks; saved with checkpoints
        self._init_weights(np.random.default_rng(init_seq))
        self._scratch = {}  # name -> array kept across training steps (see `_scratch_array`)
        self._decode_offsets = None  # made by `_packed_weights` at the first decoding step

    # ------------------------------------------------------------ parameters
    def _param_shapes(self):
        c = self.config
        C, F = c.d_model, c.d_ff
        shapes = {"transformer.wte.weight": (c.vocab_size, C),
                  "transformer.wpe.weight": (c.max_seq_len, C)}
        for i in range(c.n_layers):
            p = f"transformer.h.{i}."
            shapes.update({
                p + "ln_1.weight": (C,), p + "ln_1.bias": (C,),
                p + "attn.c_attn.weight": (C, 3 * C), p + "attn.c_attn.bias": (3 * C,),
                p + "attn.c_proj.weight": (C, C), p + "attn.c_proj.bias": (C,),
                p + "ln_2.weight": (C,), p + "ln_2.bias": (C,),
                p + "mlp.c_fc.weight": (C, F), p + "mlp.c_fc.bias": (F,),
                p + "mlp.c_proj.weight": (F, C), p + "mlp.c_proj.bias": (C,),
            })
        shapes.update({"transformer.ln_f.weight": (C,), "transformer.ln_f.bias": (C,)})
        if not c.tie_embeddings:
            shapes["lm_head.weight"] = (c.vocab_size, C)
        return shapes

    def _init_weights(self, rng):
        # GPT-2: normal(0, 0.02) weights, zero biases, unit LN gains; the projections that write
        # into the residual stream are scaled by 1/sqrt(2 L) so its variance does not grow with depth.
        proj_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, p in self.params.items():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name == "transformer.ln_f.weight":
                p[...] = 1.0
            elif p.ndim == 1:
                p[...] = 0.0
            else:
                std = proj_std if name.endswith("c_proj.weight") else 0.02
                p[...] = rng.normal(0.0, std, size=p.shape)

    @property
    def head_name(self):
        return "transformer.wte.weight" if self.config.tie_embeddings else "lm_head.weight"

    # ---------------------------------------------------------------- checks
    def _check_inputs(self, ids, attention_mask):
        ids = np.asarray(ids)
        if ids.dtype.kind not in "iu":
            raise ValueError(f"ids must be an integer array, got dtype {ids.dtype}")
        if ids.ndim not in (1, 2):
            raise ValueError(f"ids must have shape (B, T) or (T,), got {ids.shape}")
        ids2 = ids.reshape(-1, ids.shape[-1]) if ids.ndim == 1 else ids
        B, T = ids2.shape
        V, Tmax = self.config.vocab_size, self.config.max_seq_len
        if T < 1 or T > Tmax:
            raise ValueError(f"sequence length T={T} is not allowed: ids need 1 <= T <= max_seq_len={Tmax}")
        if ids2.size and (ids2.min() < 0 or ids2.max() >= V):
            bad = ids2[(ids2 < 0) | (ids2 >= V)][0]
            raise ValueError(f"ids must lie in [0, vocab_size={V}), got {bad}")
        kpm = None
        if attention_mask is not None:
            mask = np.asarray(attention_mask)
            if mask.shape != ids.shape:
                raise ValueError(f"attention_mask must have the shape of ids {ids.shape}, got {mask.shape}")
            if not ((mask == 0) | (mask == 1)).all():
                raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
            kpm = mask.reshape(B, T) == 0  # (B, T) True at padding
        return ids2.astype(np.int64, copy=False), kpm

    def _scratch_array(self, name, shape):
        """An array of the model's dtype kept across calls and made anew only when `shape`
        changes, for a step's (B, T, V) logits: the largest array of a step, written and read
        once, never handed to the caller."""
        a = self._scratch.get(name)
        if a is None or a.shape != shape:
            a = self._scratch[name] = np.empty(shape, self.flat.dtype)
        return a

    # --------------------------------------------------------------- forward
    def _forward(self, ids, kpm, train, positions=None, kv=None, logits_out=None):
        """Logits (B, T, V) and the caches the backward needs. `positions` (B, T) default to
        0..T-1; with a KVCache `kv` the tokens extend the cached sequence (inference only).
        The logits are written into `logits_out` (B, T, V) when it is given."""
        ops, P, cfg = get_ops(), self.params, self.config
        B, T = ids.shape
        drop = cfg.dropout if train else 0.0
        wpe = P["transformer.wpe.weight"]
        tok, emb_cache = ops.embedding_forward(P["transformer.wte.weight"], ids)  # (B, T, C)
        x, emb_mask = dropout_forward(tok + (wpe[:T] if positions is None else wpe[positions]), drop, self.rng)
        if kv is not None:
            kv.padding[:, kv.length:kv.length + T] = False if kpm is None else kpm
        h, ln_cache = ops.layernorm_forward(x, P["transformer.h.0.ln_1.weight"], P["transformer.h.0.ln_1.bias"])
        blocks = []
        for i in range(cfg.n_layers):
            p = f"transformer.h.{i}."
            nxt = f"transformer.h.{i + 1}.ln_1" if i + 1 < cfg.n_layers else "transformer.ln_f"
            # attention: LN -> fused QKV -> causal multi-head attention -> projection -> residual
            qkv, qkv_c = linear_forward(h, P[p + "attn.c_attn.weight"], P[p + "attn.c_attn.bias"])  # (B, T, 3C)
            if kv is None:
                a, att_c = ops.attention_qkv_forward(qkv, cfg.n_heads, causal=True, key_padding_mask=kpm)  # (B, T, C)
            else:
                a, att_c = ops.attention_cached(qkv, kv.k[i], kv.v[i], kv.length, cfg.n_heads, kv.padding), None
            o, proj_c = linear_forward(a, P[p + "attn.c_proj.weight"], P[p + "attn.c_proj.bias"])
            o, o_mask = dropout_forward(o, drop, self.rng)
            (x, h), ln2_c = ops.residual_layernorm_forward(x, o, P[p + "ln_2.weight"], P[p + "ln_2.bias"])
            # MLP: LN -> Linear (bias fused into GELU) -> GELU(tanh) -> Linear -> residual
            f, fc_c = linear_forward(h, P[p + "mlp.c_fc.weight"])  # (B, T, F)
            g, gelu_c = ops.gelu_forward(f, P[p + "mlp.c_fc.bias"], approximate="tanh")
            m, mproj_c = linear_forward(g, P[p + "mlp.c_proj.weight"], P[p + "mlp.c_proj.bias"])
            m, m_mask = dropout_forward(m, drop, self.rng)
            (x, h), lnn_c = ops.residual_layernorm_forward(x, m, P[nxt + ".weight"], P[nxt + ".bias"])
            blocks.append((qkv_c, att_c, proj_c, o_mask, ln2_c, fc_c, gelu_c, mproj_c, m_mask, lnn_c, nxt))
        logits, head_c = linear_forward(h, P[self.head_name].T, out=logits_out)  # (B, T, V)
        if kv is not None:
            kv.length += T
        return logits, (emb_cache, emb_mask, ln_cache, blocks, head_c)

    def forward(self, ids, attention_mask=None, position_ids=None):
        """Logits (B, T, V) for integer ids (B, T) -- or (T, V) for ids (T,) -- in inference
        mode (no dropout). `attention_mask` (like ids) is 1 for tokens and 0 for padding;
        padding keys are never attended to. `position_ids` (like ids) default to 0..T-1."""
        ids2, kpm = self._check_inputs(ids, attention_mask)
        logits, _ = self._forward(ids2, kpm, train=False, positions=self._check_positions(position_ids, ids2.shape))
        return logits if np.ndim(ids) == 2 else logits[0]

    def new_cache(self, batch_size):
        """An empty KVCache for decoding `batch_size` sequences with `decode`."""
        return KVCache(self.config, batch_size, self.flat.dtype)

    def decode(self, ids, cache, attention_mask=None, position_ids=None):
        """Logits (B, T, V) of new tokens ids (B, T) that continue the sequences held in `cache`
        (a `new_cache(B)`), whose keys and values are appended to it. The first call passes the
        prompt, each later call the tokens just chosen. position_ids default to the cache's next
        positions."""
        ids2, kpm = self._check_inputs(ids, attention_mask)
        B, T = ids2.shape
        if cache.k.shape[1] != B:
            raise ValueError(f"ids have batch size {B} but the cache was made for {cache.k.shape[1]}")
        if cache.length + T > self.config.max_seq_len:
            raise ValueError(f"the cache holds {cache.length} positions; {T} more exceed max_seq_len="
                             f"{self.config.max_seq_len}")
        positions = self._check_positions(position_ids, (B, T))
        if positions is None:
            positions = np.broadcast_to(np.arange(cache.length, cache.length + T), (B, T))
        if T > 1:  # a prompt: the composed forward, whose matrix products batch over its tokens
            logits, _ = self._forward(ids2, kpm, train=False, positions=positions, kv=cache)
            return logits
        # one token a row, the step generation repeats: the whole model in one fused kernel call
        cache.padding[:, cache.length] = False if kpm is None else kpm[:, 0]
        logits = get_ops().gpt2_decode_step(self._packed_weights(), ids2[:, 0], positions[:, 0], cache.k, cache.v,
                                            cache.padding, cache.length)
        cache.length += 1
        return logits[:, None]

    def _packed_weights(self):
        """The parameters as ops.gpt2_decode_step takes them: the flat buffer and where each
        parameter starts in it (the offsets are computed once; the buffer is read in place)."""
        if self._decode_offsets is None:
            names = [f"transformer.h.{i}.{n}" for i in range(self.config.n_layers) for n in GPT2_LAYER_PARAMS]
            names += ["transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
                      "transformer.ln_f.bias", self.head_name]
            self._decode_offsets = np.array([self.flat.offsets[n] for n in names], dtype=np.int64)
        return PackedGPT2(self.flat.data, self._decode_offsets, self.config.vocab_size, self.config.d_ff)

    def _check_positions(self, position_ids, shape):
        if position_ids is None:
            return None
        pos = np.asarray(position_ids)
        Tmax = self.config.max_seq_len
        if pos.dtype.kind not in "iu" or pos.size != math.prod(shape):
            raise ValueError(f"position_ids must be an integer array like ids {shape}, got {pos.dtype} {pos.shape}")
        if pos.size and (pos.min() < 0 or pos.max() >= Tmax):
            raise ValueError(f"position_ids must lie in [0, max_seq_len={Tmax}), got {pos.min()}..{pos.max()}")
        return pos.reshape(shape)

    __call__ = forward

    def loss(self, ids, targets, attention_mask=None):
        """Mean cross-entropy over targets != -100, in inference mode; no gradients."""
        ids2, kpm = self._check_inputs(ids, attention_mask)
        targets = self._check_targets(targets, ids2.shape)
        logits = self._scratch_array("logits", (*ids2.shape, self.config.vocab_size))
        self._forward(ids2, kpm, train=False, logits_out=logits)
        loss, _ = get_ops().cross_entropy_forward(logits, targets, out=logits)
        return loss

    def _check_targets(self, targets, shape):
        targets = np.asarray(targets)
        if targets.dtype.kind not in "iu":
            raise ValueError(f"targets must be an integer array, got dtype {targets.dtype}")
        if targets.size != int(np.prod(shape)):
            raise ValueError(f"targets must have the shape of ids {shape}, got {targets.shape}")
        return targets.reshape(shape)

    # -------------------------------------------------------------- backward
    def loss_and_grads(self, ids, targets, attention_mask=None):
        """Training step math: mean cross-entropy of next-token `targets` (like ids; -100 is
        ignored) and the gradient of every parameter. Dropout is on when config.dropout > 0.

        Returns (loss: float, grads: {name: array}); grads are views into `self.flat.grad`,
        shaped like `state_dict()`, and are overwritten by the next call.
        """
        ops, G, cfg = get_ops(), self.grads, self.config
        ids2, kpm = self._check_inputs(ids, attention_mask)
        targets = self._check_targets(targets, ids2.shape)
        B, T = ids2.shape
        logits = self._scratch_array("logits", (B, T, cfg.vocab_size))
        _, (emb_cache, emb_mask, ln_cache, blocks, head_c) = self._forward(ids2, kpm, train=True, logits_out=logits)
        loss, ce_cache = ops.cross_entropy_forward(logits, targets, out=logits)  # the gradient overwrites the logits

        dlogits = ops.cross_entropy_backward(1.0, ce_cache)  # (B, T, V), the logits' buffer
        # logits = h @ W_head.T  ->  dW_head = dlogits^T @ h, dh = dlogits @ W_head
        h2, head_t = head_c
        d2 = dlogits.reshape(-1, cfg.vocab_size)  # (B*T, V)
        np.matmul(d2.T, h2, out=G[self.head_name])
        dh = np.matmul(d2, head_t.T).reshape(B, T, cfg.d_model)
        ds = None  # gradient flowing along the residual stream
        for i in reversed(range(cfg.n_layers)):
            p = f"transformer.h.{i}."
            qkv_c, att_c, proj_c, o_mask, ln2_c, fc_c, gelu_c, mproj_c, m_mask, lnn_c, nxt = blocks[i]
            # (x, h) = residual_layernorm(x, m) with the next block's ln_1 (or ln_f)
            ds, G[nxt + ".weight"][...], G[nxt + ".bias"][...] = ops.residual_layernorm_backward(dh, ds, lnn_c)
            dg = linear_backward(dropout_backward(ds, m_mask), mproj_c,
                                 G[p + "mlp.c_proj.weight"], G[p + "mlp.c_proj.bias"])
            df, G[p + "mlp.c_fc.bias"][...] = ops.gelu_backward(dg, gelu_c)
            dh = linear_backward(df, fc_c, G[p + "mlp.c_fc.weight"])
            # (x, h) = residual_layernorm(x, o) with ln_2
            ds, G[p + "ln_2.weight"][...], G[p + "ln_2.bias"][...] = ops.residual_layernorm_backward(dh, ds, ln2_c)
            da = linear_backward(dropout_backward(ds, o_mask), proj_c,
                                 G[p + "attn.c_proj.weight"], G[p + "attn.c_proj.bias"])
            dqkv = ops.attention_qkv_backward(da, att_c)  # (B, T, 3C)
            dh = linear_backward(dqkv, qkv_c, G[p + "attn.c_attn.weight"], G[p + "attn.c_attn.bias"])
        dx, G["transformer.h.0.ln_1.weight"][...], G["transformer.h.0.ln_1.bias"][...] = \
            ops.layernorm_backward(dh, ln_cache)
        dx = dropout_backward(dx + ds, emb_mask)  # (B, T, C)
        G["transformer.wpe.weight"][...] = 0.0
        dx.sum(axis=0, out=G["transformer.wpe.weight"][:T])
        if not cfg.tie_embeddings:
            G["transformer.wte.weight"][...] = 0.0
        ops.embedding_backward(dx, emb_cache, dweight=G["transformer.wte.weight"])
        return loss, self.grads

    # ------------------------------------------------------------ interchange
    @classmethod
    def from_pretrained(cls, path, seed=0, dtype=np.float32):
        """Load a local Hugging Face GPT-2 directory (config.json + model.safetensors)."""
        from fastformer.models.hf import read_hf

        config, state = read_hf(path, dtype)
        model = cls(config, seed=seed, dtype=dtype)
        model.load_state_dict(state)
        return model

    # ------------------------------------------------------------ generation
    def generate(self, prompt_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None, seed=None,
                 eos_id=None, **kwargs):
        """Prompt plus up to max_new_tokens sampled ids: (T0,) -> (T0 + n,) or (B, T0) -> (B, T0 + n),
        with a key/value cache. temperature 0 is greedy; see fastformer.generate.generate for
        top_k, top_p, seed, eos_id and the other options (repetition_penalty, attention_mask,
        prompts of different lengths, use_cache)."""
        from fastformer.generation.sampling import generate

        return generate(self, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, seed=seed, eos_id=eos_id, **kwargs)
