"""The encoder-decoder Transformer ("Attention Is All You Need" shape), assembled from the blocks
of fastformer.nn.

    x = src_embed[src] * sqrt(C) + pos[:S]            # (B, S, C)   Embedding
    encoder layer:  x = x + self_attn(norm1(x))  ;  x = x + ff(norm2(x))
    memory = encoder.norm(x)                          # (B, S, C)   Stack
    y = tgt_embed[tgt_in] * sqrt(C) + pos[:T]         # (B, T, C)
    decoder layer:  y = y + causal_self_attn(norm1(y)) ; y = y + cross_attn(norm2(y), memory)
                    y = y + ff(norm3(y))
    logits = decoder.norm(y) @ tgt_embed.T            # (B, T, V)   OutputHead (lm_head.weight when untied)

That is the pre-LN order (`norm_first=True`); with `norm_first=False` each sublayer is
`x = norm(x + branch(x))` instead, as in the original paper. The layer parameters carry the names
and shapes of `torch.nn.Transformer` (linear weights stored (out, in), fused `in_proj_weight`
holding q, k, v rows), so a torch state dict maps with a prefix and no reshaping.

Decoding: `init_state(src_ids, src_mask)` encodes the sources once and keeps the decoder's
cross-attention keys/values in a KVCache; `step(tokens, state)` then feeds target tokens.
"""

import math

import numpy as np

from fastformer.errors import FastformerError, check_ids, check_int, check_targets, check_token_mask
from fastformer.models.config import Seq2SeqConfig, check_decoding_memory, check_model_memory
from fastformer.nn.blocks import (
    Context,
    CrossAttention,
    Embedding,
    FeedForward,
    LayerNorm,
    Linear,
    OutputHead,
    SelfAttention,
    Stack,
    sinusoidal_table,
)
from fastformer.nn.cache import KVCache
from fastformer.nn.params import FlatModel

