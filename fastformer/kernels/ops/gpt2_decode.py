"""One GPT-2 decoding step fused into one call, and the one home of its packed layout.

At batch 1 a decoding step is a chain of matrix-vector products over weights that fit in the L3
cache, so the forty-odd kernel calls of the composed path cost more in Python than in arithmetic.
`gpt2_decode_step` runs a whole step -- embedding, L pre-LN blocks (causal attention over the
key/value cache, GELU-tanh MLP), ln_f and the LM head -- for one new token per row, reading every
weight in place from the model's flat parameter buffer through a table of offsets.

The layout of that table is named here once: the slot constants below are what the kernel, the
checks, the reference and the model (TransformerLM.decode_layout) all index it with. Per layer,
LAYER_SLOTS entries in the order of the constants, then the model-wide ones; matrices are stored
(in, out). The model names its own parameters for each slot; this module knows shapes, not names.

Inference weights (quantized.py): with `PackedGPT2.quant` (a QuantizedGPT2) the four matrices of
each layer and the head are multiplied in bf16 or int8 from one buffer of packed words (scales
and corrections in two more), each slot's start in `qoffsets` (-1 for the slots that are not
matrices; the head's is its (C, V) transpose); the layernorms, biases, attention and embeddings
stay float32 in `flat`. Each format is its own kernel (a copy of the same loops with the format's
product), so a float32 step never compiles an instruction the CPU may lack.

Shapes: L layers, C width, F hidden, V vocabulary, Tmax positions, B rows, H heads, hs head size;
caches (L, B, H, Tmax, hs).
"""

import functools
import math
import types as pytypes
from collections import namedtuple

import numpy as np

from fastformer.errors import FastformerError, check_int, is_int
from fastformer.kernels._jit import compile_float64, function, inline, jit_writable, kernel, numba, row_max
from fastformer.kernels._sync import (
    MAX_CHUNKS,
    chunk_at,
    chunk_span,
    claim,
    finish,
    new_sync,
    run_together,
    stage_chunks,
    stage_open,
    wait_stage,
)
from fastformer.kernels._tiles import prefetch_span, tiles_run, weighted_rows32, weighted_rows64
from fastformer.kernels.checks import FLOAT_DTYPES, aligned, as_int_array, check_eps, describe, kernel_array, quiet
from fastformer.kernels.ops.activations import _gelu
from fastformer.kernels.ops.attention import _softmax_row
from fastformer.kernels.ops.layernorm import layernorm, normalize_row
from fastformer.kernels.ops.quantized import (
    GROUP_N,
    PREFETCH_WORDS,
    TILE_ROWS,
    QuantizedWeight,
    bf16_product,
    groups,
    int8_product,
    pack_rows_bf16,
    quantize_rows_u8,
    require_format,
    words_per_row,
)
from fastformer.kernels.ops.sampling import check_sampling_options, samplable, sample_row, uniform_draws
from fastformer.kernels.tasks import run_tasks, task_threads

if numba is not None:
    from numba import types as nb_types
    from numba.extending import overload

# each layer's slots, in this order              shape
LN1_W, LN1_B = 0, 1                              # (C,), (C,)       the attention's layernorm
QKV_W, QKV_B = 2, 3                              # (C, 3C), (3C,)   the fused q, k, v projection
ATTN_W, ATTN_B = 4, 5                            # (C, C), (C,)     the attention's output projection
LN2_W, LN2_B = 6, 7                              # (C,), (C,)       the MLP's layernorm
FC_W, FC_B = 8, 9                                # (C, F), (F,)     the MLP's hidden layer
MLP_W, MLP_B = 10, 11                            # (F, C), (C,)     the MLP's output layer
LAYER_SLOTS = 12
# after the L layers' slots, at L * LAYER_SLOTS + ...
WTE, WPE, LNF_W, LNF_B, HEAD = 0, 1, 2, 3, 4     # (V, C), (Tmax, C), (C,), (C,), (V, C)
MODEL_SLOTS = 5

# The weights of gpt2_decode_step: `flat` the 1-D parameter buffer, `offsets` (L * LAYER_SLOTS +
# MODEL_SLOTS,) int64 where each slot's array starts in it (the head may be the token embedding
# again, when tied).
PackedGPT2 = namedtuple("PackedGPT2", "flat offsets vocab_size d_ff quant", defaults=(None,))
# The matrices in bf16 or int8 (None: float32, read from flat): `qoffsets` (slots, 2) int64, the
# start of each matrix slot's words and of its scales / corrections, -1 for the other slots.
QuantizedGPT2 = namedtuple("QuantizedGPT2", "format words scales corrections qoffsets")
MATRIX_SLOTS = (QKV_W, ATTN_W, FC_W, MLP_W)  # of each layer; and the model's HEAD


def is_matrix_slot(i, L):
    return i == L * LAYER_SLOTS + HEAD if i >= L * LAYER_SLOTS else i % LAYER_SLOTS in MATRIX_SLOTS


def pack_quantized(slots, L):
    """A QuantizedGPT2 of the QuantizedWeights `slots` ({slot index: weight}, one per matrix slot
    of L layers and the head: (in, out) for the layers' matrices, (C, V) for the head)."""
    n = L * LAYER_SLOTS + MODEL_SLOTS
    fmt = {q.format for q in slots.values()}
    if len(fmt) != 1 or sorted(slots) != [i for i in range(n) if is_matrix_slot(i, L)]:
        raise FastformerError(f"quantised decoding weights must hold one format's weight for each of the "
                              f"{4 * L + 1} matrix slots, got formats {sorted(fmt)} for {len(slots)} slots")
    qoffsets = np.full((n, 2), -1, np.int64)
    words, scales, corrections, w_at, s_at = [], [], [], 0, 0
    for i in sorted(slots):
        q = slots[i]
        qoffsets[i] = w_at, s_at
        words.append(q.words)
        scales.append(q.scale)
        corrections.append(q.correction)
        w_at += q.words.size
        s_at += q.scale.size
    return QuantizedGPT2(fmt.pop(), np.concatenate(words), np.concatenate(scales), np.concatenate(corrections),
                         qoffsets)


@functools.lru_cache(maxsize=16)
def gpt2_param_shapes(L, C, F, V, Tmax):
    """The shape of each slot, in the order of PackedGPT2.offsets, and their sizes."""
    layer = [None] * LAYER_SLOTS
    layer[LN1_W] = layer[LN1_B] = layer[ATTN_B] = layer[LN2_W] = layer[LN2_B] = layer[MLP_B] = (C,)
    layer[QKV_W], layer[QKV_B], layer[ATTN_W] = (C, 3 * C), (3 * C,), (C, C)
    layer[FC_W], layer[FC_B], layer[MLP_W] = (C, F), (F,), (F, C)
    model = [None] * MODEL_SLOTS
    model[WTE], model[WPE], model[LNF_W], model[LNF_B], model[HEAD] = (V, C), (Tmax, C), (C,), (C,), (V, C)
    shapes = tuple(layer * L + model)
    return shapes, np.array([math.prod(s) for s in shapes])


# ------------------------------------------------------------------- checks
@functools.lru_cache(maxsize=64)
def _offsets_inside(offsets_bytes, dims, flat_size):
    """Whether every parameter at these offsets (int64 bytes) lies inside a flat buffer of
    flat_size values. Cached on the bytes themselves: a decoding loop passes the same table
    every token, and a changed table is a new key."""
    offsets = np.frombuffer(offsets_bytes, dtype=np.int64)
    return bool(offsets.min() >= 0 and (offsets + gpt2_param_shapes(*dims)[1]).max() <= flat_size)


