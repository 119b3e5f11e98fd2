"""The encoder-decoder Transformer ("Attention Is All You Need" shape) on the kernel interface:
forward, hand-written backward, and incremental decoding with cached keys and values.

    x = src_embed[src] * sqrt(C) + pos[:S]            # (B, S, C)
    encoder layer:  x = x + self_attn(norm1(x))  ;  x = x + ff(norm2(x))
    memory = encoder.norm(x)                          # (B, S, C)
    y = tgt_embed[tgt_in] * sqrt(C) + pos[:T]         # (B, T, C)
    decoder layer:  y = y + causal_self_attn(norm1(y)) ; y = y + cross_attn(norm2(y), memory)
                    y = y + ff(norm3(y))
    logits = decoder.norm(y) @ tgt_embed.T            # (B, T, V)  (lm_head.weight when untied)

That is the pre-LN order (`norm_first=True`); with `norm_first=False` each sublayer is
`x = norm(x + branch(x))` instead, as in the original paper. The layer parameters carry the names
and shapes of `torch.nn.Transformer` (linear weights stored (out, in), fused `in_proj_weight`
holding q, k, v rows), so `fastformer.interop` maps a state dict with a prefix and no reshaping.

Every residual add is fused with the layernorm that reads it (`residual_layernorm_forward`), as in
the decoder-only model; a stack of layers is a list of sublayer "steps" (kind, layer, norm) run
in order, and the backward walks the same list in reverse.
"""

import math

import numpy as np

from fastformer.kernels import get_ops
from fastformer.models.config import Seq2SeqConfig
from fastformer.nn.layers import (
    dropout_backward,
    dropout_forward,
    linear_backward,
    linear_forward,
    merge_heads,
    split_heads,
)
from fastformer.nn.params import FlatModel, FlatParams


def sinusoidal_table(n_positions, C, dtype=np.float32):
    """The fixed position table of the original paper: pe[t, 2i] = sin(t / 10000^(2i/C)),
    pe[t, 2i+1] = cos(t / 10000^(2i/C)). Returns (n_positions, C)."""
    t = np.arange(n_positions, dtype=np.float64)[:, None]  # (N, 1)
    inv_freq = 10000.0 ** (-np.arange(0, C, 2, dtype=np.float64) / C)  # (C/2,)
    pe = np.zeros((n_positions, C))
    pe[:, 0::2] = np.sin(t * inv_freq)
    pe[:, 1::2] = np.cos(t * inv_freq)
    return pe.astype(dtype)


class DecoderState:
    """What incremental decoding keeps between steps: per decoder layer the self-attention keys
    and values of the tokens fed so far (buffers (N, H, max_len, hs), filled up to `pos`), the
    cross-attention keys and values of the encoder output (computed once), and the source
    padding mask."""

    def __init__(self, self_kv, cross_kv, src_kpm, pos=0):
        self.self_kv = self_kv  # [(k, v)] per layer, each (N, H, max_len, hs)
        self.cross_kv = cross_kv  # [(k, v, cache)] per layer, each (N, H, S, hs)
        self.src_kpm = src_kpm  # (N, S) True at source padding, or None
        self.pos = pos  # number of target positions already in the cache

    def reorder(self, rows):
        """Keep rows `rows` (N,) of the self-attention cache (beam search: each beam continues
        from its parent). Rows must come from the same source, so the cross-attention keys and
        values and the source mask, equal within a source, stay as they are."""
        for k, v in self.self_kv:
            k[:, :, :self.pos] = k[rows, :, :self.pos]
            v[:, :, :self.pos] = v[rows, :, :self.pos]


