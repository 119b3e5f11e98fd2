"""Every block's backward against central finite differences in float64, on both backends:
the gradient of a random projection of the block's output, with respect to every parameter and
to the block's inputs. Also the key/value cache and the parameter layouts."""

import numpy as np
import pytest
from conftest import numerical_grad

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
from fastformer.nn.params import FlatParams

B, T, S, C, H, F, V = 2, 4, 3, 8, 2, 6, 7
TOL = dict(rtol=1e-6, atol=1e-8)


def params_for(*blocks):
    shapes = {}
    for b in blocks:
        shapes.update(b.shapes())
    flat = FlatParams(shapes, decay=set(), dtype=np.float64)
    flat.data[:] = np.random.default_rng(0).normal(0, 0.5, flat.size)
    return flat


def attn_parts(p, transposed):
    return (Linear(p + "qkv.weight", p + "qkv.bias", C, 3 * C, transposed),
            Linear(p + "proj.weight", p + "proj.bias", C, C, transposed))


def check(flat, run, inputs):
    """run() -> (scalar loss, analytic grads of `inputs`), after writing parameter grads into flat.grad."""
    _, grads = run()
    analytic = flat.grad.copy()
    numeric = numerical_grad(lambda: run()[0], flat.data)
    np.testing.assert_allclose(analytic, numeric, **TOL)
    for x, g in zip(inputs, grads):
        np.testing.assert_allclose(g, numerical_grad(lambda: run()[0], x), **TOL)


def projection(shape, seed=1):
    return np.random.default_rng(seed).normal(size=shape)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("causal, padded", [(True, False), (False, True)])
def test_self_attention(backend, transposed, causal, padded):
    block = SelfAttention(*attn_parts("a.", transposed), H, causal=causal)
    flat = params_for(block)
    h = projection((B, T, C), 2)
    kpm = np.zeros((B, T), bool)
    kpm[1, -1] = padded
    w = projection((B, T, C))

    def run():
        o, cache = block.forward(flat.params, h, Context(kpm=kpm if padded else None))
        return (o * w).sum(), [block.backward(flat.grads, w, cache)]

    check(flat, run, [h])


def test_cross_attention(backend):
    block = CrossAttention(*attn_parts("x.", True), H)
    flat = params_for(block)
    h, memory = projection((B, T, C), 2), projection((B, S, C), 3)
    mkpm = np.array([[False, False, True], [False, False, False]])
    w = projection((B, T, C))

    def run():
        o, cache = block.forward(flat.params, h, Context(memory=memory, memory_kpm=mkpm))
        return (o * w).sum(), block.backward(flat.grads, w, cache)

    check(flat, run, [h, memory])


@pytest.mark.parametrize("activation", ["gelu_tanh", "gelu", "relu"])
def test_feed_forward(backend, activation):
    block = FeedForward(Linear("f.w1", "f.b1", C, F, True), Linear("f.w2", "f.b2", F, C, True), activation)
    flat = params_for(block)
    h, w = projection((B, T, C), 2), projection((B, T, C))

    def run():
        m, cache = block.forward(flat.params, h)
        return (m * w).sum(), [block.backward(flat.grads, w, cache)]

    check(flat, run, [h])


@pytest.mark.parametrize("learned, scale", [(True, None), (False, 2.0)])
def test_embedding(backend, learned, scale):
    block = Embedding("tok", V, C, "pos" if learned else None, 5, scale=scale)
    flat = params_for(block)
    ids = np.array([[1, 6, 1, 0], [3, 3, 2, 5]])
    table = None if learned else sinusoidal_table(5, C, np.float64)
    w = projection((B, T, C))

    def run():
        x, cache = block.forward(flat.params, ids, table=table)
        block.backward(flat.grads, w, cache)
        return (x * w).sum(), []

    check(flat, run, [])
    x, _ = block.forward(flat.params, ids, positions=1, table=table)  # an int start: rows 1..T
    rows = flat.params["pos"] if learned else table
    np.testing.assert_allclose(x, flat.params["tok"][ids] * (scale or 1.0) + rows[1:1 + T])


