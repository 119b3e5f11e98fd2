"""Transformer blocks: each a forward/backward pair over named parameters of the flat buffer.

A block is a small frozen dataclass that knows the names of its parameters (a prefix of the
model's state dict) and their layout; it holds no arrays. `forward(P, ...)` reads the parameter
views `P` and returns (out, cache), the cache a NamedTuple of what the backward needs;
`backward(G, dout, cache)` writes the block's gradients into the gradient views `G` and returns
the gradient of its input. Every array operation goes through the kernel interface
(`get_ops()`), the matrix products included (`ops.linear_forward`, `ops.linear_backward`);
`fastformer.nn.layers` adds dropout and the head reshapes.

    Linear         x @ W + b, W stored (in, out) as GPT-2's Conv1D or (out, in) as torch.nn.Linear
    LayerNorm      a gain and a bias of C
    Embedding      tok[ids] * scale + pos[positions]  (learned rows or a fixed table), dropout
    SelfAttention  fused QKV -> multi-head attention (causal and/or key padding, or over a
                   KVCache while decoding) -> output projection
    CrossAttention queries from the decoder, keys/values from the encoder output (fused in_proj)
    FeedForward    Linear -> GELU (tanh or exact) or ReLU, bias fused in -> Linear
    Stack          sublayers with residual + layernorm, pre-LN or post-LN, and a final norm
    OutputHead     logits = h @ W.T (W tied to the token embedding or its own)

Inference may multiply by weights quantised once for it (`ops.quantize_weight`: fp32, bf16,
int8): `matrices(P)` of a block names each (n_in, n_out) matrix it multiplies by, a model
quantises them, and the forward that gets them in `Context.weights` (or `weights=` for the head)
runs those products with `ops.linear_quantized`. Such a forward keeps no cache: inference only.

Shape letters: B batch, T (or L) sequence, S source, C width, F hidden, H heads, hs head size,
V vocabulary.
"""

from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np

from fastformer.kernels import get_ops
from fastformer.nn.layers import dropout_backward, dropout_forward, merge_heads, split_heads


# ------------------------------------------------------------------ parameters
@dataclass(frozen=True)
class Linear:
    """A weight (n_in -> n_out) and an optional bias. `transposed`: stored (out, in)."""

    weight: str
    bias: Optional[str]
    n_in: int
    n_out: int
    transposed: bool = False

    def shapes(self):
        w = (self.n_out, self.n_in) if self.transposed else (self.n_in, self.n_out)
        return {self.weight: w, **({self.bias: (self.n_out,)} if self.bias else {})}

    def w(self, P):
        """The (n_in, n_out) view of the weight in `P` (parameters or gradients)."""
        return P[self.weight].T if self.transposed else P[self.weight]

    def b(self, P):
        return P[self.bias] if self.bias else None


def _quantized(lin, weights, key=None):
    """The quantised weight of the Linear `lin` in `weights` (under `key`, default its weight's
    name), or None: it multiplies in float32."""
    return weights.get(key or lin.weight) if weights else None


def _linear(lin, P, x, weights, bias=True, key=None):
    """(x @ W (+ b), LinearCache) of the Linear `lin`; with its quantised weight in `weights`
    (`_quantized`) the product of ops.linear_quantized and no cache."""
    ops = get_ops()
    b = lin.b(P) if bias else None
    qw = _quantized(lin, weights, key)
    if qw is not None:
        return ops.linear_quantized(x, qw, b), None
    return ops.linear_forward(x, lin.w(P), b)


@dataclass(frozen=True)
class LayerNorm:
    prefix: str  # names prefix + ".weight", prefix + ".bias"
    C: int

    @property
    def weight(self):
        return self.prefix + ".weight"

    @property
    def bias(self):
        return self.prefix + ".bias"

    def shapes(self):
        return {self.weight: (self.C,), self.bias: (self.C,)}


# ------------------------------------------------------------------- embedding
def sinusoidal_table(n_positions, C, dtype=np.float32):
    """The fixed position table of the original paper: pe[t, 2i] = sin(t / 10000^(2i/C)),
    pe[t, 2i+1] = cos(t / 10000^(2i/C)). Returns (n_positions, C)."""
    t = np.arange(n_positions, dtype=np.float64)[:, None]  # (N, 1)
    inv_freq = 10000.0 ** (-np.arange(0, C, 2, dtype=np.float64) / C)  # (C/2,)
    pe = np.zeros((n_positions, C))
    pe[:, 0::2] = np.sin(t * inv_freq)
    pe[:, 1::2] = np.cos(t * inv_freq)
    return pe.astype(dtype)