def _check_packed(weights, k_cache, v_cache):
    """Validate the weights and caches of the decoding ops: returns (flat, offsets int64, shapes, dims)."""
    if not all(hasattr(weights, f) for f in ("flat", "offsets", "vocab_size", "d_ff")):
        raise FastformerError(f"weights must be a PackedGPT2 (flat, offsets, vocab_size, d_ff), got "
                              f"{type(weights).__name__}")
    flat = np.asarray(weights.flat)
    if flat.ndim != 1 or flat.dtype not in FLOAT_DTYPES or not flat.flags.c_contiguous:
        raise FastformerError(f"weights.flat must be a contiguous 1-D float32/float64 array, got {flat.dtype} "
                              f"{flat.shape}")
    flat = aligned(flat)
    V = check_int("weights.vocab_size", weights.vocab_size)
    d_ff = check_int("weights.d_ff", weights.d_ff)
    if not all(isinstance(c, np.ndarray) and c.ndim == 5 and c.dtype == flat.dtype and c.flags.c_contiguous
               and c.flags.writeable for c in (k_cache, v_cache)) or k_cache.shape != v_cache.shape:
        raise FastformerError(f"k_cache and v_cache must be contiguous {flat.dtype} arrays (L, B, H, Tmax, hs), "
                              f"writeable and of one shape, got {describe(k_cache)} and {describe(v_cache)}")
    L, B, H, Tmax, hs = k_cache.shape
    if H == 0 or hs == 0:
        raise FastformerError(f"k_cache and v_cache must have H >= 1 heads of size hs >= 1, got {k_cache.shape}")
    dims = (L, H * hs, d_ff, V, Tmax)
    shapes, _ = gpt2_param_shapes(*dims)
    offsets = as_int_array(weights.offsets, "weights.offsets")
    if offsets.shape != (len(shapes),) or not _offsets_inside(offsets.tobytes(), dims, flat.size):
        raise FastformerError(f"weights.offsets must hold {len(shapes)} offsets of parameters that lie inside "
                              f"weights.flat ({flat.size} values) for L={L}, C={H * hs}, F={d_ff}, "
                              f"V={V}, Tmax={Tmax}")
    return flat, offsets, shapes, dims


def check_gpt2_decode(weights, ids, positions, k_cache, v_cache, padding, start, eps):
    """Validate gpt2_decode_step's inputs (the Numba kernel reads them unchecked).
    Returns (flat, offsets int64, ids int64 (B,), positions int64 (B,), padding, shapes)."""
    flat, offsets, shapes, dims = _check_packed(weights, k_cache, v_cache)
    B, Tmax, V = k_cache.shape[1], k_cache.shape[3], int(weights.vocab_size)
    ids = np.array(as_int_array(ids, "ids"))  # (B,) copies, writeable whatever they were
    positions = np.array(as_int_array(positions, "positions"))
    if ids.shape != (B,) or positions.shape != (B,):
        raise FastformerError(f"ids and positions must have shape (B,) = ({B},), got {ids.shape} and {positions.shape}")
    id_list, pos_list = ids.tolist(), positions.tolist()  # B is small: Python's min and max are quicker
    if B and (min(id_list) < 0 or max(id_list) >= V or min(pos_list) < 0 or max(pos_list) >= Tmax):
        raise FastformerError(f"ids must lie in [0, {V}) and positions in [0, {Tmax}), "
                              f"got ids {id_list} and positions {pos_list}")
    return flat, offsets, ids, positions, _check_padding_start(weights, dims, B, padding, start, eps), shapes


def _check_padding_start(weights, dims, B, padding, start, eps):
    """The rest of the decoding ops' checks, once the weights and caches of B rows and dims
    (L, C, F, V, Tmax) have passed (_check_packed): padding (B, Tmax) bool, start, eps and the
    quantised buffers. Returns padding as the kernels take it."""
    Tmax = dims[4]
    padding = np.asarray(padding)
    if padding.shape != (B, Tmax) or padding.dtype != bool:
        raise FastformerError(f"padding must be a bool array (B, Tmax) = {(B, Tmax)}, got {padding.dtype} "
                              f"{padding.shape}")
    if not is_int(start) or not 0 <= start < Tmax:
        raise FastformerError(f"start must lie in [0, {Tmax}) (an integer): the cache holds {Tmax} positions, "
                              f"got {start!r}")
    check_eps(eps)
    if weights.quant is not None:
        _check_quant(weights.quant, dims)
    return kernel_array(padding)


def _slot_words(fmt, shape, head):
    """(words, scales) of a matrix slot's packed weight: its (K, N), the head's (C, V)."""
    K, N = shape[::-1] if head else shape
    return groups(N) * words_per_row(fmt, K) * GROUP_N, groups(N) * GROUP_N


@functools.lru_cache(maxsize=64)
def _quant_inside(qoffsets_bytes, fmt, dims, n_words, n_scales, n_corrections):
    """Whether every matrix slot's words (and int8's scales and corrections) lie inside buffers of
    these sizes, for a model of dims (L, C, F, V, Tmax); cached on the table's bytes and the dims,
    as _offsets_inside (not on the slots' shapes, whose tuple would be hashed again every call)."""
    shapes, L = gpt2_param_shapes(*dims)[0], dims[0]
    q = np.frombuffer(qoffsets_bytes, dtype=np.int64).reshape(-1, 2)
    for i in range(len(shapes)):
        if is_matrix_slot(i, L):
            need_w, need_s = _slot_words(fmt, shapes[i], i >= L * LAYER_SLOTS)
            if not 0 <= q[i, 0] <= n_words - need_w:
                return False
            if fmt == "int8" and not 0 <= q[i, 1] <= min(n_scales, n_corrections) - need_s:
                return False
    return True


def _check_quant(quant, dims):
    """Every matrix slot's words and scales inside the buffers of a well-typed QuantizedGPT2, for a
    model of dims (L, C, F, V, Tmax)."""
    if not isinstance(quant, QuantizedGPT2) or quant.format not in ("bf16", "int8"):
        raise FastformerError(f"weights.quant must be None or a QuantizedGPT2 of format bf16 or int8, got "
                              f"{getattr(quant, 'format', type(quant).__name__)!r}")
    require_format(quant.format)
    n = dims[0] * LAYER_SLOTS + MODEL_SLOTS  # the slots of gpt2_param_shapes
    ok = all(isinstance(a, np.ndarray) and a.ndim == 1 and a.dtype == d and a.flags.c_contiguous
             for a, d in ((quant.words, np.uint32), (quant.scales, np.float32), (quant.corrections, np.int32)))
    q = quant.qoffsets
    ok = ok and isinstance(q, np.ndarray) and q.dtype == np.int64 and q.shape == (n, 2) and \
        _quant_inside(q.tobytes(), quant.format, dims, quant.words.size,
                      quant.scales.size if quant.format == "int8" else 0, quant.corrections.size)
    if not ok:
        raise FastformerError(f"weights.quant must hold uint32 words, float32 scales, int32 corrections and "
                              f"qoffsets int64 ({n}, 2) whose matrix slots lie inside them")


def _quantized_slot(quant, shapes, i, head):
    """The QuantizedWeight of matrix slot i, views of quant's buffers."""
    K, N = shapes[i][::-1] if head else shapes[i]
    need_w, need_s = _slot_words(quant.format, shapes[i], head)
    wo, so = quant.qoffsets[i].tolist()
    correction = quant.corrections[so:so + need_s] if quant.format == "int8" else quant.corrections[:0]
    scale = quant.scales[so:so + need_s] if quant.format == "int8" else quant.scales[:0]
    return QuantizedWeight(quant.format, K, N, quant.words[wo:wo + need_w], scale, correction)