@pytest.mark.parametrize("norm_first", [True, False])
def test_stack_with_cross_attention(backend, norm_first):
    """A decoder-like stack (self-attention, cross-attention, feed-forward) with its norms."""
    subs = ((SelfAttention(*attn_parts("s.", True), H, causal=True), LayerNorm("n1", C)),
            (CrossAttention(*attn_parts("c.", True), H), LayerNorm("n2", C)),
            (FeedForward(Linear("f.w1", "f.b1", C, F), Linear("f.w2", "f.b2", F, C), "gelu"), LayerNorm("n3", C)))
    stack = Stack(subs, LayerNorm("final", C), norm_first)
    flat = params_for(*[b for b, _ in subs], *[n for _, n in subs], stack.final)
    x, memory = projection((B, T, C), 2), projection((B, S, C), 3)
    w = projection((B, T, C))

    def run():
        h, cache = stack.forward(flat.params, x, Context(memory=memory))
        dx, dmem = stack.backward(flat.grads, w, cache)
        return (h * w).sum(), [dx, dmem]

    check(flat, run, [x, memory])


def test_output_head(backend):
    """The head's fused loss and gradients (its weight and h), and its loss equals the
    cross-entropy of its inference logits."""
    head = OutputHead("head", V, C, own=True)
    flat = params_for(head)
    h = projection((B, T, C), 2)
    targets = np.random.default_rng(3).integers(0, V, size=(B, T))
    targets[0, 1] = -100

    def run():
        loss, dh = head.loss_and_grads(flat.grads, flat.params, h, targets)
        return loss, [dh]

    check(flat, run, [h])
    logits = head.forward(flat.params, h)
    lse = np.log(np.exp(logits).sum(-1))
    kept = targets != -100
    expected = (lse - np.take_along_axis(logits, np.where(kept, targets, 0)[..., None], -1)[..., 0])[kept].mean()
    np.testing.assert_allclose(head.loss(flat.params, h, targets), expected, rtol=1e-12)


def test_cached_self_attention_equals_full(backend):
    """Feeding tokens through a KVCache in pieces gives the outputs of one causal pass."""
    block = SelfAttention(*attn_parts("a.", False), H, causal=True)
    flat = params_for(block)
    h = projection((B, T, C), 2)
    full, _ = block.forward(flat.params, h, Context())
    cache = KVCache(1, B, H, 6, C // H, np.float64)
    parts = []
    for lo, hi in ((0, 2), (2, 3), (3, 4)):
        o, _ = block.forward(flat.params, h[:, lo:hi], Context(cache=cache))
        cache.length = hi
        parts.append(o)
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, rtol=1e-12, atol=1e-12)


def test_linear_layouts_share_one_view():
    io, oi = Linear("w", "b", 3, 5), Linear("w", "b", 3, 5, transposed=True)
    assert io.shapes() == {"w": (3, 5), "b": (5,)} and oi.shapes() == {"w": (5, 3), "b": (5,)}
    P = {"w": np.arange(15.0).reshape(5, 3)}
    assert oi.w(P).shape == (3, 5) and np.shares_memory(oi.w(P), P["w"])


def test_cache_reorder_gathers_cross_keys_only_across_sources():
    cache = KVCache(1, 4, 1, 3, 2)
    cache.k[...] = np.arange(4)[None, :, None, None, None]
    cache.cross_k = np.arange(4.0)[None, :, None, None, None] * np.ones((1, 4, 1, 2, 2))
    cache.cross_v = cache.cross_k.copy()
    cache.source = np.array([0, 0, 1, 1])
    cache.length = 2
    cache.reorder([1, 0, 3, 3])  # beams within their sources: the cross keys are left as they are
    assert cache.cross_k[0, :, 0, 0, 0].tolist() == [0, 1, 2, 3] and cache.k[0, :, 0, 0, 0].tolist() == [1, 0, 3, 3]
    cache.reorder([2, 2, 0, 1])  # rows move to other sources: their cross keys come along
    assert cache.cross_k[0, :, 0, 0, 0].tolist() == [2, 2, 0, 1] and cache.source.tolist() == [1, 1, 0, 0]