class EmbeddingCache(NamedTuple):
    ids: tuple  # the token gather's cache
    mask: Optional[np.ndarray]  # dropout mask or None
    T: int  # rows of the position table used: [0, T)


@dataclass(frozen=True)
class Embedding:
    """x = tok[ids] * scale + pos[positions], then dropout. `pos` names learned rows; without
    it the caller passes a fixed table. `scale` None multiplies by nothing (GPT-2)."""

    tok: str
    V: int
    C: int
    pos: Optional[str] = None
    n_positions: int = 0
    scale: Optional[float] = None

    def shapes(self):
        return {self.tok: (self.V, self.C), **({self.pos: (self.n_positions, self.C)} if self.pos else {})}

    def forward(self, P, ids, positions=None, table=None, drop=0.0, rng=None):
        """ids (B, T). positions: None (0..T-1), an int start (start..start+T-1 for every row)
        or an int array (B, T). Returns (x (B, T, C), EmbeddingCache)."""
        T = ids.shape[1]
        tok, emb_c = get_ops().embedding_forward(P[self.tok], ids)  # (B, T, C)
        rows = P[self.pos] if self.pos else table
        if positions is None:
            pos = rows[:T]
        elif isinstance(positions, (int, np.integer)):
            pos = rows[positions:positions + T]
        else:
            pos = rows[positions]
        if self.scale is not None:
            tok = tok * tok.dtype.type(self.scale)
        x, mask = dropout_forward(tok + pos, drop, rng)
        return x, EmbeddingCache(emb_c, mask, T)

    def backward(self, G, dx, cache, zero_tok=True):
        """Writes the position gradient (training starts at position 0) and adds the token
        gradient into G[tok], zeroed first unless `zero_tok` is False (a tied head wrote there)."""
        # forward: x = dropout(tok[ids] * scale + pos[:T])
        dx = dropout_backward(dx, cache.mask)
        if self.pos:
            dpos = G[self.pos]
            dpos[...] = 0.0
            dx.sum(axis=0, out=dpos[:cache.T])
        if zero_tok:
            G[self.tok][...] = 0.0
        if self.scale is not None:
            dx = dx * dx.dtype.type(self.scale)
        get_ops().embedding_backward(dx, cache.ids, dweight=G[self.tok])


# ------------------------------------------------------------------- attention
class Context(NamedTuple):
    """What the sublayers of a stack read besides their input: the key-padding mask of the
    stack's own sequence, the encoder output (training) or a decoding KVCache."""

    kpm: Optional[np.ndarray] = None  # (B, T) True at padding
    memory: Optional[np.ndarray] = None  # (B, S, C) encoder output, for cross-attention
    memory_kpm: Optional[np.ndarray] = None  # (B, S) True at source padding
    cache: object = None  # a KVCache while decoding
    weights: Optional[dict] = None  # quantised weights by the keys of the blocks' `matrices` (inference)


class AttentionCache(NamedTuple):
    qkv: tuple  # linear cache of the fused projection
    att: Optional[tuple]  # attention kernel cache (None while decoding)
    proj: tuple  # linear cache of the output projection