# ---------------------------------------------------------------- reference
@quiet
def gpt2_decode_step(ops, weights, ids, positions, k_cache, v_cache, padding, start, eps=1e-5):
    """One new token per row through a GPT-2 model that continues the sequences in a
    key/value cache: embedding, L pre-LN blocks (causal attention over the cache, GELU-tanh
    MLP), ln_f and the LM head. weights: a PackedGPT2; ids and positions (B,) ints;
    k_cache, v_cache (L, B, H, Tmax, hs), whose keys and values [0, start) are used and which
    receive the new ones at `start`; padding (B, Tmax) True at padded positions, read for
    [0, start]. Inference only. Returns logits (B, V)."""
    flat, offsets, ids, positions, padding, shapes = check_gpt2_decode(weights, ids, positions, k_cache,
                                                                       v_cache, padding, start, eps)
    P = [flat[o:o + math.prod(s)].reshape(s) for o, s in zip(offsets.tolist(), shapes)]  # views of the buffer
    L = k_cache.shape[0]
    M = P[L * LAYER_SLOTS:]  # the model-wide slots
    quant = weights.quant

    def affine(x, i, bias):  # x @ the matrix of slot i (+ bias): float32, or the quantised product
        if quant is None:
            return x @ P[i] if bias is None else x @ P[i] + bias
        return ops.linear_quantized(x, _quantized_slot(quant, shapes, i, head=False), bias)

    x = (M[WTE][ids] + M[WPE][positions])[:, None]  # (B, 1, C)
    for i in range(L):
        s = i * LAYER_SLOTS
        W = P[s:s + LAYER_SLOTS]
        h, _ = layernorm(x, W[LN1_W], W[LN1_B], eps)
        a = ops.attention_cached(affine(h, s + QKV_W, W[QKV_B]), k_cache[i], v_cache[i], start, k_cache.shape[2],
                                 padding)
        x = x + affine(a, s + ATTN_W, W[ATTN_B])
        h, _ = layernorm(x, W[LN2_W], W[LN2_B], eps)
        g, _ = ops.gelu_forward(affine(h, s + FC_W, None), W[FC_B], approximate="tanh")
        x = x + affine(g, s + MLP_W, W[MLP_B])
    h, _ = layernorm(x, M[LNF_W], M[LNF_B], eps)
    if quant is None:
        return h[:, 0] @ M[HEAD].T
    return ops.linear_quantized(h[:, 0], _quantized_slot(quant, shapes, L * LAYER_SLOTS + HEAD, head=True))


def check_greedy(ids, n_steps, eos_id, done, V, positions, start, Tmax):
    """(n_steps, eos_id as an int, -1 for none, done (B,) bool) of gpt2_decode_greedy, whose ids
    (B,) and positions gpt2_decode_step's checks have passed: every step's new token must fit the
    cache and the position table."""
    check_int("n_steps", n_steps, 0)
    eos = -1 if eos_id is None else check_int("eos_id", eos_id, 0, V - 1)
    B = ids.shape[0]
    if done is None:
        done = np.zeros(B, bool)
    if not (isinstance(done, np.ndarray) and done.dtype == bool and done.shape == (B,) and done.flags.writeable
            and done.flags.c_contiguous):
        raise FastformerError(f"done must be a writeable bool array (B,) = ({B},), got {describe(done)}")
    first = max([int(start), *positions.tolist()])  # the furthest a row's first new token goes
    if n_steps and first + n_steps > Tmax:
        raise FastformerError(f"{n_steps} greedy steps from cache position {start} (the furthest row at position "
                              f"{first}) pass the {Tmax} positions of the cache: give at most {Tmax - first} steps")
    return n_steps, eos, done


def gpt2_decode_greedy(ops, weights, ids, positions, k_cache, v_cache, padding, start, n_steps, eos_id=None,
                       done=None, eps=1e-5):
    """Up to n_steps greedy tokens per row, each fed back as the next step's id: gpt2_decode_step
    at start, start + 1, ... (padding must be False at those positions: they are the new
    tokens'), the argmax of each step's logits (the lowest id among equal maxima; the first NaN's
    id where the logits hold one). A row in `done` (B,) bool, or one that has chosen `eos_id`, gets eos_id from
    then on (`done` is updated in place); the steps stop once every row is done. Returns (tokens
    (B, m) int64, nan): m <= n_steps steps made, nan True when the last step's choice of some row
    was NaN (its column is in tokens; the caller refuses it)."""
    _, _, ids, positions, _, _ = check_gpt2_decode(weights, ids, positions, k_cache, v_cache, padding, start, eps)
    n_steps, eos, done = check_greedy(ids, n_steps, eos_id, done, int(weights.vocab_size), positions, start,
                                      k_cache.shape[3])
    tokens = np.zeros((ids.shape[0], n_steps), np.int64)
    for i in range(n_steps):
        logits = ops.gpt2_decode_step(weights, ids, positions + i, k_cache, v_cache, padding, start + i, eps)
        nxt = np.argmax(logits, axis=-1)
        nan = bool(np.isnan(logits[np.arange(ids.shape[0]), nxt]).any())
        if eos >= 0:
            nxt[done] = eos
            done |= nxt == eos
        tokens[:, i] = ids = nxt
        if nan or (eos >= 0 and done.all()):
            return tokens[:, :i + 1], nan
    return tokens, False


def check_sampled(u, temperature, top_k, B, V):
    """(u (n, B) float64, temperature, top_k <= V) of gpt2_decode_sampled, checked."""
    u = np.asarray(u)
    if u.ndim != 2 or u.shape[1] != B or u.dtype.kind not in "fiu":
        raise FastformerError(f"u must be a float array of one uniform draw per step and row, shape (steps, {B}), got "
                              f"{describe(u)}")
    u = uniform_draws(u)
    check_sampling_options(temperature, top_k)
    return u, float(temperature), V if top_k is None else min(int(top_k), V)


def gpt2_decode_sampled(ops, weights, ids, positions, k_cache, v_cache, padding, start, u, temperature, top_k=None,
                        eos_id=None, done=None, eps=1e-5):
    """Up to n sampled tokens per row, u (n, B) their uniform draws: gpt2_decode_step at start,
    start + 1, ... as in gpt2_decode_greedy, each step's row r drawn by ops.sample_ids with
    u[i, r], `temperature` and `top_k` (top-p is the caller's: it sorts) and fed back as the next
    id; `eos_id` and `done` as in gpt2_decode_greedy. Returns (tokens (B, m) int64, stuck): stuck
    is None, or the logits (B, V) of step m + 1 when some row of them cannot be drawn from (a NaN,
    +inf, or every id -inf, which sample_ids refuses): the steps stop there, nothing chosen, and
    the caller refuses them."""
    _, _, ids, positions, _, _ = check_gpt2_decode(weights, ids, positions, k_cache, v_cache, padding, start, eps)
    u, temperature, top_k = check_sampled(u, temperature, top_k, ids.shape[0], int(weights.vocab_size))
    n_steps, eos, done = check_greedy(ids, u.shape[0], eos_id, done, int(weights.vocab_size), positions, start,
                                      k_cache.shape[3])
    tokens = np.zeros((ids.shape[0], n_steps), np.int64)
    for i in range(n_steps):
        logits = ops.gpt2_decode_step(weights, ids, positions + i, k_cache, v_cache, padding, start + i, eps)
        if not np.isfinite(logits.max(axis=1)).all():  # NaN (max keeps it), +inf, or a row all -inf
            return tokens[:, :i], logits
        nxt = ops.sample_ids(logits, u[i], temperature, top_k)
        if eos >= 0:
            nxt[done] = eos
            done |= nxt == eos
        tokens[:, i] = ids = nxt
        if eos >= 0 and done.all():
            return tokens[:, :i + 1], None
    return tokens, None


def check_prompt(weights, ids, positions, k_cache, v_cache, padding, start, eps):
    """Validate gpt2_decode_prompt's inputs: gpt2_decode_step's checks, for ids and positions
    (B, T) whose T positions from `start` fit the cache. Returns what check_gpt2_decode does, with
    ids and positions (B, T) int64."""
    flat, offsets, shapes, dims = _check_packed(weights, k_cache, v_cache)
    B, Tmax, V = k_cache.shape[1], k_cache.shape[3], int(weights.vocab_size)
    ids, positions = as_int_array(ids, "ids"), as_int_array(positions, "positions")
    if ids.ndim != 2 or ids.shape[0] != B or ids.shape[1] < 1 or positions.shape != ids.shape:
        raise FastformerError(f"ids and positions must have shape (B, T) = ({B}, T) with T >= 1 (B: the cache's "
                              f"rows), got {ids.shape} and {positions.shape}")
    T = ids.shape[1]
    if B and (ids.min() < 0 or ids.max() >= V or positions.min() < 0 or positions.max() >= Tmax):
        raise FastformerError(f"ids must lie in [0, {V}) and positions in [0, {Tmax}), got ids from {ids.min()} to "
                              f"{ids.max()} and positions from {positions.min()} to {positions.max()}")
    padding = _check_padding_start(weights, dims, B, padding, start, eps)
    if start + T > Tmax:
        raise FastformerError(f"a prompt of {T} tokens from cache position {start} passes the {Tmax} positions of "
                              f"the cache: give at most {Tmax - start} tokens")
    return flat, offsets, np.array(ids), np.array(positions), padding, shapes