__all__ = ["Seq2SeqConfig", "Seq2SeqTransformer", "sinusoidal_table"]


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
            raise FastformerError(f"config must be a Seq2SeqConfig, got {type(config).__name__}")
        check_model_memory(config)
        self.config = c = config
        C, F, H = c.d_model, c.d_ff, c.n_heads
        learned = c.positions == "learned"
        self.src_embed = Embedding("src_embed.weight", c.src_vocab_size, C, "src_pos_embed.weight" if learned else None,
                                   c.max_src_len, scale=math.sqrt(C))
        self.tgt_embed = Embedding("tgt_embed.weight", c.tgt_vocab_size, C, "tgt_pos_embed.weight" if learned else None,
                                   c.max_tgt_len, scale=math.sqrt(C))
        act = "gelu" if c.activation == "gelu" else "relu"

        def attn(p):  # torch.nn.MultiheadAttention's names: (out, in) weights, fused in_proj
            return (Linear(p + "in_proj_weight", p + "in_proj_bias", C, 3 * C, transposed=True),
                    Linear(p + "out_proj.weight", p + "out_proj.bias", C, C, transposed=True))

        def ff(p):
            return FeedForward(Linear(p + "linear1.weight", p + "linear1.bias", C, F, transposed=True),
                               Linear(p + "linear2.weight", p + "linear2.bias", F, C, transposed=True), act)

        enc, dec = [], []
        for i in range(c.n_encoder_layers):
            p = f"encoder.layers.{i}."
            enc += [(SelfAttention(*attn(p + "self_attn."), H, causal=False), LayerNorm(p + "norm1", C)),
                    (ff(p), LayerNorm(p + "norm2", C))]
        for i in range(c.n_decoder_layers):
            p = f"decoder.layers.{i}."
            dec += [(SelfAttention(*attn(p + "self_attn."), H, causal=True, layer=i), LayerNorm(p + "norm1", C)),
                    (CrossAttention(*attn(p + "multihead_attn."), H, layer=i), LayerNorm(p + "norm2", C)),
                    (ff(p), LayerNorm(p + "norm3", C))]
        self.encoder = Stack(tuple(enc), LayerNorm("encoder.norm", C), c.norm_first)
        self.decoder = Stack(tuple(dec), LayerNorm("decoder.norm", C), c.norm_first)
        self.head = OutputHead("tgt_embed.weight" if c.tie_embeddings else "lm_head.weight", c.tgt_vocab_size, C,
                               own=not c.tie_embeddings)
        # the order of torch.nn.Transformer's state dict: per layer the attentions, the
        # feed-forward, then the norms
        shapes = {self.src_embed.tok: (c.src_vocab_size, C), self.tgt_embed.tok: (c.tgt_vocab_size, C)}
        if learned:
            shapes.update({self.src_embed.pos: (c.max_src_len, C), self.tgt_embed.pos: (c.max_tgt_len, C)})
        for stack, n in ((self.encoder, 2), (self.decoder, 3)):
            for i in range(0, len(stack.sublayers), n):
                layer = stack.sublayers[i:i + n]
                for block, _ in layer:
                    shapes.update(block.shapes())
                for _, norm in layer:
                    shapes.update(norm.shapes())
            shapes.update(stack.final.shapes())
        shapes.update(self.head.shapes())
        decay = {n for n, s in shapes.items() if len(s) == 2 and "pos_embed" not in n}
        self._setup(shapes, decay, dtype, seed)
        self.pos_table = None  # (max(S, T), C) when positions are sinusoidal
        if not learned:
            self.pos_table = sinusoidal_table(max(c.max_src_len, c.max_tgt_len), C, dtype)

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

    # ---------------------------------------------------------------- checks
    @staticmethod
    def _check_ids(ids, name, vocab_size, max_len, max_name):
        ids = check_ids(name, ids, vocab_size, ndim=(2,), vocab_name=f"{name.split('_')[0]}_vocab_size",
                        shapes="(B, length)")
        if ids.shape[0] < 1 or not 1 <= ids.shape[1] <= max_len:
            raise FastformerError(f"{name} has shape {ids.shape}: need B >= 1 and 1 <= length <= {max_name}={max_len}")
        return ids

    def _check_inputs(self, src_ids, src_mask, tgt_in, tgt_mask):
        c = self.config
        src = self._check_ids(src_ids, "src_ids", c.src_vocab_size, c.max_src_len, "max_src_len")
        tgt = self._check_ids(tgt_in, "tgt_in", c.tgt_vocab_size, c.max_tgt_len, "max_tgt_len")
        if src.shape[0] != tgt.shape[0]:
            raise FastformerError(f"src_ids and tgt_in need the same batch size, got {src.shape[0]} and "
                                  f"{tgt.shape[0]}")
        return (src, check_token_mask("src_mask", src_mask, src.shape),
                tgt, check_token_mask("tgt_mask", tgt_mask, tgt.shape))

    # --------------------------------------------------------------- forward
    def _encode(self, src, src_kpm, train):
        drop = self.config.dropout if train else 0.0
        x, src_c = self.src_embed.forward(self.params, src, table=self.pos_table, drop=drop, rng=self.rng)
        memory, enc_c = self.encoder.forward(self.params, x, Context(kpm=src_kpm), drop, self.rng)  # (B, S, C)
        return memory, (src_c, enc_c)

    def _forward(self, src, src_kpm, tgt, tgt_kpm, train):
        """The decoder's final hidden states h (B, T, C), before the head, and the caches the
        backward needs."""
        drop = self.config.dropout if train else 0.0
        memory, enc_caches = self._encode(src, src_kpm, train)
        y, tgt_c = self.tgt_embed.forward(self.params, tgt, table=self.pos_table, drop=drop, rng=self.rng)
        ctx = Context(kpm=tgt_kpm, memory=memory, memory_kpm=src_kpm, weights=None if train else self.quantized)
        h, dec_c = self.decoder.forward(self.params, y, ctx, drop, self.rng)  # (B, T, C)
        return h, (enc_caches, tgt_c, dec_c)

    def forward(self, src_ids, src_mask, tgt_in, tgt_mask):
        """Logits (B, T, V_t) of the next target token at every decoder position, in inference
        mode (no dropout). src_ids (B, S), tgt_in (B, T) (starting with <bos>); the masks, like
        their ids, are 1 for tokens and 0 for padding (or None)."""
        src, src_kpm, tgt, tgt_kpm = self._check_inputs(src_ids, src_mask, tgt_in, tgt_mask)
        h, _ = self._forward(src, src_kpm, tgt, tgt_kpm, train=False)
        return self.head.forward(self.params, h, weights=self.quantized)  # (B, T, V)

    __call__ = forward

    def loss(self, src_ids, src_mask, tgt_in, tgt_mask, targets):
        """Mean cross-entropy over targets != -100, in inference mode; no gradients."""
        src, src_kpm, tgt, tgt_kpm = self._check_inputs(src_ids, src_mask, tgt_in, tgt_mask)
        targets = check_targets(targets, tgt.shape, "tgt_in")
        h, _ = self._forward(src, src_kpm, tgt, tgt_kpm, train=False)
        return self.head.loss(self.params, h, targets, weights=self.quantized)

    # -------------------------------------------------------------- backward
    def loss_and_grads(self, src_ids, src_mask, tgt_in, tgt_mask, targets):
        """Training step math: mean cross-entropy of `targets` (B, T) (-100 is ignored) and the
        gradient of every parameter. Dropout is on when config.dropout > 0. A batch from
        `fastformer.data.pairs` is passed as `model.loss_and_grads(**batch)`.

        Returns (loss: float, grads: {name: array}); grads are views into `self.flat.grad`,
        shaped like `state_dict()`, and are overwritten by the next call.
        """
        self.check_trainable()
        G = self.grads
        src, src_kpm, tgt, tgt_kpm = self._check_inputs(src_ids, src_mask, tgt_in, tgt_mask)
        targets = check_targets(targets, tgt.shape, "tgt_in")
        h, ((src_c, enc_c), tgt_c, dec_c) = self._forward(src, src_kpm, tgt, tgt_kpm, True)  # (B, T, C)
        loss, dh = self.head.loss_and_grads(G, self.params, h, targets)  # no (B, T, V) logits are made
        dy, dmemory = self.decoder.backward(G, dh, dec_c)
        self.tgt_embed.backward(G, dy, tgt_c, zero_tok=self.head.own)
        dx, _ = self.encoder.backward(G, dmemory, enc_c)
        self.src_embed.backward(G, dx, src_c)
        return loss, self.grads

    # -------------------------------------------------------------- decoding
    def decoding_matrices(self):
        """The decoder's and the head's: the encoder runs once per source, in float32."""
        return {**self.decoder.matrices(self.params), **self.head.matrices(self.params)}

    def encode(self, src_ids, src_mask=None):
        """Encoder output (B, S, C) and the source key-padding mask (B, S) (True at padding, or
        None), in inference mode: the start of decoding."""
        c = self.config
        src = self._check_ids(src_ids, "src_ids", c.src_vocab_size, c.max_src_len, "max_src_len")
        src_kpm = check_token_mask("src_mask", src_mask, src.shape)
        memory, _ = self._encode(src, src_kpm, train=False)
        return memory, src_kpm

    def init_state(self, src_ids, src_mask=None, repeat=1, max_len=None):
        """A decoding state (a KVCache) for the sources (B, S), each repeated `repeat` times
        (rows b * repeat + k decode source b: beams or samples): the encoder runs here, once,
        and so do the cross-attention keys/values; room for up to `max_len` (default
        max_tgt_len) target positions."""
        c = self.config
        max_len = c.max_tgt_len if max_len is None else check_int("max_len", max_len, 1, c.max_tgt_len)
        repeat = check_int("repeat", repeat)
        memory, src_kpm = self.encode(src_ids, src_mask)  # (B, S, C)
        check_decoding_memory(c, memory.shape[0] * repeat, max_len)
        if repeat > 1:
            memory = np.repeat(memory, repeat, axis=0)  # (B * repeat, S, C)
            src_kpm = None if src_kpm is None else np.repeat(src_kpm, repeat, axis=0)
        N = memory.shape[0]
        state = KVCache(c.n_decoder_layers, N, c.n_heads, max_len, c.d_model // c.n_heads, memory.dtype,
                        checked=True)
        cross = [block.kv_forward(self.params, memory) for block, _ in self.decoder.sublayers
                 if isinstance(block, CrossAttention)]
        state.cross_k = np.stack([k for k, _, _ in cross])  # (L, N, H, S, hs)
        state.cross_v = np.stack([v for _, v, _ in cross])
        state.cross_padding = src_kpm
        state.source = np.arange(N) // repeat
        return state

    def step(self, tokens, state, attention_mask=None, validate=True, last=False):
        """Feed the next target tokens (N, T) (usually T = 1; the first is <bos>) at positions
        [state.length, state.length + T) and return their logits (N, T, V); with `last`, those
        of the last position alone (N, 1, V)."""
        if attention_mask is not None:
            raise FastformerError("attention_mask does not apply to target tokens: the decoder is fed no padding")
        if validate:
            tokens = check_ids("tokens", tokens, self.config.tgt_vocab_size, ndim=(2,), vocab_name="tgt_vocab_size",
                               shapes="(N, T)")
            room = state.max_len - state.length
            if tokens.shape[0] != state.batch_size or not 1 <= tokens.shape[1] <= room:
                raise FastformerError(f"tokens must have shape (N, T) with N = the state's {state.batch_size} rows "
                                      f"and 1 <= T <= {room} (cache room left: max_len {state.max_len} - "
                                      f"{state.length} fed), got {tokens.shape}")
        T, n = tokens.shape[1], state.length
        y, _ = self.tgt_embed.forward(self.params, tokens, positions=n, table=self.pos_table)
        ctx = Context(memory_kpm=state.cross_padding, cache=state, weights=self.quantized)
        h, _ = self.decoder.forward(self.params, y, ctx)
        state.tokens[:, n:n + T] = tokens
        state.length += T
        state.next_position += T
        return self.head.forward(self.params, h[:, -1:] if last else h, weights=self.quantized)  # (N, T or 1, V)
