"""The decoder-only language model: GPT-2's architecture and parameter names, assembled from the
blocks of fastformer.nn.

    x = wte[ids] + wpe[:T]                        # (B, T, C)   Embedding (model.positions: learned;
                                                  #   sinusoidal: wte[ids] * sqrt(C) + the fixed table)
    for each layer:  x = x + attn(ln_1(x))        #             SelfAttention, causal
                     x = x + mlp(ln_2(x))         #             FeedForward, GELU (tanh)
    logits = ln_f(x) @ wte.T                      # (B, T, V)   OutputHead (lm_head.weight when untied)

The residual adds are fused with the layernorm that reads them (`Stack`, pre-LN). Weights are
stored (in, out) as in Hugging Face's GPT-2 (Conv1D), so state dicts interchange as they are.
Decoding keeps a KVCache; one new token per row runs the whole model in one fused kernel
(`gpt2_decode_step`), and so do several greedy steps (`gpt2_decode_greedy`) and a short prompt whose
last logits alone are wanted (`gpt2_decode_prompt`), whose packed layout this module names
(`decode_layout`). The kernels read
learned positions (wpe) from the flat buffer, so a sinusoidal model decodes through the composed
forward instead: the same logits, more calls per token.
"""

import math

import numpy as np

from fastformer.errors import FastformerError, check_ids, check_int, check_targets, check_token_mask
from fastformer.kernels import get_ops
from fastformer.models.config import LMConfig, check_decoding_memory, check_model_memory
from fastformer.nn.blocks import (
    Context,
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

# Rows up to which a decoding step of one token a row runs the fused, single-threaded
# ops.gpt2_decode_step; more rows take the composed forward, whose GEMMs use every BLAS thread
# (the crossover measured by benchmarks/decode_crossover.py).
FUSED_DECODE_MAX_ROWS = 32
# Prompt tokens (rows x positions) up to which a prompt whose last logits alone are wanted runs the
# fused ops.gpt2_decode_prompt, by weight format (benchmarks/decode_crossover.py --prompt measures
# it): the fused prompt streams each weight once for all its tokens, and the composed forward
# overtakes it at fewer tokens in fp32 than in int8 and bf16.
FUSED_PROMPT_MAX_TOKENS = {"fp32": 64, "bf16": 256, "int8": 256}


def _positions(mask, start):
    """Position ids (B, T) that count real tokens only, continuing from `start` (B,)."""
    return start[:, None] + np.maximum(np.cumsum(mask, axis=1) - 1, 0)


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
            raise FastformerError(f"config must be an LMConfig, got {type(config).__name__}")
        check_model_memory(config)
        self.config = c = config
        C, F, H = c.d_model, c.d_ff, c.n_heads
        learned = c.positions == "learned"
        # sinusoidal: the fixed (max_seq_len, C) table of the original paper, not a parameter, added
        # to the tokens times sqrt(C) as there (and in the encoder-decoder): the table's entries have
        # rms 1/sqrt(2), and GPT-2's N(0, 0.02) token rows alone would be drowned by it; the rows
        # keep GPT-2's init, so that as the tied head they still start with near-uniform logits
        self.embed = Embedding("transformer.wte.weight", c.vocab_size, C, "transformer.wpe.weight" if learned else None,
                               c.max_seq_len, scale=None if learned else math.sqrt(C))
        self.pos_table = None if learned else sinusoidal_table(c.max_seq_len, C, dtype)
        self.layers = []
        for i in range(c.n_layers):
            p = f"transformer.h.{i}."
            attn = SelfAttention(Linear(p + "attn.c_attn.weight", p + "attn.c_attn.bias", C, 3 * C),
                                 Linear(p + "attn.c_proj.weight", p + "attn.c_proj.bias", C, C), H, causal=True,
                                 layer=i)
            mlp = FeedForward(Linear(p + "mlp.c_fc.weight", p + "mlp.c_fc.bias", C, F),
                              Linear(p + "mlp.c_proj.weight", p + "mlp.c_proj.bias", F, C), "gelu_tanh")
            self.layers.append(((attn, LayerNorm(p + "ln_1", C)), (mlp, LayerNorm(p + "ln_2", C))))
        self.stack = Stack(tuple(s for layer in self.layers for s in layer), LayerNorm("transformer.ln_f", C))
        self.head = OutputHead("lm_head.weight" if not c.tie_embeddings else self.embed.tok, c.vocab_size, C,
                               own=not c.tie_embeddings)
        shapes = dict(self.embed.shapes())
        for (attn, ln_1), (mlp, ln_2) in self.layers:
            shapes.update({**ln_1.shapes(), **attn.shapes(), **ln_2.shapes(), **mlp.shapes()})
        shapes.update({**self.stack.final.shapes(), **self.head.shapes()})
        decay = {n for n, s in shapes.items() if len(s) == 2 and n != self.embed.pos}
        self._setup(shapes, decay, dtype, seed)
        self._packed = None  # made by `packed_weights` at the first decoding step

    def _init_weights(self, rng):
        # GPT-2: normal(0, 0.02) weights, zero biases, unit LN gains; the projections that write
        # into the residual stream are scaled by 1/sqrt(2 L) so its variance does not grow with depth.
        proj_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        gains = {n.weight for layer in self.layers for _, n in layer} | {self.stack.final.weight}
        for name, p in self.params.items():
            if name in gains:
                p[...] = 1.0
            elif p.ndim == 1:
                p[...] = 0.0
            else:
                p[...] = rng.normal(0.0, proj_std if name.endswith("c_proj.weight") else 0.02, size=p.shape)

    # ---------------------------------------------------------------- checks
    def _check_inputs(self, ids, attention_mask):
        """(ids (B, T) int64, key-padding mask (B, T) or None) from the public arguments."""
        ids = check_ids("ids", ids, self.config.vocab_size, shapes="(B, T) or (T,)")
        ids2 = ids.reshape(1, -1) if ids.ndim == 1 else ids
        T, Tmax = ids2.shape[1], self.config.max_seq_len
        if not 1 <= T <= Tmax:
            raise FastformerError(f"sequence length T={T} is not allowed: ids need 1 <= T <= max_seq_len={Tmax}")
        kpm = check_token_mask("attention_mask", attention_mask, ids.shape)
        return ids2, None if kpm is None else kpm.reshape(ids2.shape)

    def _check_positions(self, position_ids, shape):
        if position_ids is None:
            return None
        pos = np.asarray(position_ids)
        Tmax = self.config.max_seq_len
        if pos.dtype.kind not in "iu" or pos.size != math.prod(shape):
            raise FastformerError(f"position_ids must be an integer array like ids {shape}, got {pos.dtype} "
                                  f"{pos.shape}")
        if pos.size and (pos.min() < 0 or pos.max() >= Tmax):
            raise FastformerError(f"position_ids must lie in [0, max_seq_len={Tmax}), got {pos.min()}..{pos.max()}")
        return pos.reshape(shape)

    # --------------------------------------------------------------- forward
    def _forward(self, ids, kpm, train, positions=None, cache=None):
        """The final hidden states h (B, T, C), before the head, and the caches the backward
        needs. `positions` (B, T) default to 0..T-1; with a KVCache the tokens extend the cached
        sequence (inference only)."""
        drop = self.config.dropout if train else 0.0
        x, emb_c = self.embed.forward(self.params, ids, positions, table=self.pos_table, drop=drop,
                                      rng=self.rng)  # (B, T, C)
        ctx = Context(kpm=kpm, cache=cache, weights=None if train else self.quantized)
        h, stack_c = self.stack.forward(self.params, x, ctx, drop, self.rng)
        return h, (emb_c, stack_c)

    def forward(self, ids, attention_mask=None, position_ids=None):
        """Logits (B, T, V) for integer ids (B, T) -- or (T, V) for ids (T,) -- in inference
        mode (no dropout). `attention_mask` (like ids) is 1 for tokens and 0 for padding;
        padding keys are never attended to. `position_ids` (like ids) default to 0..T-1."""
        ids2, kpm = self._check_inputs(ids, attention_mask)
        h, _ = self._forward(ids2, kpm, train=False, positions=self._check_positions(position_ids, ids2.shape))
        logits = self.head.forward(self.params, h, weights=self.quantized)  # (B, T, V)
        return logits if np.ndim(ids) == 2 else logits[0]

    __call__ = forward

    def loss(self, ids, targets, attention_mask=None):
        """Mean cross-entropy over targets != -100, in inference mode; no gradients."""
        ids2, kpm = self._check_inputs(ids, attention_mask)
        targets = check_targets(targets, ids2.shape, "ids")
        h, _ = self._forward(ids2, kpm, train=False)
        return self.head.loss(self.params, h, targets, weights=self.quantized)

    # -------------------------------------------------------------- backward
    def loss_and_grads(self, ids, targets, attention_mask=None):
        """Training step math: mean cross-entropy of next-token `targets` (like ids; -100 is
        ignored) and the gradient of every parameter. Dropout is on when config.dropout > 0.

        Returns (loss: float, grads: {name: array}); grads are views into `self.flat.grad`,
        shaped like `state_dict()`, and are overwritten by the next call.
        """
        self.check_trainable()
        G = self.grads
        ids2, kpm = self._check_inputs(ids, attention_mask)
        targets = check_targets(targets, ids2.shape, "ids")
        h, (emb_c, stack_c) = self._forward(ids2, kpm, train=True)  # (B, T, C)
        loss, dh = self.head.loss_and_grads(G, self.params, h, targets)  # no (B, T, V) logits are made
        dx, _ = self.stack.backward(G, dh, stack_c)
        self.embed.backward(G, dx, emb_c, zero_tok=self.head.own)
        return loss, self.grads

    # -------------------------------------------------------------- decoding
    def init_state(self, batch_size, use_cache=True):
        """An empty decoding state (a KVCache) for `batch_size` sequences; `step` fills it.
        With use_cache=False every step runs a full forward over the sequence (slower, the
        same tokens: a reference for the cached path)."""
        c = self.config
        check_decoding_memory(c, check_int("batch_size", batch_size))
        state = KVCache(c.n_layers, batch_size, c.n_heads, c.max_seq_len,
                        c.d_model // c.n_heads, self.flat.dtype, checked=True)
        state.use_cache = bool(use_cache)
        return state

    def step(self, tokens, state, attention_mask=None, validate=True, last=False):
        """Feed tokens (B, T) -- a prompt, or the tokens just chosen -- to the sequences of
        `state` and return their logits (B, T, V). `attention_mask` (like tokens, 1 = token,
        0 = left padding) is for a first, padded prompt; positions count real tokens only, so
        a row decodes the same alone or in a batch. Once the context window is full, the last
        max_seq_len tokens are run again as a window (nanoGPT's crop). `validate=False` is for
        callers that made the ids themselves (a search's chosen tokens). `last`: only the last
        position's logits are wanted (B, 1, V), which lets a short prompt run in one fused call."""
        if validate:
            tokens = check_ids("tokens", tokens, self.config.vocab_size, ndim=(2,), shapes="(B, T)")
            if tokens.shape[0] != state.batch_size or tokens.shape[1] < 1:
                raise FastformerError(f"tokens must have shape (B, T) with B = the state's batch size "
                                      f"{state.batch_size} and T >= 1, got {tokens.shape}")
            kpm = check_token_mask("attention_mask", attention_mask, tokens.shape)
        else:
            kpm = None if attention_mask is None else np.asarray(attention_mask) == 0
        B, T = tokens.shape
        path = self.decode_path(B, T, state, last)
        if path in ("uncached", "window"):
            return self._window_step(tokens, kpm, state, last)
        real = None if kpm is None else ~kpm
        positions = (state.next_position[:, None] + np.arange(T)) if kpm is None else \
            _positions(real, state.next_position)
        n = state.length
        state.tokens[:, n:n + T] = tokens
        state.padding[:, n:n + T] = False if kpm is None else kpm
        if path == "composed":
            h, _ = self._forward(tokens, kpm, train=False, positions=positions, cache=state)
            logits = self.head.forward(self.params, h[:, -1:] if last else h, weights=self.quantized)
        elif path == "prompt":
            logits = get_ops().gpt2_decode_prompt(self.packed_weights(), tokens, positions, state.k, state.v,
                                                  state.padding, n)[:, None]
        else:  # "fused"
            logits = get_ops().gpt2_decode_step(self.packed_weights(), tokens[:, 0], positions[:, 0], state.k,
                                                state.v, state.padding, n)[:, None]
        state.length += T
        state.next_position += T if real is None else real.sum(axis=1)
        return logits

    def greedy_steps(self, ids, state, n, done=None, eos_id=None):
        """Feed ids (B,) and make up to n greedy tokens per row in one kernel call
        (ops.gpt2_decode_greedy), where the step would be "fused" and the window has room;
        rows in `done` (updated in place) get eos_id. Returns (tokens (B, m), whether the last
        column's choice was NaN), or None where this path does not run: the caller steps instead."""
        def run(*cache, n):
            tokens, nan = get_ops().gpt2_decode_greedy(*cache, n, eos_id, done)
            return tokens, nan, tokens.shape[1]  # the NaN's step is among them
        return self._fused_steps(ids, state, n, run)

    def sampled_steps(self, ids, state, n, rng, temperature, top_k=None, done=None, eos_id=None):
        """As greedy_steps, each token drawn from the logits at `temperature` (> 0) with top_k
        (ops.gpt2_decode_sampled): the uniform draws of the m <= n steps are rng.random((m, B)),
        the stream that m calls of rng.random(B) give. Returns (tokens (B, m), stuck): stuck None,
        or the logits (B, V) after the last token, which cannot be drawn from (the caller refuses
        them); None where this path does not run (no draw taken)."""
        def run(*cache, n):
            tokens, stuck = get_ops().gpt2_decode_sampled(*cache, rng.random((n, ids.shape[0])), temperature, top_k,
                                                          eos_id, done)
            return tokens, stuck, tokens.shape[1] + (stuck is not None)  # a stuck step was run too
        return self._fused_steps(ids, state, n, run)

    def _fused_steps(self, ids, state, n, run):
        """run(weights, ids, positions, k, v, padding, start, n=n) over the state for up to n new
        tokens -- (tokens (B, m), what else, the steps it ran) -- the state then advanced past the
        tokens it fed; (tokens, what else), or None (nothing run) where the step would not be
        "fused" or the window is full."""
        B = ids.shape[0]
        n = min(n, self.config.max_seq_len - state.length)
        if n < 1 or self.decode_path(B, 1, state) != "fused":
            return None
        start = state.length
        state.padding[:, start:start + n] = False  # the new tokens' positions
        tokens, other, ran = run(self.packed_weights(), ids, state.next_position, state.k, state.v, state.padding,
                                 start, n=n)
        state.tokens[:, start] = ids  # each step ran fed ids, then the tokens chosen before it
        state.tokens[:, start + 1:start + ran] = tokens[:, :ran - 1]
        state.length += ran
        state.next_position += ran
        return tokens, other

    def decode_path(self, B, T, state, last=False):
        """How `step` runs T new tokens in each of B rows over `state` (`last`: only the last
        position's logits are wanted) -- the one decision:

            "uncached"  the state keeps no cache (init_state(use_cache=False)): every step runs a
                        plain forward over the window, the reference for the cached paths
            "window"    the tokens would pass the context window: the last max_seq_len tokens
                        run again as one window from position 0, filling the cache anew
            "prompt"    a short prompt (T > 1, B * T up to FUSED_PROMPT_MAX_TOKENS of the weight
                        format) of which only the last logits are wanted, learned positions, few
                        rows, on a backend whose gpt2_decode_prompt takes one pass
                        (ops.prompt_in_one_pass): the whole model in one call, each weight
                        streamed once for all the tokens
            "composed"  a longer prompt, all of a prompt's logits, sinusoidal positions (the fused
                        kernels read learned rows, wpe, from the flat buffer), more than
                        FUSED_DECODE_MAX_ROWS rows, or a prompt on the NumPy reference: the
                        blocks' forward over the cache, whose matrix products batch over the
                        tokens on every BLAS thread
            "fused"     one token a row, learned positions, few rows: the whole model in one
                        gpt2_decode_step call, since at small batches the per-call cost dominates
        """
        if not state.use_cache:
            return "uncached"
        if state.length + T > self.config.max_seq_len:
            return "window"
        if self.pos_table is not None or B > FUSED_DECODE_MAX_ROWS:
            return "composed"
        if T > 1:
            one_pass = last and B * T <= FUSED_PROMPT_MAX_TOKENS[self.weight_format] and get_ops().prompt_in_one_pass
            return "prompt" if one_pass else "composed"
        return "fused"

    def _window_step(self, tokens, kpm, state, last=False):
        """The new tokens after the cached ones, cropped to the last max_seq_len, run as one
        window from position 0 (the cache is filled anew with it); `last` as in `step`."""
        Tmax, n = self.config.max_seq_len, state.length
        ids = np.concatenate([state.tokens[:, :n], tokens], axis=1)[:, -Tmax:]
        pad = np.concatenate([state.padding[:, :n], np.zeros(tokens.shape, bool) if kpm is None else kpm],
                             axis=1)[:, -Tmax:]
        state.reset()
        if state.use_cache:
            logits = self.step(ids, state, attention_mask=~pad, validate=False, last=last)
            return logits if last else logits[:, -tokens.shape[1]:]
        # no cache: the tokens are kept as history only, and the window runs a plain forward
        T = ids.shape[1]
        state.tokens[:, :T], state.padding[:, :T], state.length = ids, pad, T
        positions = _positions(~pad, np.zeros(ids.shape[0], np.int64))
        h, _ = self._forward(ids, pad if pad.any() else None, train=False, positions=positions)
        return self.head.forward(self.params, h[:, -1:] if last else h[:, -tokens.shape[1]:], weights=self.quantized)

    def decoding_matrices(self):
        return {**self.stack.matrices(self.params), **self.head.matrices(self.params)}

    def decode_layout(self):
        """The parameter names in the order of the fused decoding kernel's offsets table: each
        slot of kernels/ops/gpt2_decode.py named by GPT-2's parameter, per layer and then
        model-wide -- the one place the packed layout meets GPT-2's names."""
        from fastformer.kernels.ops import gpt2_decode as D  # here: it loads Numba, which import fastformer does not

        if self.embed.pos is None:
            raise FastformerError("the fused decoding kernel reads learned position rows (wpe); a model with "
                                  "model.positions=sinusoidal has none and decodes through the composed forward")
        names = []
        for (attn, ln_1), (mlp, ln_2) in self.layers:
            slots = {D.LN1_W: ln_1.weight, D.LN1_B: ln_1.bias, D.QKV_W: attn.qkv.weight, D.QKV_B: attn.qkv.bias,
                     D.ATTN_W: attn.proj.weight, D.ATTN_B: attn.proj.bias, D.LN2_W: ln_2.weight,
                     D.LN2_B: ln_2.bias, D.FC_W: mlp.fc.weight, D.FC_B: mlp.fc.bias, D.MLP_W: mlp.proj.weight,
                     D.MLP_B: mlp.proj.bias}
            names += [slots[i] for i in range(D.LAYER_SLOTS)]
        model = {D.WTE: self.embed.tok, D.WPE: self.embed.pos, D.LNF_W: self.stack.final.weight,
                 D.LNF_B: self.stack.final.bias, D.HEAD: self.head.weight}
        return names + [model[i] for i in range(D.MODEL_SLOTS)]

    def packed_weights(self):
        """The parameters as ops.gpt2_decode_step takes them: the flat buffer, read in place,
        and where each parameter of `decode_layout` starts in it (computed once); with quantised
        weights (`quantize`) their matrices packed together as well."""
        if self._packed is None:
            from fastformer.kernels.ops.gpt2_decode import PackedGPT2, is_matrix_slot, pack_quantized

            names = self.decode_layout()
            offsets = np.array([self.flat.offsets[n] for n in names], dtype=np.int64)
            quant = None
            if self.quantized is not None:  # the layers' matrices and the head are the keys of decoding_matrices
                L = self.config.n_layers
                quant = pack_quantized({i: self.quantized[n] for i, n in enumerate(names) if is_matrix_slot(i, L)}, L)
            self._packed = PackedGPT2(self.flat.data, offsets, self.config.vocab_size, self.config.d_ff, quant)
        return self._packed

    def quantize(self, weight_format):
        super().quantize(weight_format)
        self._packed = None  # packed again, with the new weights, at the next decoding step
        return self

    def generate(self, prompt_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None, seed=None,
                 eos_id=None, beam_size=1, **kwargs):
        """Prompt plus up to max_new_tokens new ids: (T0,) -> (T0 + n,) or (B, T0) -> (B, T0 + n),
        with a key/value cache. temperature 0 is greedy; beam_size > 1 is beam search (see
        fastformer.generation.search.beam_generate); see fastformer.generation.sampling.generate
        for top_k, top_p, seed, eos_id and the other options (repetition_penalty,
        attention_mask, prompts of different lengths, use_cache, length_penalty)."""
        from fastformer.generation.sampling import generate
        from fastformer.generation.search import beam_generate

        if beam_size != 1:
            if temperature or top_k is not None or top_p is not None:
                raise FastformerError("beam search is deterministic: give temperature, top_k and top_p only "
                                      "when beam_size is 1")
            return beam_generate(self, prompt_ids, max_new_tokens, beam_size, eos_id=eos_id, **kwargs)
        return generate(self, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        seed=seed, eos_id=eos_id, **kwargs)

    # ------------------------------------------------------------ interchange
    @classmethod
    def from_pretrained(cls, path, seed=0, dtype=np.float32):
        """Load a local Hugging Face GPT-2 directory (config.json + model.safetensors)."""
        from fastformer.models.hf import read_hf

        config, state = read_hf(path, dtype)
        model = cls(config, seed=seed, dtype=dtype)
        try:
            model.load_state_dict(state)
        except FastformerError as e:  # e.g. a config.json whose n_inner was lost: 4 n_embd, not the weights' size
            raise FastformerError(f"{path}: model.safetensors does not fit config.json: {e}") from None
        return model