def gpt2_decode_prompt(ops, weights, ids, positions, k_cache, v_cache, padding, start, eps=1e-5):
    """A prompt of T tokens a row, ids and positions (B, T), as gpt2_decode_step at start, start + 1,
    ..., start + T - 1: every position's keys and values go into the caches (padding must already
    mark the padded ones), and the logits (B, V) of the last are returned."""
    _, _, ids, positions, _, _ = check_prompt(weights, ids, positions, k_cache, v_cache, padding, start, eps)
    for i in range(ids.shape[1]):
        logits = ops.gpt2_decode_step(weights, ids[:, i], positions[:, i], k_cache, v_cache, padding, start + i, eps)
    return logits


# -------------------------------------------------------------------- Numba
# A step is a chain of stages (_sync.py): the embedding; per layer the fused q, k, v product, the
# heads' attention over the cache, the output projection (+ the residual), the MLP's hidden layer
# (+ GELU) and its output layer (+ the residual); then the head. Each stage is cut into chunks:
# groups of GROUP_N output columns of a product, heads of attention. With parts == 1 (one thread)
# a stage is one chunk; with two parts, both cores run every step, each on its share of the
# weights. The layernorm before a product, and the quantisation of its input rows, are made by
# every part for itself ("prep"), from activations that no chunk of that stage writes.
@inline
def _affine(x, w, bias, y, c0, c1):
    """y[:, c0:c1] = x (R, K) @ w[:, c0:c1] (w (K, N)) + bias[c0:c1], streaming w once for all R rows.
    The loops index slices from 0: an index that may be negative (c0 + j) keeps Numba's wraparound
    test in the loop, which then does not vectorise."""
    R, K = x.shape
    n = c1 - c0
    for r in range(R):
        yr, b = y[r, c0:c1], bias[c0:c1]
        for j in range(n):
            yr[j] = b[j]
    k = 0
    while k + 4 <= K:  # four rows of w a pass: y is loaded and stored a quarter as often
        w0, w1, w2, w3 = w[k, c0:c1], w[k + 1, c0:c1], w[k + 2, c0:c1], w[k + 3, c0:c1]
        for r in range(R):
            x0, x1, x2, x3 = x[r, k], x[r, k + 1], x[r, k + 2], x[r, k + 3]
            yr = y[r, c0:c1]
            for j in range(n):
                yr[j] += x0 * w0[j] + x1 * w1[j] + x2 * w2[j] + x3 * w3[j]
        k += 4
    while k < K:
        wk = w[k, c0:c1]
        for r in range(R):
            xk = x[r, k]
            yr = y[r, c0:c1]
            for j in range(n):
                yr[j] += xk * wk[j]
        k += 1


@inline
def _matrix(flat, offsets, slot, rows, cols):
    """The (rows, cols) array of a slot, read in place from the flat buffer."""
    o = offsets[slot]
    return flat[o:o + rows * cols].reshape((rows, cols))


@inline
def _vector(flat, offsets, slot, n):
    """The (n,) array of a slot, read in place from the flat buffer."""
    o = offsets[slot]
    return flat[o:o + n]


# The products of a step, one set per weight format: `_prep` readies a product's input rows x (R, K)
# (int8: u8 rows and their scales in au8, sx; bf16: pairs of bfloat16 in aw), `_cols` writes the
# columns of groups g0..g1 of y = x @ a matrix slot (+ its bias, when b_off >= 0), `_head_cols` those
# of the logits, `_warm` asks for the first weights of group g0 (a packed slot's groups lie one after
# the other, Kw words a column). Each kernel is the loops below with one format's four.
@inline
def _prep_fp32(x, K, au8, aw, sx):
    pass