@dataclass(frozen=True)
class SelfAttention:
    """Multi-head self-attention with a fused QKV projection, [q | k | v] along its output."""

    qkv: Linear  # C -> 3C
    proj: Linear  # C -> C
    n_heads: int
    causal: bool
    layer: int = 0  # this layer's slot in a KVCache

    def shapes(self):
        return {**self.qkv.shapes(), **self.proj.shapes()}

    def matrices(self, P):
        return {self.qkv.weight: self.qkv.w(P), self.proj.weight: self.proj.w(P)}

    def forward(self, P, h, ctx):
        """h (B, T, C) -> (o (B, T, C), AttentionCache). With ctx.cache the new keys and values
        are appended to the cache and the queries attend to every cached position."""
        ops = get_ops()
        qkv, qkv_c = _linear(self.qkv, P, h, ctx.weights)  # (B, T, 3C)
        kv = ctx.cache
        if kv is None:
            a, att_c = ops.attention_qkv_forward(qkv, self.n_heads, causal=self.causal, key_padding_mask=ctx.kpm)
        else:  # inference only: no backward
            a, att_c = ops.attention_cached(qkv, kv.k[self.layer], kv.v[self.layer], kv.length, self.n_heads,
                                            kv.padding), None
        o, proj_c = _linear(self.proj, P, a, ctx.weights)  # (B, T, C)
        return o, AttentionCache(qkv_c, att_c, proj_c)

    def backward(self, G, do, cache):
        ops = get_ops()
        # o = a @ W_proj + b_proj
        da = ops.linear_backward(do, cache.proj, self.proj.w(G), self.proj.b(G))  # (B, T, C)
        # a = attention(split(qkv))
        dqkv = ops.attention_qkv_backward(da, cache.att)  # (B, T, 3C)
        # qkv = h @ W_qkv + b_qkv
        return ops.linear_backward(dqkv, cache.qkv, self.qkv.w(G), self.qkv.b(G))


QUERY_PART = "[q]"  # after a cross-attention's fused weight name: the key of its query columns


class CrossAttentionCache(NamedTuple):
    q: tuple
    att: tuple
    proj: tuple
    kv: Optional[tuple]  # linear cache of the keys/values projection (None while decoding)


@dataclass(frozen=True)
class CrossAttention:
    """Queries from the decoder, keys and values from the encoder output, through one fused
    projection whose first C outputs are q and the other 2C are k and v (torch's in_proj)."""

    qkv: Linear  # C -> 3C
    proj: Linear  # C -> C
    n_heads: int
    layer: int = 0  # this layer's slot in a KVCache's cross keys/values
    reads_memory = True  # the stack collects the gradient of the encoder output

    def shapes(self):
        return {**self.qkv.shapes(), **self.proj.shapes()}

    def matrices(self, P):
        """The query part of the fused projection under its own key (the keys and values are
        projected once per source, by kv_forward, in float32)."""
        return {self.qkv.weight + QUERY_PART: self._parts(P)[0][0], self.proj.weight: self.proj.w(P)}

    def _parts(self, P):
        C = self.qkv.n_in
        W, b = self.qkv.w(P), self.qkv.b(P)  # (C, 3C), (3C,)
        return (W[:, :C], b[:C]), (W[:, C:], b[C:])

    def kv_forward(self, P, memory):
        """Keys and values (B, H, S, hs) of the encoder output memory (B, S, C), and the cache
        of their projection."""
        _, (Wkv, bkv) = self._parts(P)
        kv, kv_c = get_ops().linear_forward(memory, Wkv, bkv)  # (B, S, 2C)
        k, v = split_heads(kv, 2, self.n_heads)
        return k, v, kv_c

    def forward(self, P, h, ctx):
        ops = get_ops()
        (Wq, bq), _ = self._parts(P)
        qw = ctx.weights.get(self.qkv.weight + QUERY_PART) if ctx.weights else None
        if qw is not None:
            q, q_c = ops.linear_quantized(h, qw, bq), None
        else:
            q, q_c = ops.linear_forward(h, Wq, bq)  # (B, T, C)
        if ctx.cache is not None:
            k, v, kv_c = ctx.cache.cross_k[self.layer], ctx.cache.cross_v[self.layer], None
        else:
            k, v, kv_c = self.kv_forward(P, ctx.memory)
        a, att_c = ops.attention_forward(split_heads(q, 1, self.n_heads)[0], k, v, causal=False,
                                               key_padding_mask=ctx.memory_kpm)
        o, proj_c = _linear(self.proj, P, merge_heads(a), ctx.weights)
        return o, CrossAttentionCache(q_c, att_c, proj_c, kv_c)

    def backward(self, G, do, cache):
        """Returns (dh, dmemory)."""
        ops = get_ops()
        # o = merge(a) @ W_proj + b_proj
        da = ops.linear_backward(do, cache.proj, self.proj.w(G), self.proj.b(G))
        # a = attention(q, k, v, key_padding_mask=memory_kpm)
        dq, dk, dv = ops.attention_backward(split_heads(da, 1, self.n_heads)[0], cache.att)
        (Wq, bq), (Wkv, bkv) = self._parts(G)
        # q = h @ W_q + b_q
        dh = ops.linear_backward(merge_heads(dq), cache.q, Wq, bq)
        # kv = memory @ W_kv + b_kv
        dmem = ops.linear_backward(merge_heads(np.stack((dk, dv))), cache.kv, Wkv, bkv)
        return dh, dmem