class Seq2SeqTransformer(FlatModel):
    """Encoder-decoder Transformer on NumPy arrays.

    Args:
        config: a Seq2SeqConfig.
        seed: seeds the weight initialisation and the dropout generator (`self.rng`).
        dtype: np.float32 (default) or np.float64 (for gradient checks).

    Parameters are views into one flat buffer (`self.flat.data`), gradients views into another
    (`self.flat.grad`), overwritten by every `loss_and_grads` call. Masks are 1 for tokens and
    0 for padding, shaped like the ids they describe; None means no padding.
    """

    def __init__(self, config, seed=0, dtype=np.float32):
        if not isinstance(config, Seq2SeqConfig):
            raise ValueError(f"config must be a Seq2SeqConfig, got {type(config).__name__}")
        if np.dtype(dtype) not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {np.dtype(dtype)}")
        self.config = config
        shapes = self._param_shapes()
        decay = {n for n, s in shapes.items() if len(s) == 2 and "pos_embed" not in n}
        self.flat = FlatParams(shapes, decay, dtype)
        self.params = self.flat.params
        self.grads = self.flat.grads
        init_seq, dropout_seq = np.random.SeedSequence(seed).spawn(2)
        self.rng = np.random.default_rng(dropout_seq)  # dropout masks; saved with checkpoints
        self._init_weights(np.random.default_rng(init_seq))
        self.pos_table = None  # (max(S, T), C) when positions are sinusoidal
        if config.positional == "sinusoidal":
            self.pos_table = sinusoidal_table(max(config.max_src_len, config.max_tgt_len),
                                              config.d_model, dtype)

    # ------------------------------------------------------------ parameters
    def _param_shapes(self):
        c = self.config
        C, F = c.d_model, c.d_ff

        def attn(p):
            return {p + "in_proj_weight": (3 * C, C), p + "in_proj_bias": (3 * C,),
                    p + "out_proj.weight": (C, C), p + "out_proj.bias": (C,)}

        def norm(p):
            return {p + ".weight": (C,), p + ".bias": (C,)}

        def ff(p):
            return {p + "linear1.weight": (F, C), p + "linear1.bias": (F,),
                    p + "linear2.weight": (C, F), p + "linear2.bias": (C,)}

        shapes = {"src_embed.weight": (c.src_vocab_size, C), "tgt_embed.weight": (c.tgt_vocab_size, C)}
        if c.positional == "learned":
            shapes.update({"src_pos_embed.weight": (c.max_src_len, C),
                           "tgt_pos_embed.weight": (c.max_tgt_len, C)})
        for i in range(c.n_encoder_layers):
            p = f"encoder.layers.{i}."
            shapes.update({**attn(p + "self_attn."), **ff(p), **norm(p + "norm1"), **norm(p + "norm2")})
        shapes.update(norm("encoder.norm"))
        for i in range(c.n_decoder_layers):
            p = f"decoder.layers.{i}."
            shapes.update({**attn(p + "self_attn."), **attn(p + "multihead_attn."), **ff(p),
                           **norm(p + "norm1"), **norm(p + "norm2"), **norm(p + "norm3")})
        shapes.update(norm("decoder.norm"))
        if not c.tie_embeddings:
            shapes["lm_head.weight"] = (c.tgt_vocab_size, C)
        return shapes

    def _init_weights(self, rng):
        # Layer matrices: Xavier-uniform, as torch.nn.Transformer._reset_parameters; biases 0,
        # LN gains 1. Token embeddings N(0, 1/C): times sqrt(C) in the forward they have unit
        # scale, and as the tied output projection they give unit-scale logits. Learned
        # positions start at the scale of the sinusoidal table (rms 1/sqrt(2)).
        C = self.config.d_model
        for name, p in self.params.items():
            if name.endswith("_embed.weight") or name == "lm_head.weight":
                std = math.sqrt(0.5) if "pos_embed" in name else 1.0 / math.sqrt(C)
                p[...] = rng.normal(0.0, std, size=p.shape)
            elif p.ndim == 2:
                bound = math.sqrt(6.0 / (p.shape[0] + p.shape[1]))
                p[...] = rng.uniform(-bound, bound, size=p.shape)
            elif ".norm" in name and name.endswith(".weight"):
                p[...] = 1.0
            else:
                p[...] = 0.0

    @property
    def head_name(self):
        return "tgt_embed.weight" if self.config.tie_embeddings else "lm_head.weight"

    # ---------------------------------------------------------------- checks
    @staticmethod
    def _check_ids(ids, name, vocab_size, max_len, max_name):
        ids = np.asarray(ids)
        if ids.dtype.kind not in "iu":
            raise ValueError(f"{name} must be an integer array, got dtype {ids.dtype}")
        if ids.ndim != 2:
            raise ValueError(f"{name} must have shape (B, length), got {ids.shape}")
        if ids.shape[0] < 1 or not 1 <= ids.shape[1] <= max_len:
            raise ValueError(f"{name} has shape {ids.shape}: need B >= 1 and 1 <= length <= "
                             f"{max_name}={max_len}")
        if ids.min() < 0 or ids.max() >= vocab_size:
            bad = ids[(ids < 0) | (ids >= vocab_size)][0]
            raise ValueError(f"{name} must lie in [0, {vocab_size}), got {bad}")
        return ids.astype(np.int64, copy=False)

    @staticmethod
    def _check_mask(mask, name, shape):
        """Key-padding mask (True at padding) from a 1/0 token mask, or None."""
        if mask is None:
            return None
        mask = np.asarray(mask)
        if mask.shape != shape:
            raise ValueError(f"{name} must have the shape of its ids {shape}, got {mask.shape}")
        if not np.isin(mask, (0, 1)).all():
            raise ValueError(f"{name} must hold only 0 (padding) and 1 (token)")
        return mask == 0

    def _check_inputs(self, src_ids, src_mask, tgt_in, tgt_mask):
        c = self.config
        src = self._check_ids(src_ids, "src_ids", c.src_vocab_size, c.max_src_len, "max_src_len")
        tgt = self._check_ids(tgt_in, "tgt_in", c.tgt_vocab_size, c.max_tgt_len, "max_tgt_len")
        if src.shape[0] != tgt.shape[0]:
            raise ValueError(f"src_ids and tgt_in need the same batch size, got {src.shape[0]} and {tgt.shape[0]}")
        return (src, self._check_mask(src_mask, "src_mask", src.shape),
                tgt, self._check_mask(tgt_mask, "tgt_mask", tgt.shape))

    @staticmethod
    def _check_targets(targets, shape):
        targets = np.asarray(targets)
        if targets.dtype.kind not in "iu":
            raise ValueError(f"targets must be an integer array, got dtype {targets.dtype}")
        if targets.shape != shape:
            raise ValueError(f"targets must have the shape of tgt_in {shape}, got {targets.shape}")
        return targets

    # ------------------------------------------------------------ embeddings
    def _embed_forward(self, ids, side, start, train):
        """tok_embed[ids] * sqrt(C) + positions[start:start + L] for side "src" or "tgt"."""
        ops, P, C = get_ops(), self.params, self.config.d_model
        L = ids.shape[1]
        tok, emb_c = ops.embedding_forward(P[side + "_embed.weight"], ids)  # (B, L, C)
        pos = (self.pos_table if self.pos_table is not None else P[side + "_pos_embed.weight"])[start:start + L]
        x = tok * tok.dtype.type(math.sqrt(C)) + pos  # (B, L, C)
        x, mask = dropout_forward(x, self.config.dropout if train else 0.0, self.rng)
        return x, (emb_c, mask, L)

    def _embed_backward(self, dx, cache, side):
        """Writes the position grads; adds the token-embedding grads into the gradient buffer
        (the caller zeroes it first unless the head already wrote there)."""
        # forward: x = tok_embed[ids] * sqrt(C) + pos[:L]
        emb_c, mask, L = cache
        dx = dropout_backward(dx, mask)
        if self.pos_table is None:
            dpos = self.grads[side + "_pos_embed.weight"]
            dpos[...] = 0.0
            dx.sum(axis=0, out=dpos[:L])
        get_ops().embedding_backward(dx * dx.dtype.type(math.sqrt(self.config.d_model)), emb_c,
                                     dweight=self.grads[side + "_embed.weight"])

    # ------------------------------------------------------------- sublayers
    def _self_attn_forward(self, h, p, kpm, causal, kv=None, pos=0):
        """Multi-head self-attention of h (B, T, C). With `kv` (the decoding cache buffers) the
        new keys/values are written at [pos, pos + T) and the queries attend to all of [0, pos + T)."""
        ops, P, H = get_ops(), self.params, self.config.n_heads
        qkv, qkv_c = linear_forward(h, P[p + "in_proj_weight"].T, P[p + "in_proj_bias"])  # (B, T, 3C)
        q, k, v = split_heads(qkv, 3, H)  # each (B, H, T, hs)
        if kv is not None:
            T = q.shape[2]
            kv[0][:, :, pos:pos + T], kv[1][:, :, pos:pos + T] = k, v
            k, v = kv[0][:, :, :pos + T], kv[1][:, :, :pos + T]  # (B, H, pos + T, hs)
        a, att_c = ops.attention_forward(q, k, v, causal=causal, key_padding_mask=kpm)
        o, out_c = linear_forward(merge_heads(a), P[p + "out_proj.weight"].T, P[p + "out_proj.bias"])
        return o, (qkv_c, att_c, out_c)

    def _self_attn_backward(self, do, cache, p):
        """Writes the attention's weight grads; returns dh."""
        ops, G, H = get_ops(), self.grads, self.config.n_heads
        qkv_c, att_c, out_c = cache
        # o = merge_heads(a) @ W_out.T + b_out
        da = linear_backward(do, out_c, G[p + "out_proj.weight"].T, G[p + "out_proj.bias"])  # (B, T, C)
        # a = attention(q, k, v)
        dq, dk, dv = ops.attention_backward(split_heads(da, 1, H)[0], att_c)
        # qkv = h @ W_in.T + b_in
        return linear_backward(merge_heads(np.stack((dq, dk, dv))), qkv_c,
                               G[p + "in_proj_weight"].T, G[p + "in_proj_bias"])

    def _cross_kv_forward(self, memory, p):
        """Keys and values (B, H, S, hs) of the encoder output, from the k, v rows of in_proj."""
        P, C = self.params, self.config.d_model
        kv, kv_c = linear_forward(memory, P[p + "in_proj_weight"][C:].T, P[p + "in_proj_bias"][C:])  # (B, S, 2C)
        k, v = split_heads(kv, 2, self.config.n_heads)
        return k, v, kv_c

    def _cross_attn_forward(self, h, p, cross_kv, src_kpm):
        """Queries from the decoder h (B, T, C), keys/values from the encoder output."""
        ops, P, C = get_ops(), self.params, self.config.d_model
        q, q_c = linear_forward(h, P[p + "in_proj_weight"][:C].T, P[p + "in_proj_bias"][:C])  # (B, T, C)
        k, v, kv_c = cross_kv
        a, att_c = ops.attention_forward(split_heads(q, 1, self.config.n_heads)[0], k, v,
                                         causal=False, key_padding_mask=src_kpm)
        o, out_c = linear_forward(merge_heads(a), P[p + "out_proj.weight"].T, P[p + "out_proj.bias"])
        return o, (q_c, att_c, out_c, kv_c)

    def _cross_attn_backward(self, do, cache, p):
        """Writes the weight grads; returns (dh, dmemory)."""
        ops, G, C, H = get_ops(), self.grads, self.config.d_model, self.config.n_heads
        q_c, att_c, out_c, kv_c = cache
        # o = merge_heads(a) @ W_out.T + b_out
        da = linear_backward(do, out_c, G[p + "out_proj.weight"].T, G[p + "out_proj.bias"])
        # a = attention(q, k, v, key_padding_mask=src)
        dq, dk, dv = ops.attention_backward(split_heads(da, 1, H)[0], att_c)
        # q = h @ W_in[:C].T + b_in[:C]
        dh = linear_backward(merge_heads(dq), q_c, G[p + "in_proj_weight"][:C].T, G[p + "in_proj_bias"][:C])
        # kv = memory @ W_in[C:].T + b_in[C:]
        dmem = linear_backward(merge_heads(np.stack((dk, dv))), kv_c,
                               G[p + "in_proj_weight"][C:].T, G[p + "in_proj_bias"][C:])
        return dh, dmem

    def _ff_forward(self, h, p):
        """linear2(act(linear1(h))), the linear1 bias fused into the activation."""
        ops, P = get_ops(), self.params
        f, fc_c = linear_forward(h, P[p + "linear1.weight"].T)  # (B, T, F)
        if self.config.activation == "gelu":
            g, act_c = ops.gelu_forward(f, P[p + "linear1.bias"], approximate="none")
        else:
            g, act_c = ops.relu_forward(f, P[p + "linear1.bias"])
        m, m_c = linear_forward(g, P[p + "linear2.weight"].T, P[p + "linear2.bias"])  # (B, T, C)
        return m, (fc_c, act_c, m_c)

    def _ff_backward(self, dm, cache, p):
        G = self.grads
        fc_c, act_c, m_c = cache
        # m = g @ W2.T + b2
        dg = linear_backward(dm, m_c, G[p + "linear2.weight"].T, G[p + "linear2.bias"])
        # g = act(f + b1)
        ops = get_ops()
        act_backward = ops.gelu_backward if self.config.activation == "gelu" else ops.relu_backward
        df, G[p + "linear1.bias"][...] = act_backward(dg, act_c)
        # f = h @ W1.T
        return linear_backward(df, fc_c, G[p + "linear1.weight"].T)

    # ---------------------------------------------------------------- stacks
    def _steps(self, stack):
        """The sublayers of a stack in order: (kind, layer index, layer prefix, norm name)."""
        if stack == "encoder":
            n, kinds = self.config.n_encoder_layers, ("self_attn", "ff")
        else:
            n, kinds = self.config.n_decoder_layers, ("self_attn", "multihead_attn", "ff")
        return [(kind, i, f"{stack}.layers.{i}.", f"{stack}.layers.{i}.norm{j + 1}")
                for i in range(n) for j, kind in enumerate(kinds)]

    def _stack_forward(self, x, stack, ctx, train):
        """Run the encoder or decoder stack on x (B, L, C), final norm included. `ctx` holds
        the self-attention mask and causality, and for the decoder the encoder output (or the
        decoding state). Returns (h (B, L, C), cache)."""
        ops, P, cfg = get_ops(), self.params, self.config
        drop = cfg.dropout if train else 0.0
        steps, final = self._steps(stack), stack + ".norm"
        state = ctx.get("state")
        first_c = None
        if cfg.norm_first:
            h, first_c = ops.layernorm_forward(x, P[steps[0][3] + ".weight"], P[steps[0][3] + ".bias"])
        else:
            h = x
        caches = []
        for j, (kind, i, p, norm) in enumerate(steps):
            if kind == "self_attn":
                kv = None if state is None else state.self_kv[i]
                b, bc = self._self_attn_forward(h, p + "self_attn.", ctx["kpm"], ctx["causal"],
                                                kv, 0 if state is None else state.pos)
            elif kind == "multihead_attn":
                cross = (state.cross_kv[i] if state is not None
                         else self._cross_kv_forward(ctx["memory"], p + "multihead_attn."))
                b, bc = self._cross_attn_forward(h, p + "multihead_attn.", cross, ctx["src_kpm"])
            else:
                b, bc = self._ff_forward(h, p)
            b, mask = dropout_forward(b, drop, self.rng)
            if cfg.norm_first:  # x = x + b, and h = the next sublayer's norm of it
                nxt = steps[j + 1][3] if j + 1 < len(steps) else final
                (x, h), lc = ops.residual_layernorm_forward(x, b, P[nxt + ".weight"], P[nxt + ".bias"])
            else:  # x = norm(x + b), and the next sublayer reads x itself
                nxt = norm
                (_, x), lc = ops.residual_layernorm_forward(x, b, P[nxt + ".weight"], P[nxt + ".bias"])
                h = x
            caches.append((kind, p, bc, mask, lc, nxt))
        final_c = None
        if not cfg.norm_first:
            h, final_c = ops.layernorm_forward(x, P[final + ".weight"], P[final + ".bias"])
        return h, (first_c, caches, final_c, steps[0][3], final)

    def _stack_backward(self, dh, cache):
        """Gradient of a stack's input from the gradient of its output; writes every weight grad
        of the stack. Returns (dx, dmemory) with dmemory None for the encoder."""
        ops, G, cfg = get_ops(), self.grads, self.config
        first_c, caches, final_c, first, final = cache
        if not cfg.norm_first:
            # h = final_norm(x)
            dh, G[final + ".weight"][...], G[final + ".bias"][...] = ops.layernorm_backward(dh, final_c)
        ds, dmem = None, None  # ds: the gradient along the residual stream
        for kind, p, bc, mask, lc, nxt in reversed(caches):
            if cfg.norm_first:
                # (x, h) = (x + b, norm_next(x + b)): x and h are two outputs
                dsum, dw, db = ops.residual_layernorm_backward(dh, ds, lc)
            else:
                # x = h = norm(x + b): one output read twice, by the next sublayer and the residual
                dsum, dw, db = ops.residual_layernorm_backward(dh if ds is None else dh + ds, None, lc)
            G[nxt + ".weight"][...], G[nxt + ".bias"][...] = dw, db
            ds = dsum
            db_branch = dropout_backward(dsum, mask)
            if kind == "self_attn":
                dh = self._self_attn_backward(db_branch, bc, p + "self_attn.")
            elif kind == "multihead_attn":
                dh, dm = self._cross_attn_backward(db_branch, bc, p + "multihead_attn.")
                dmem = dm if dmem is None else dmem + dm
            else:
                dh = self._ff_backward(db_branch, bc, p)
        if cfg.norm_first:
            # h = norm_first_sublayer(x)
            dx, G[first + ".weight"][...], G[first + ".bias"][...] = ops.layernorm_backward(dh, first_c)
            return dx + ds, dmem
        return dh + ds, dmem

    # --------------------------------------------------------------- forward
    def _forward(self, src, src_kpm, tgt, tgt_kpm, train):
        """Logits (B, T, V) and the caches the backward needs."""
        x, src_emb_c = self._embed_forward(src, "src", 0, train)
        memory, enc_c = self._stack_forward(x, "encoder", {"kpm": src_kpm, "causal": False}, train)
        y, tgt_emb_c = self._embed_forward(tgt, "tgt", 0, train)
        h, dec_c = self._stack_forward(y, "decoder", {"kpm": tgt_kpm, "causal": True, "memory": memory,
                                                      "src_kpm": src_kpm}, train)
        logits, head_c = linear_forward(h, self.params[self.head_name].T)  # (B, T, V)
        return logits, (src_emb_c, enc_c, tgt_emb_c, dec_c, head_c)

    def forward(self, src_ids, src_mask, tgt_in, tgt_mask):
        """Logits (B, T, V_t) of the next target token at every decoder position, in inference
        mode (no dropout). src_ids (B, S), tgt_in (B, T) (starting with <bos>); the masks, like
        their ids, are 1 for tokens and 0 for padding (or None)."""
        src, src_kpm, tgt, tgt_kpm = self._check_inputs(src_ids, src_mask, tgt_in, tgt_mask)
        logits, _ = self._forward(src, src_kpm, tgt, tgt_kpm, train=False)
        return logits

    __call__ = forward

    def loss(self, src_ids, src_mask, tgt_in, tgt_mask, targets):
        """Mean cross-entropy over targets != -100, in inference mode; no gradients."""
        src, src_kpm, tgt, tgt_kpm = self._check_inputs(src_ids, src_mask, tgt_in, tgt_mask)
        targets = self._check_targets(targets, tgt.shape)
        logits, _ = self._forward(src, src_kpm, tgt, tgt_kpm, train=False)
        return get_ops().cross_entropy_forward(logits, targets)[0]

    # -------------------------------------------------------------- backward
    def loss_and_grads(self, src_ids, src_mask, tgt_in, tgt_mask, targets):
        """Training step math: mean cross-entropy of `targets` (B, T) (-100 is ignored) and the
        gradient of every parameter. Dropout is on when config.dropout > 0. A batch from
        `fastformer.seq2seq_data` is passed as `model.loss_and_grads(**batch)`.

        Returns (loss: float, grads: {name: array}); grads are views into `self.flat.grad`,
        shaped like `state_dict()`, and are overwritten by the next call.
        """
        ops, G = get_ops(), self.grads
        src, src_kpm, tgt, tgt_kpm = self._check_inputs(src_ids, src_mask, tgt_in, tgt_mask)
        targets = self._check_targets(targets, tgt.shape)
        logits, (src_emb_c, enc_c, tgt_emb_c, dec_c, head_c) = self._forward(src, src_kpm, tgt, tgt_kpm, True)
        loss, ce_c = ops.cross_entropy_forward(logits, targets)

        dlogits = ops.cross_entropy_backward(1.0, ce_c)  # (B, T, V)
        # logits = h @ W_head.T
        dh = linear_backward(dlogits, head_c, G[self.head_name].T)  # (B, T, C)
        dy, dmemory = self._stack_backward(dh, dec_c)
        if not self.config.tie_embeddings:
            G["tgt_embed.weight"][...] = 0.0
        self._embed_backward(dy, tgt_emb_c, "tgt")
        dx, _ = self._stack_backward(dmemory, enc_c)
        G["src_embed.weight"][...] = 0.0
        self._embed_backward(dx, src_emb_c, "src")
        return loss, self.grads

    # -------------------------------------------------------------- decoding
    def encode(self, src_ids, src_mask=None):
        """Encoder output (B, S, C) and the source key-padding mask (B, S) (True at padding, or
        None), in inference mode: the start of decoding."""
        c = self.config
        src = self._check_ids(src_ids, "src_ids", c.src_vocab_size, c.max_src_len, "max_src_len")
        src_kpm = self._check_mask(src_mask, "src_mask", src.shape)
        x, _ = self._embed_forward(src, "src", 0, train=False)
        memory, _ = self._stack_forward(x, "encoder", {"kpm": src_kpm, "causal": False}, train=False)
        return memory, src_kpm

    def init_decoder_state(self, memory, src_kpm, max_len=None):
        """A DecoderState for `memory` (N, S, C): cross-attention keys/values computed here, once,
        and empty self-attention caches for up to `max_len` (default max_tgt_len) positions."""
        c = self.config
        max_len = c.max_tgt_len if max_len is None else max_len
        if not 1 <= max_len <= c.max_tgt_len:
            raise ValueError(f"max_len must lie in [1, max_tgt_len={c.max_tgt_len}], got {max_len}")
        N, hs = memory.shape[0], c.d_model // c.n_heads
        self_kv = [(np.zeros((N, c.n_heads, max_len, hs), memory.dtype),
                    np.zeros((N, c.n_heads, max_len, hs), memory.dtype)) for _ in range(c.n_decoder_layers)]
        cross_kv = [self._cross_kv_forward(memory, f"decoder.layers.{i}.multihead_attn.")
                    for i in range(c.n_decoder_layers)]
        return DecoderState(self_kv, cross_kv, src_kpm)

    def decode_step(self, tgt_ids, state):
        """Feed the next target tokens tgt_ids (N, T) (usually T = 1) at positions
        [state.pos, state.pos + T) and return their logits (N, T, V); advances state.pos."""
        c = self.config
        buf_len = state.self_kv[0][0].shape[2]
        tgt = self._check_ids(tgt_ids, "tgt_ids", c.tgt_vocab_size, buf_len - state.pos,
                              f"cache room left (max_len {buf_len} - pos {state.pos})")
        y, _ = self._embed_forward(tgt, "tgt", state.pos, train=False)
        h, _ = self._stack_forward(y, "decoder", {"kpm": None, "causal": True, "state": state,
                                                  "src_kpm": state.src_kpm}, train=False)
        state.pos += tgt.shape[1]
        return linear_forward(h, self.params[self.head_name].T)[0]  # (N, T, V)