@inline
def _prep_int8(x, K, au8, aw, sx):
    quantize_rows_u8(x, x.shape[0], K, au8, (K + 3) // 4 * 4, sx)


@inline
def _prep_bf16(x, K, au8, aw, sx):
    pack_rows_bf16(x, x.shape[0], K, aw, (K + 1) // 2)


@inline
def _warm_fp32(words, qo, K, g0):
    pass  # float32 (K, N) slots: a group's columns are strided rows, not one stream


@inline
def _warm_int8(words, qo, K, g0):
    prefetch_span(words, qo[0] + g0 * ((K + 3) // 4) * GROUP_N, PREFETCH_WORDS)


@inline
def _warm_bf16(words, qo, K, g0):
    prefetch_span(words, qo[0] + g0 * ((K + 1) // 2) * GROUP_N, PREFETCH_WORDS)


@inline
def _cols_fp32(x, K, N, g0, g1, flat, w_off, b_off, words, scales, corrections, qo, y, au8, aw, sx, acc_i, acc_f):
    _affine(x, flat[w_off:w_off + K * N].reshape((K, N)), flat[b_off:b_off + N], y, g0 * GROUP_N,
            min(N, g1 * GROUP_N))


@inline
def _cols_int8(x, K, N, g0, g1, flat, w_off, b_off, words, scales, corrections, qo, y, au8, aw, sx, acc_i, acc_f):
    kw = (K + 3) // 4
    int8_product(au8, kw, sx, x.shape[0], words, qo[0], kw, scales, corrections, qo[1], flat, b_off, b_off >= 0, y, N,
                 g0, g1, acc_i)


@inline
def _cols_bf16(x, K, N, g0, g1, flat, w_off, b_off, words, scales, corrections, qo, y, au8, aw, sx, acc_i, acc_f):
    kw = (K + 1) // 2
    bf16_product(aw, kw, x.shape[0], words, qo[0], kw, flat, b_off, b_off >= 0, y, N, g0, g1, acc_f)


@inline
def _head_cols_fp32(h, C, V, g0, g1, flat, w_off, words, scales, corrections, qo, logits, au8, aw, sx, acc_i, acc_f):
    head = flat[w_off:w_off + V * C].reshape((V, C))
    R = h.shape[0]
    F = flat.dtype.type
    for v in range(g0 * GROUP_N, min(V, g1 * GROUP_N)):  # logits = h @ head.T: a dot product of C per id
        hv = head[v]
        for r in range(R):
            total = F(0.0)
            for c in range(C):
                total += h[r, c] * hv[c]
            logits[r, v] = total


@inline
def _head_cols_int8(h, C, V, g0, g1, flat, w_off, words, scales, corrections, qo, logits, au8, aw, sx, acc_i, acc_f):
    _cols_int8(h, C, V, g0, g1, flat, w_off, -1, words, scales, corrections, qo, logits, au8, aw, sx, acc_i, acc_f)


@inline
def _head_cols_bf16(h, C, V, g0, g1, flat, w_off, words, scales, corrections, qo, logits, au8, aw, sx, acc_i, acc_f):
    _cols_bf16(h, C, V, g0, g1, flat, w_off, -1, words, scales, corrections, qo, logits, au8, aw, sx, acc_i, acc_f)


# the float32 kernel's; the others rebind them (_format_kernels)
_prep, _cols, _head_cols, _warm = _prep_fp32, _cols_fp32, _head_cols_fp32, _warm_fp32
DECODE_SPLIT_ROWS = 16  # rows from which a step runs as two halves side by side on the task pool
# what a product stage does to its columns after the product: nothing, GELU, add them into `res`, or
# write each row's first maximum (or first NaN) among them into best[row, chunk]
PLAIN, GELU, RESIDUAL, ARGMAX = 0, 1, 2, 3


def _product_stage_loops(sync, s, parts, part, stream, ln, eps, x, K, N, slot_w, slot_b, head, flat, offsets, words,
                         scales, corrections, qoff, y, finish_with, best, au8, aw, sx, acc_i, acc_f):
    """Stage s: y = x (R, K) @ the matrix of slot_w (+ the bias of slot_b; the head's logits when
    `head`), its columns in chunks of groups, each then finished as `finish_with` says (RESIDUAL:
    added into the residual stream (R, C)). With ln >= 0, x is first made the layernorm of the
    stream by the weight and bias in slots ln, ln + 1."""
    G = (N + GROUP_N - 1) // GROUP_N
    n = stage_chunks(G, parts)
    if stage_open(sync, s, n, parts):
        # this part's first chunk's weights start on their way from L3 while it makes its input rows
        _warm(words, qoff[slot_w], K, chunk_span(chunk_at(0, n, part, parts), n, G)[0])
        if ln >= 0:
            for r in range(x.shape[0]):
                normalize_row(stream[r], _vector(flat, offsets, ln, K), _vector(flat, offsets, ln + 1, K), eps, x[r])
        _prep(x, K, au8, aw, sx)
        for j in range(n):
            c = chunk_at(j, n, part, parts)
            if not claim(sync, s, c, parts):
                continue
            g0, g1 = chunk_span(c, n, G)
            if head:
                _head_cols(x, K, N, g0, g1, flat, offsets[slot_w], words, scales, corrections, qoff[slot_w], y, au8,
                           aw, sx, acc_i, acc_f)
            else:
                _cols(x, K, N, g0, g1, flat, offsets[slot_w], offsets[slot_b], words, scales, corrections,
                      qoff[slot_w], y, au8, aw, sx, acc_i, acc_f)
            c0, c1 = g0 * GROUP_N, min(N, g1 * GROUP_N)
            for r in range(x.shape[0]):  # (slices indexed from 0, as in _affine)
                yr = y[r, c0:c1]
                if finish_with == ARGMAX:
                    best[r, c] = c0 + _first_max(yr)
                elif finish_with == GELU:
                    for j in range(c1 - c0):
                        yr[j] = _gelu(yr[j], False)
                elif finish_with == RESIDUAL:
                    rr = stream[r, c0:c1]
                    for j in range(c1 - c0):
                        rr[j] += yr[j]
            finish(sync, s, parts)
        wait_stage(sync, s, n, parts)


@inline
def _first_max(y):
    """np.argmax of y (not empty): its first maximum, or its first NaN. Passes that vectorise --
    whether there is a NaN, the largest value (row_max), then the first block of 64 holding it --
    where one pass that compared and branched at every value did not vectorise."""
    n = y.shape[0]
    nans = 0
    for j in range(n):
        nans += y[j] != y[j]
    if nans:
        for j in range(n):
            if np.isnan(y[j]):
                return j
    m = row_max(y, n)
    j0 = 0
    while j0 + 64 <= n:  # blocks of 64 until one holds m (a test per block, vectorised), then that block
        hits = 0
        for j in range(j0, j0 + 64):
            hits += y[j] == m
        if hits:
            break
        j0 += 64
    for j in range(j0, n):
        if y[j] == m:
            return j
    return 0


_product_stage = function(_product_stage_loops)  # the float32 kernel's; _format_kernels makes each format's


@inline
def _attend(q, kh, vh, n, padding, row, p, ah, scale, scratch):
    """ah (hs,) = one head's query q (hs,) over the first n keys and values of kh, vh (Tmax, hs),
    those padding[row] marks left out; p (Tmax,) scratch for its scores, scratch (>= 4 hs,)
    float32 for p @ v (weighted_rows)."""
    F = ah.dtype.type
    hs = q.shape[0]
    j = 0
    while j + 4 <= n:  # four keys a pass: four sums side by side, not one chain of reductions
        s0, s1, s2, s3 = F(0.0), F(0.0), F(0.0), F(0.0)
        for d in range(hs):
            s0 += q[d] * kh[j, d]
            s1 += q[d] * kh[j + 1, d]
            s2 += q[d] * kh[j + 2, d]
            s3 += q[d] * kh[j + 3, d]
        p[j], p[j + 1], p[j + 2], p[j + 3] = s0 * scale, s1 * scale, s2 * scale, s3 * scale
        j += 4
    while j < n:
        s0 = F(0.0)
        for d in range(hs):
            s0 += q[d] * kh[j, d]
        p[j] = s0 * scale
        j += 1
    _, total = _softmax_row(p, n, n, padding, row, True)
    if total == F(0.0):  # every key is padding: the output is 0, as in attention_forward
        ah[:] = F(0.0)
        return
    weighted_rows(p, vh, n, ah, scratch)
    inv = F(1.0) / total
    for d in range(hs):
        ah[d] *= inv


def weighted_rows(p, v, n, out, scratch):
    """out (hs,) = p[:n] @ v[:n], v (rows, hs) with adjacent columns: four rows a pass. In jitted
    float32 code, a head size of 32 or 64 takes four chains of register accumulators instead
    (_tiles.weighted_rows32 and 64, into scratch (>= 4 hs,) float32): out loaded and stored every
    pass was slower, and so is one chain of accumulators, which waits on each product in turn."""
    F = out.dtype.type
    out[:] = F(0.0)
    j = 0
    while j + 4 <= n:  # four rows a pass: out is loaded and stored a quarter as often
        p0, p1, p2, p3 = p[j], p[j + 1], p[j + 2], p[j + 3]
        v0, v1, v2, v3 = v[j], v[j + 1], v[j + 2], v[j + 3]
        for d in range(out.shape[0]):
            out[d] += p0 * v0[d] + p1 * v1[d] + p2 * v2[d] + p3 * v3[d]
        j += 4
    while j < n:
        for d in range(out.shape[0]):
            out[d] += p[j] * v[j, d]
        j += 1


_weighted_rows_loops = inline(weighted_rows)
if weighted_rows32 is not None:
    @overload(weighted_rows, inline="always")
    def _weighted_rows_jit(p, v, n, out, scratch):
        if not (p.dtype == v.dtype == out.dtype == nb_types.float32 and v.layout == "C"):
            return lambda p, v, n, out, scratch: _weighted_rows_loops(p, v, n, out, scratch)

        def in_chains(p, v, n, out, scratch):
            hs = out.shape[0]
            if v.shape[1] != hs or hs not in (32, 64):
                _weighted_rows_loops(p, v, n, out, scratch)
                return
            if hs == 32:
                weighted_rows32(p, n, v, hs, scratch)
            else:
                weighted_rows64(p, n, v, hs, scratch)
            for d in range(hs):
                out[d] = (scratch[d] + scratch[hs + d]) + (scratch[2 * hs + d] + scratch[3 * hs + d])
            for j in range(n // 4 * 4, n):
                for d in range(hs):
                    out[d] += p[j] * v[j, d]
        return in_chains


@inline
def _attention_stage(sync, s, parts, part, layer, qkv, kc, vc, padding, t, r0, T, a, p, scratch):
    """Stage s: each row's heads (the chunks' units) over the cache. Row b's T new tokens are rows
    b * T .. b * T + T - 1 of qkv and of a (B * T, C), the heads' outputs: their keys and values
    are stored at t .. t + T - 1 first, then each query sees the keys up to its own."""
    L, _, H, _, hs = kc.shape
    C = a.shape[1]
    B = a.shape[0] // T
    scale = a.dtype.type(1.0 / math.sqrt(hs))
    n = stage_chunks(B * H, parts)
    for j in range(n):
        c = chunk_at(j, n, part, parts)
        if not claim(sync, s, c, parts):
            continue
        u0, u1 = chunk_span(c, n, B * H)
        for u in range(u0, u1):
            b, hd = u // H, u % H
            kh, vh = kc[layer, r0 + b, hd], vc[layer, r0 + b, hd]
            for i in range(T):
                r = b * T + i
                for d in range(hs):
                    kh[t + i, d] = qkv[r, C + hd * hs + d]
                    vh[t + i, d] = qkv[r, 2 * C + hd * hs + d]
            for i in range(T):
                r = b * T + i
                _attend(qkv[r, hd * hs:(hd + 1) * hs], kh, vh, t + i + 1, padding, b, p, a[r, hd * hs:(hd + 1) * hs],
                        scale, scratch)
        finish(sync, s, parts)
    wait_stage(sync, s, n, parts)


@inline
def _embed(flat, offsets, ids, positions, x, L, V, Tmax):
    """x (R, C) = the token and position embeddings of ids and positions (R,)."""
    R, C = x.shape
    wte = _matrix(flat, offsets, L * LAYER_SLOTS + WTE, V, C)
    wpe = _matrix(flat, offsets, L * LAYER_SLOTS + WPE, Tmax, C)
    for r in range(R):
        for c in range(C):
            x[r, c] = wte[ids[r], c] + wpe[positions[r], c]


def _gpt2_decode_loops(flat, offsets, d_ff, ids, positions, kc, vc, padding, t, eps, logits, words, scales, corrections,
                       qoff, r0, x, qkv, a, f, h, o, p, au8, aw, sx, acc_i, acc_f, best, embed, sync, s, part, parts):
    """The step of the B rows of logits (B, V), whose caches are rows r0 .. r0 + B - 1 of kc and vc
    (padding: the B rows themselves), as stages s, s + 1, ... of `sync`; returns the stage after
    its last. Each row feeds T = R / B tokens at t .. t + T - 1: ids and positions (R,), row b's
    at b * T .. b * T + T - 1 (T > 1: a prompt, whose last position alone reaches the head).
    x (R, C), qkv (R, 3C), a (R, C), f (R, F): the activations every part reads; h, o (R, C),
    p (Tmax,) and the quantised rows (au8, aw, sx, acc_i, acc_f): this part's. `embed`: x is first
    made the tokens' embeddings (else it holds them already). With best (B, m) of m >= MAX_CHUNKS
    columns, each chunk c of the head writes its columns' argmax of each row to best[:, c]; with
    m == 0, not."""
    L, _, H, _, hs = kc.shape
    C, V = H * hs, logits.shape[1]
    B = logits.shape[0]
    T = ids.shape[0] // B
    g = L * LAYER_SLOTS  # the model-wide slots follow the layers'
    if embed:
        if claim(sync, s, 0, parts):  # the embedding: one chunk
            _embed(flat, offsets, ids, positions, x, L, V, kc.shape[3])
            finish(sync, s, parts)
        wait_stage(sync, s, 1, parts)
        s += 1
    # the product stage is a function of its own (inlined, each of its six calls would compile a copy),
    # called with runtime values throughout: a literal constant would compile a copy of its own
    no_ln, head, body = np.int64(-1), np.bool_(True), np.bool_(False)
    plain, gelu, residual = np.int64(PLAIN), np.int64(GELU), np.int64(RESIDUAL)
    for layer in range(L):
        w = layer * LAYER_SLOTS
        _product_stage(sync, s, parts, part, x, w + LN1_W, eps, h, C, 3 * C, w + QKV_W, w + QKV_B, body, flat, offsets,
                       words, scales, corrections, qoff, qkv, plain, best, au8, aw, sx, acc_i, acc_f)
        _attention_stage(sync, s + 1, parts, part, layer, qkv, kc, vc, padding, t, r0, T, a, p, acc_f)
        _product_stage(sync, s + 2, parts, part, x, no_ln, eps, a, C, C, w + ATTN_W, w + ATTN_B, body, flat, offsets,
                       words, scales, corrections, qoff, o, residual, best, au8, aw, sx, acc_i, acc_f)
        _product_stage(sync, s + 3, parts, part, x, w + LN2_W, eps, h, C, d_ff, w + FC_W, w + FC_B, body, flat,
                       offsets, words, scales, corrections, qoff, f, gelu, best, au8, aw, sx, acc_i, acc_f)
        _product_stage(sync, s + 4, parts, part, x, no_ln, eps, f, d_ff, C, w + MLP_W, w + MLP_B, body, flat, offsets,
                       words, scales, corrections, qoff, o, residual, best, au8, aw, sx, acc_i, acc_f)
        s += 5
    last, hl = x, h
    if T > 1:  # each row's last position, copied by every part for itself (x is final: the stages have waited)
        last, hl = np.empty((B, C), x.dtype), np.empty((B, C), x.dtype)
        for b in range(B):
            last[b] = x[b * T + T - 1]
    _product_stage(sync, s, parts, part, last, g + LNF_W, eps, hl, C, V, g + HEAD, g + HEAD, head, flat, offsets,
                   words, scales, corrections, qoff, logits, np.int64(ARGMAX if best.shape[1] else PLAIN), best, au8,
                   aw, sx, acc_i, acc_f)
    return s + 1


# the kernels' step: _format_kernels gives each format's copy its own. Both kernels call it with the
# same argument types (np.int64(0), np.bool_(True): a literal constant would be a type of its own),
# so that it compiles once for both: it is most of their compile time.
_step_loops = _gpt2_decode_loops


@inline
def _scratch(R, C, d_ff, Tmax, dtype):
    """A part's own buffers of a step: h, o (R, C), p (Tmax,), au8, aw, sx, acc_i, acc_f (the bf16
    products' sums, and the attention's p @ v chains: 384 >= 4 x 64 floats)."""
    K = max(C, d_ff) + 4  # the activations of a quantised product: u8 (int8) or bfloat16 pairs (bf16)
    return (np.empty((R, C), dtype), np.empty((R, C), dtype), np.empty(Tmax, dtype), np.empty(R * K, np.uint8),
            np.zeros(R * K, np.uint32), np.empty(R, np.float32), np.empty(TILE_ROWS * GROUP_N, np.int32),
            np.empty(TILE_ROWS * GROUP_N, np.float32))


_DECODE_SIG = ("void(R[::1], readonly(int64)[::1], int64, int64[::1], int64[::1], "
               "F[:, :, :, :, ::1], F[:, :, :, :, ::1], readonly(boolean)[:, ::1], int64, F, F[:, ::1], "
               "readonly(uint32)[::1], readonly(float32)[::1], readonly(int32)[::1], readonly(int64)[:, ::1], int64, "
               "F[:, ::1], F[:, ::1], F[:, ::1], F[:, ::1], int64[::1], int64, int64)")


def _gpt2_decode_kernel(flat, offsets, d_ff, ids, positions, kc, vc, padding, t, eps, logits, words, scales,
                        corrections, qoff, r0, x, qkv, a, f, sync, part, parts):
    """One step (`_step_loops`) as part `part` of `parts`: one token a row of logits, or a prompt of
    ids.size / B tokens a row (gpt2_decode_prompt)."""
    h, o, p, au8, aw, sx, acc_i, acc_f = _scratch(ids.shape[0], x.shape[1], d_ff, kc.shape[3], flat.dtype)
    _step_loops(flat, offsets, d_ff, ids, positions, kc, vc, padding, t, eps, logits, words, scales, corrections,
                qoff, r0, x, qkv, a, f, h, o, p, au8, aw, sx, acc_i, acc_f, np.zeros((0, 0), np.int64), np.bool_(True),
                sync, np.int64(0), part, parts)


_GREEDY_SIG = ("int64(R[::1], readonly(int64)[::1], int64, int64[::1], int64[::1], "
               "F[:, :, :, :, ::1], F[:, :, :, :, ::1], readonly(boolean)[:, ::1], int64, F, int64, boolean[::1], "
               "F[:, ::1], readonly(uint32)[::1], readonly(float32)[::1], readonly(int32)[::1], "
               "readonly(int64)[:, ::1], int64[:, ::1], F[:, ::1], F[:, ::1], F[:, ::1], F[:, ::1], int64[:, ::1], "
               "int64[:, ::1], readonly(float64)[:, ::1], float64, int64, int64[::1], int64[::1], int64, int64)")


def _gpt2_greedy_kernel(flat, offsets, d_ff, cur, pos, kc, vc, padding, t, eps, eos, done, logits, words,
                        scales, corrections, qoff, tokens, x, qkv, a, f, best, status, u, temperature, top_k, drawn,
                        sync, part, parts):
    """gpt2_decode_greedy's (or gpt2_decode_sampled's) steps in one call, as part `part` of
    `parts`: each a `_step_loops` step into logits (B, V), then one chunk choosing every row's
    token and embedding it for the next step. Greedy (temperature 0): the head chunks leave their
    argmax in best (B, MAX_CHUNKS), and the choice takes the largest of them; sampled: best is
    (B, 0), and row r of step i draws with u[i, r] (sample_row, top_k <= V): in the choice's chunk
    for one row, else in a stage of their own whose chunks are rows, into drawn (B,) (-1: a row
    that cannot be drawn from), so that the parts share the draws. tokens (B, n)
    receives the ids, cur and pos (B,) the ids and positions fed (updated as the steps go),
    status (n, 2) whether step i could not choose (greedy: a NaN chosen; sampled: a row that
    cannot be drawn from, nothing chosen) and whether every row is then done; returns the steps
    made, negated when the last one could not choose."""
    B, n = tokens.shape
    L, V = kc.shape[0], logits.shape[1]
    h, o, p, au8, aw, sx, acc_i, acc_f = _scratch(B, x.shape[1], d_ff, kc.shape[3], flat.dtype)
    chunks = stage_chunks((V + GROUP_N - 1) // GROUP_N, parts)  # of the head
    sampled = temperature > 0.0
    z, kept, heap = np.empty(V if sampled else 0), np.empty(V if sampled else 0, np.int64), np.empty(top_k)
    rows_apart = sampled and B > 1  # the draws in a stage of their own
    nd = stage_chunks(B, parts)
    s = np.int64(0)
    for i in range(n):
        s = _step_loops(flat, offsets, d_ff, cur, pos, kc, vc, padding, t + i, eps, logits, words, scales, corrections,
                        qoff, np.int64(0), x, qkv, a, f, h, o, p, au8, aw, sx, acc_i, acc_f, best, i == 0, sync, s,
                        part, parts)
        if rows_apart:
            for j in range(nd):
                c = chunk_at(j, nd, part, parts)
                if not claim(sync, s, c, parts):
                    continue
                r0, r1 = chunk_span(c, nd, B)
                for r in range(r0, r1):
                    drawn[r] = sample_row(logits[r], u[i, r], temperature, top_k, z, kept, heap) \
                        if samplable(logits[r]) else -1
                finish(sync, s, parts)
            wait_stage(sync, s, nd, parts)
            s += 1
        if claim(sync, s, 0, parts):  # every row's choice, and the next step's embedding: one chunk
            nan = False
            all_done = True
            stuck = False  # sampled: as sample_inputs, a row that cannot be drawn from stops the steps unchosen
            for r in range(B):
                if rows_apart:
                    stuck = stuck or drawn[r] < 0
                elif sampled:
                    stuck = stuck or not samplable(logits[r])
            for r in range(B):
                if stuck:
                    break
                if rows_apart:
                    pick = drawn[r]
                elif sampled:
                    pick = sample_row(logits[r], u[i, r], temperature, top_k, z, kept, heap)
                else:
                    pick = best[r, 0]  # np.argmax over the chunks' own: the first maximum, or the first NaN
                    for c in range(chunks):
                        b = best[r, c]
                        if np.isnan(logits[r, b]):
                            pick = b
                            break
                        if logits[r, b] > logits[r, pick]:
                            pick = b
                    nan = nan or np.isnan(logits[r, pick])
                if eos >= 0:
                    if done[r]:
                        pick = eos
                    done[r] = done[r] or pick == eos
                    all_done = all_done and done[r]
                tokens[r, i] = pick
                cur[r] = pick
                pos[r] += 1
            status[i, 0] = 1 if nan or stuck else 0
            status[i, 1] = 1 if eos >= 0 and all_done and not stuck else 0
            if i + 1 < n and status[i, 0] == 0 and status[i, 1] == 0:
                _embed(flat, offsets, cur, pos, x, L, V, kc.shape[3])
            finish(sync, s, parts)
        wait_stage(sync, s, 1, parts)
        s += 1
        if status[i, 0]:  # step i's own word: another part may have written later steps' already
            return -(i + 1)
        if status[i, 1]:
            return i + 1
    return n


def step_stages(L):
    """The stages of one step (or prompt) of an L-layer model: the embedding, five a layer, the head."""
    return 5 * L + 2


def greedy_stages(L, n_steps, draws=False):
    """The stages of n_steps greedy steps of an L-layer model (the length of their `sync`): each
    step's but the first embedding, and one choice after each (`draws`: sampled steps of several
    rows, whose draws take a stage before each choice)."""
    return n_steps * (step_stages(L) + draws) + 1


def _format_kernels(suffix, floats, **products):
    """The kernels above as kernels of their own, with `products` (`_prep`, `_cols`, `_head_cols`,
    `_warm`) of one format in their product stages: (one step, greedy steps). Both call the step's
    loops as a function of their own: inlined into the greedy loop they took longer to compile and
    ran no faster."""
    def copy(fn, **names):
        c = pytypes.FunctionType(fn.__code__, {**fn.__globals__, **names}, fn.__name__ + suffix)
        c.__qualname__ = fn.__qualname__ + suffix  # its own entry in the disk cache
        c.__module__ = fn.__module__
        return c

    stage = function(copy(_product_stage_loops, **products))
    loops = function(copy(_gpt2_decode_loops, _product_stage=stage))
    step = kernel(_DECODE_SIG, parallel=False, floats=floats)(copy(_gpt2_decode_kernel, _step_loops=loops))
    greedy = kernel(_GREEDY_SIG, parallel=False, floats=floats)(copy(_gpt2_greedy_kernel, _step_loops=loops))
    return step, greedy


_KERNELS = {None: _format_kernels("", ("float32", "float64")),
            "int8": _format_kernels("_int8", ("float32",), _prep=_prep_int8, _cols=_cols_int8,
                                    _head_cols=_head_cols_int8, _warm=_warm_int8),
            "bf16": _format_kernels("_bf16", ("float32",), _prep=_prep_bf16, _cols=_cols_bf16,
                                    _head_cols=_head_cols_bf16, _warm=_warm_bf16)}
_NO_QUANT = (np.zeros(0, np.uint32), np.zeros(0, np.float32), np.zeros(0, np.int32))
_NO_SYNC = np.zeros(0, np.int64)


def _made(run, dtype):
    """Compile (or load) the kernel `run` for `dtype` here, before two threads call it at once: a
    float64 call that finds no float64 signature compiles every kernel's (_jit.compile_float64),
    and the second thread, finding that under way, would raise instead."""
    if dtype == np.float64:
        compile_float64()
    run.dispatcher or run.jit()


def _sync_for(run, dtype, parts, stages):
    """The `sync` array of a run_together call of `run` in `parts` parts over `stages` stages (the
    kernel made first when two threads will call it); none for one part."""
    if parts == 1:
        return _NO_SYNC
    _made(run, dtype)
    return new_sync(stages, parts)


def _format_buffers(weights, offsets):
    """(format or None for float32, words, scales, corrections, qoffsets) of the kernels' arguments."""
    quant = weights.quant
    if quant is None:
        return None, *_NO_QUANT, np.full((offsets.size, 2), -1, np.int64)
    return quant.format, quant.words, quant.scales, quant.corrections, quant.qoffsets


def _activations(R, C, d_ff, dtype):
    """x (R, C), qkv (R, 3C), a (R, C), f (R, d_ff): the activations all parts of a step share."""
    return np.empty((R, C), dtype), np.empty((R, 3 * C), dtype), np.empty((R, C), dtype), np.empty((R, d_ff), dtype)


def gpt2_decode_step_numba(ops, weights, ids, positions, k_cache, v_cache, padding, start, eps=1e-5):
    flat, offsets, ids, positions, padding, _ = check_gpt2_decode(weights, ids, positions, k_cache, v_cache,
                                                                  padding, start, eps)
    fmt, words, scales, corrections, qoff = _format_buffers(weights, offsets)
    if not jit_writable(k_cache, v_cache) or (fmt is not None and flat.dtype != np.float32):
        return gpt2_decode_step(ops, weights, ids, positions, k_cache, v_cache, padding, start, eps)
    logits = np.empty((ids.shape[0], int(weights.vocab_size)), flat.dtype)
    run = _KERNELS[fmt][0]
    B, C, d_ff = ids.shape[0], k_cache.shape[2] * k_cache.shape[4], int(weights.d_ff)
    halves = [(0, B)]
    if B >= DECODE_SPLIT_ROWS and task_threads() > 1 and flat.dtype == np.float32:
        # two halves of the rows side by side: each streams every weight, so it pays once the rows'
        # arithmetic outweighs that and the hand-off to the pool (found by timing the step over rows
        # both ways)
        halves = [(0, B // 2), (B // 2, B)]
        _made(run, flat.dtype)
    run_tasks([(run, (flat, offsets, d_ff, ids[r0:r1], positions[r0:r1], k_cache, v_cache, padding[r0:r1],
                      int(start), flat.dtype.type(eps), logits[r0:r1], words, scales, corrections, qoff, r0,
                      *_activations(r1 - r0, C, d_ff, flat.dtype), _NO_SYNC, 0, 1))
               for r0, r1 in halves])
    return logits


def _steps_numba(weights, ids, positions, k_cache, v_cache, padding, start, n_steps, eos_id, done, eps, u,
                 temperature, top_k):
    """The greedy kernel's call for gpt2_decode_greedy_numba (u None) and gpt2_decode_sampled_numba:
    (tokens (B, n_steps), the kernel's return, the last step's logits), or None where the reference
    runs instead: rows that the step would split across the task pool take its loop over steps."""
    flat, offsets, ids, positions, padding, _ = check_gpt2_decode(weights, ids, positions, k_cache, v_cache,
                                                                  padding, start, eps)
    B, V = ids.shape[0], int(weights.vocab_size)
    if u is not None:
        u, temperature, top_k = check_sampled(u, temperature, top_k, B, V)
        n_steps = u.shape[0]
    n_steps, eos, done = check_greedy(ids, n_steps, eos_id, done, V, positions, start, k_cache.shape[3])
    fmt, words, scales, corrections, qoff = _format_buffers(weights, offsets)
    if (not jit_writable(k_cache, v_cache) or (fmt is not None and flat.dtype != np.float32)
            or (B >= DECODE_SPLIT_ROWS and task_threads() > 1 and flat.dtype == np.float32) or n_steps == 0):
        return None
    L, C, d_ff = k_cache.shape[0], k_cache.shape[2] * k_cache.shape[4], int(weights.d_ff)
    tokens = np.zeros((B, n_steps), np.int64)
    logits = np.empty((B, V), flat.dtype)
    run = _KERNELS[fmt][1]
    parts = greedy_parts(weights, k_cache, n_steps)
    rows_apart = u is not None and B > 1  # the kernel's draws in a stage of their own
    sync = _sync_for(run, flat.dtype, parts, greedy_stages(L, n_steps, rows_apart))
    # greedy: the head's chunks keep their argmax (best), temperature 0; sampled: no argmax
    best = np.zeros((B, MAX_CHUNKS if u is None else 0), np.int64)
    draws = (_NO_DRAWS, 0.0, 0) if u is None else (u, temperature, top_k)
    draws += (np.zeros(B if rows_apart else 0, np.int64),)
    made = run_together(run, (flat, offsets, d_ff, ids, positions, k_cache, v_cache, padding, int(start),
                              flat.dtype.type(eps), eos, done, logits, words, scales, corrections, qoff, tokens,
                              *_activations(B, C, d_ff, flat.dtype), best, np.zeros((n_steps, 2), np.int64), *draws,
                              sync), parts)
    return tokens, made, logits


_NO_DRAWS = np.zeros((0, 0))


def gpt2_decode_greedy_numba(ops, weights, ids, positions, k_cache, v_cache, padding, start, n_steps, eos_id=None,
                             done=None, eps=1e-5):
    """As the reference, every step in one kernel call: at batch 1 the Python around a step costs
    more than the step's arithmetic on the small presets."""
    ran = _steps_numba(weights, ids, positions, k_cache, v_cache, padding, start, n_steps, eos_id, done, eps,
                       None, 0.0, 0)
    if ran is None:
        return gpt2_decode_greedy(ops, weights, ids, positions, k_cache, v_cache, padding, start, n_steps, eos_id,
                                  done, eps)
    tokens, made, _ = ran
    return tokens[:, :abs(made)], made < 0


def gpt2_decode_sampled_numba(ops, weights, ids, positions, k_cache, v_cache, padding, start, u, temperature,
                              top_k=None, eos_id=None, done=None, eps=1e-5):
    """As the reference, every step and draw in one kernel call (the draws as sample_ids_numba's:
    the same ids from the same logits)."""
    ran = _steps_numba(weights, ids, positions, k_cache, v_cache, padding, start, 0, eos_id, done, eps, u,
                       temperature, top_k)
    if ran is None:
        return gpt2_decode_sampled(ops, weights, ids, positions, k_cache, v_cache, padding, start, u, temperature,
                                   top_k, eos_id, done, eps)
    tokens, made, logits = ran
    if made < 0:  # step -made could not draw: nothing of it was chosen
        return tokens[:, :-made - 1], logits
    return tokens[:, :made], None


def gpt2_decode_prompt_numba(ops, weights, ids, positions, k_cache, v_cache, padding, start, eps=1e-5):
    """As the reference, in one kernel call: every product streams its weights once for all the
    prompt's tokens, and the head runs on each row's last position alone."""
    flat, offsets, ids, positions, padding, _ = check_prompt(weights, ids, positions, k_cache, v_cache, padding,
                                                             start, eps)
    fmt, words, scales, corrections, qoff = _format_buffers(weights, offsets)
    if not jit_writable(k_cache, v_cache) or (fmt is not None and flat.dtype != np.float32):
        return gpt2_decode_prompt(ops, weights, ids, positions, k_cache, v_cache, padding, start, eps)
    (B, T), L = ids.shape, k_cache.shape[0]
    C, d_ff = k_cache.shape[2] * k_cache.shape[4], int(weights.d_ff)
    logits = np.empty((B, int(weights.vocab_size)), flat.dtype)
    run = _KERNELS[fmt][0]
    parts = greedy_parts(weights, k_cache, T)
    sync = _sync_for(run, flat.dtype, parts, step_stages(L))
    run_together(run, (flat, offsets, d_ff, ids.reshape(-1), positions.reshape(-1), k_cache, v_cache, padding,
                       int(start), flat.dtype.type(eps), logits, words, scales, corrections, qoff, 0,
                       *_activations(B * T, C, d_ff, flat.dtype), sync), parts)
    return logits


# Two threads share greedy steps (_sync.py) from this many bytes of weights a token streams: below,
# the waits between stages and the partner's start cost more than half a token saves. Back to back
# (the partner awake on its own core: _sync.run_together) two parts pay for much smaller models, but
# a generation after an idle pause (benchmarks/compare_decode.py) gains only from the larger ones:
# the partner, asleep, starts late.
GREEDY_SPLIT_BYTES = 2 << 20
_WEIGHT_BYTES = {"int8": 1, "bf16": 2}


def greedy_parts(weights, k_cache, n_steps):
    """How many threads share a gpt2_decode_greedy or gpt2_decode_sampled call of n_steps steps
    (or a gpt2_decode_prompt call of n_steps tokens a row): two when the task pool has them, the
    tiles run (compiled code) and each step streams at least GREEDY_SPLIT_BYTES of weights, for
    more than one step or token (the hand-off to the partner thread is paid once a call). A
    prompt's tokens are more arithmetic per byte than a step's, so the threshold measured on steps
    is on the safe side. Rows side by side did not move the threshold: tiny int8 (0.35 MB) with
    4-15 rows, greedy or sampled, ran faster on two parts than one in some minutes and slower in
    others (the partner's core shared with another tenant's work)."""
    if n_steps < 2 or task_threads() < 2 or not tiles_run():
        return 1
    L, _, H, _, hs = k_cache.shape
    C, F, V = H * hs, int(weights.d_ff), int(weights.vocab_size)
    fmt = None if weights.quant is None else weights.quant.format
    size = _WEIGHT_BYTES.get(fmt, np.asarray(weights.flat).dtype.itemsize)
    return 2 if (L * (4 * C * C + 2 * C * F) + V * C) * size >= GREEDY_SPLIT_BYTES else 1