# ---------------------------------------------------------------- feed-forward
ACTIVATION_FORMS = ("gelu_tanh", "gelu", "relu")


class FeedForwardCache(NamedTuple):
    fc: tuple
    act: tuple
    proj: tuple


@dataclass(frozen=True)
class FeedForward:
    """proj(act(h @ W_fc + b_fc)): the first bias is fused into the activation kernel."""

    fc: Linear  # C -> F
    proj: Linear  # F -> C
    activation: str  # one of ACTIVATION_FORMS

    def shapes(self):
        return {**self.fc.shapes(), **self.proj.shapes()}

    def matrices(self, P):
        return {self.fc.weight: self.fc.w(P), self.proj.weight: self.proj.w(P)}

    def forward(self, P, h, ctx=None):
        ops = get_ops()
        weights = ctx.weights if ctx is not None else None
        form = "tanh" if self.activation == "gelu_tanh" else "none"
        if self.activation != "relu" and _quantized(self.fc, weights) is None:
            # g = gelu(h @ W_fc + b_fc) in one op, which a backend may fuse; its caches are those below
            g, (fc_c, act_c) = ops.linear_gelu_forward(h, self.fc.w(P), self.fc.b(P), approximate=form)
        else:
            f, fc_c = _linear(self.fc, P, h, weights, bias=False)  # (B, T, F)
            if self.activation == "relu":
                g, act_c = ops.relu_forward(f, self.fc.b(P))
            else:
                g, act_c = ops.gelu_forward(f, self.fc.b(P), approximate=form)
        m, proj_c = _linear(self.proj, P, g, weights)  # (B, T, C)
        return m, FeedForwardCache(fc_c, act_c, proj_c)

    def backward(self, G, dm, cache):
        ops = get_ops()
        # m = g @ W_proj + b_proj
        dg = ops.linear_backward(dm, cache.proj, self.proj.w(G), self.proj.b(G))
        # g = act(f + b_fc)
        act_backward = ops.relu_backward if self.activation == "relu" else ops.gelu_backward
        df, G[self.fc.bias][...] = act_backward(dg, cache.act)
        # f = h @ W_fc
        return ops.linear_backward(df, cache.fc, self.fc.w(G))


# ------------------------------------------------------ residual + layernorm
class SublayerCache(NamedTuple):
    branch: tuple  # the sublayer block's cache
    mask: Optional[np.ndarray]  # dropout mask of its output
    norm: tuple  # cache of the residual+layernorm that follows it
    norm_name: LayerNorm  # which norm that was


class StackCache(NamedTuple):
    first: Optional[tuple]  # pre-LN: cache of the first sublayer's norm
    sublayers: list  # [SublayerCache] in order
    final: Optional[tuple]  # post-LN: cache of the final norm


@dataclass(frozen=True)
class Stack:
    """Sublayers (block, its norm) with residual connections, and a final norm.

    pre-LN (norm_first):  x = x + block(norm(x)) for each sublayer, then h = final(x); every
        residual add is fused with the norm that reads it next (`residual_layernorm_forward`),
        so the stream x and the next sublayer's input h come out of one kernel call.
    post-LN:              x = norm(x + block(x)) for each sublayer, then h = final(x).
    """

    sublayers: tuple  # ((block, LayerNorm), ...)
    final: LayerNorm
    norm_first: bool = True

    def matrices(self, P):
        """{key: (n_in, n_out) view} of every matrix the sublayers multiply by."""
        return {k: w for block, _ in self.sublayers for k, w in block.matrices(P).items()}

    def forward(self, P, x, ctx, drop=0.0, rng=None):
        """x (B, T, C) -> (h (B, T, C), StackCache)."""
        ops = get_ops()
        first_c = final_c = None
        if self.norm_first:
            n0 = self.sublayers[0][1]
            h, first_c = ops.layernorm_forward(x, P[n0.weight], P[n0.bias])
        else:
            h = x
        caches = []
        for j, (block, norm) in enumerate(self.sublayers):
            b, bc = block.forward(P, h, ctx)
            b, mask = dropout_forward(b, drop, rng)
            if self.norm_first:  # x = x + b, and h = the next sublayer's norm of it
                nxt = self.sublayers[j + 1][1] if j + 1 < len(self.sublayers) else self.final
                (x, h), lc = ops.residual_layernorm_forward(x, b, P[nxt.weight], P[nxt.bias])
            else:  # x = norm(x + b), and the next sublayer reads x itself
                nxt = norm
                (_, x), lc = ops.residual_layernorm_forward(x, b, P[nxt.weight], P[nxt.bias])
                h = x
            caches.append(SublayerCache(bc, mask, lc, nxt))
        if not self.norm_first:
            h, final_c = ops.layernorm_forward(x, P[self.final.weight], P[self.final.bias])
        return h, StackCache(first_c, caches, final_c)

    def backward(self, G, dh, cache):
        """Gradient of the stack's input from that of its output; writes every gradient of
        the stack. Returns (dx, dmemory), dmemory None when no sublayer reads the memory."""
        ops = get_ops()
        if not self.norm_first:
            # h = final(x)
            dh, G[self.final.weight][...], G[self.final.bias][...] = ops.layernorm_backward(dh, cache.final)
        ds, dmem = None, None  # ds: the gradient along the residual stream
        for (block, _), sc in zip(reversed(self.sublayers), reversed(cache.sublayers)):
            if self.norm_first:
                # (x, h) = (x + b, norm_next(x + b)): x and h are two outputs
                dsum, dw, db = ops.residual_layernorm_backward(dh, ds, sc.norm)
            else:
                # x = h = norm(x + b): one output read twice, by the next sublayer and the residual
                dsum, dw, db = ops.residual_layernorm_backward(dh if ds is None else dh + ds, None, sc.norm)
            G[sc.norm_name.weight][...], G[sc.norm_name.bias][...] = dw, db
            ds = dsum
            dbranch = dropout_backward(dsum, sc.mask)
            if getattr(block, "reads_memory", False):
                dh, dm = block.backward(G, dbranch, sc.branch)
                dmem = dm if dmem is None else dmem + dm
            else:
                dh = block.backward(G, dbranch, sc.branch)
        if self.norm_first:
            # h = norm_first_sublayer(x)
            n0 = self.sublayers[0][1]
            dx, G[n0.weight][...], G[n0.bias][...] = ops.layernorm_backward(dh, cache.first)
            return dx + ds, dmem
        return dh + ds, dmem


# ----------------------------------------------------------------- output head
@dataclass(frozen=True)
class OutputHead:
    """logits = h @ W.T with W (V, C): the token embedding when tied, else its own weight.
    Training and evaluation never make the logits: `loss` and `loss_and_grads` run the head and
    the cross-entropy together over row chunks (ops.linear_cross_entropy_forward)."""

    weight: str
    V: int
    C: int
    own: bool  # the weight is this head's own parameter (untied)

    def shapes(self):
        return {self.weight: (self.V, self.C)} if self.own else {}

    def matrices(self, P):
        return {self.weight: P[self.weight].T}

    def forward(self, P, h, out=None, weights=None):
        """h (B, T, C) -> logits (B, T, V), for inference; `out` (B, T, V) receives them.
        `weights`: quantised weights, which may hold the head's (`matrices`)."""
        qw = weights.get(self.weight) if weights else None
        if qw is not None:
            return get_ops().linear_quantized(h, qw, out=out)
        return get_ops().linear_forward(h, P[self.weight].T, out=out)[0]

    def loss(self, P, h, targets, weights=None):
        """Mean cross-entropy of the logits of h (B, T, C) against targets (B, T) (-100 ignored);
        with the head's quantised weight in `weights`, from the logits of its product."""
        if weights and self.weight in weights:
            return get_ops().cross_entropy_forward(self.forward(P, h, weights=weights), targets)[0]
        return get_ops().linear_cross_entropy_forward(h, P[self.weight], targets)[0]

    def loss_and_grads(self, G, P, h, targets):
        """(loss, dh (B, T, C)) of `loss`; writes (untied) or overwrites (tied: the embedding's
        backward adds to it) G[weight]."""
        loss, cache = get_ops().linear_cross_entropy_forward(h, P[self.weight], targets, grad=True,
                                                             dweight=G[self.weight])
        return loss, cache[0]
