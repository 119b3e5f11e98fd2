"""Sampling over any model's `step(tokens, state) -> logits`: greedy, temperature, top-k, top-p,
repetition penalty, <eos>, streaming.

`sample_tokens` is the loop itself: it sees only a function from the tokens just chosen to the
next logits, so a language model (`generate`, prompts in a KVCache) and an encoder-decoder
(`sample_decode`, <bos> after the encoded sources) sample through the same code. For a language
model the prompt runs through the model once, filling its cache; each new token then costs one
O(T) attention per layer, and once a sequence outgrows the context window the model runs its
last `max_seq_len` tokens again (nanoGPT's crop). Prompts of different lengths are left-padded
and positions count real tokens only, so a row generates the same tokens alone or in a batch.
Each step takes the last position's logits, applies the repetition penalty, and picks the next id:

    temperature == 0   greedy: the argmax (lowest id among equal maxima)
    temperature > 0    sample from softmax(logits / temperature), after
        top_k          keeping the tokens whose logit is at least the k-th largest -- all tokens
                       tied with the k-th are kept, so the result never depends on id order
        top_p          keeping the smallest set of most probable tokens whose mass reaches p
"""

import time

import numpy as np

from fastformer import seeds
from fastformer.errors import FastformerError, check_ids, check_int, check_number
from fastformer.kernels import get_ops


def log_softmax(logits):
    """log softmax over the last axis, in float64."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def sample_next(logits, temperature=0.0, top_k=None, top_p=None, rng=None):
    """Next ids (B,) int64 from last-position logits (B, V); rng is needed when temperature > 0:
    one uniform draw per row, which the kernel interface's `sample_ids` turns into an id."""
    if temperature == 0:
        return np.argmax(logits, axis=-1).astype(np.int64)
    return get_ops().sample_ids(logits, rng.random(logits.shape[0]), temperature, top_k, top_p)


def apply_repetition_penalty(logits, seen, penalty):
    """CTRL's repetition penalty on logits (B, V) for the ids marked in `seen` (B, V): a positive
    logit is divided by `penalty`, a negative one multiplied by it."""
    return np.where(seen, np.where(logits > 0, logits / penalty, logits * penalty), logits)


def cut_at_eos(row, eos_id, keep=False):
    """The ids of `row` (1-D) before its first `eos_id` (through it with keep=True); the whole row
    when it holds none or eos_id is None."""
    if eos_id is None or not (row == eos_id).any():
        return row
    return row[:int(np.argmax(row == eos_id)) + (1 if keep else 0)]


def prompt_batch(prompt_ids, attention_mask, vocab_size):
    """(ids (B, T0) int64, mask (B, T0) int64, how to return the result)."""
    ragged = isinstance(prompt_ids, (list, tuple)) and len(prompt_ids) > 0 and not np.isscalar(prompt_ids[0])
    if ragged:
        if attention_mask is not None:
            raise FastformerError("attention_mask is only for a 2-D prompt array; a list of prompts is padded here")
        rows = [np.asarray(p) for p in prompt_ids]
        for r in rows:
            if r.ndim != 1 or r.dtype.kind not in "iu" or r.size == 0:
                raise FastformerError(f"each prompt in a list must be a non-empty 1-D integer sequence, "
                                      f"got {r.dtype} {r.shape}")
        T0 = max(r.size for r in rows)
        ids = np.zeros((len(rows), T0), np.int64)
        mask = np.zeros((len(rows), T0), np.int64)
        for b, r in enumerate(rows):  # left padding: the newest tokens line up on the right
            ids[b, T0 - r.size:] = r
            mask[b, T0 - r.size:] = 1
        kind = "list"
    else:
        prompt = np.asarray(prompt_ids)
        if prompt.dtype.kind not in "iu" or prompt.ndim not in (1, 2):
            raise FastformerError(f"prompt_ids must be a 1-D or 2-D integer array (or a list of prompts), got "
                                  f"{prompt.dtype} {prompt.shape}")
        if prompt.shape[-1] == 0:
            raise FastformerError("prompt_ids is empty: give at least one token (e.g. <bos>)")
        ids = np.atleast_2d(prompt).astype(np.int64)
        if attention_mask is None:
            mask = np.ones_like(ids)
        else:
            mask = np.asarray(attention_mask).astype(np.int64).reshape(ids.shape)
            if not (mask[:, -1] == 1).all() or (np.diff(mask, axis=1) < 0).any():
                raise FastformerError("attention_mask must be left padding: 0s then 1s in each row, ending with "
                                      "a token")
        kind = "2d" if prompt.ndim == 2 else "1d"
    return check_ids("prompt_ids", ids, vocab_size), mask, kind


def check_sampling(temperature, top_k, top_p, repetition_penalty):
    """Validate the sampling options once, before any step."""
    check_number("temperature", temperature, 0, finite=True)
    if top_k is not None:
        check_int("top_k", top_k)
    if top_p is not None:
        check_number("top_p", top_p, 0, 1, low_open=True)
    if repetition_penalty is not None:
        check_number("repetition_penalty", repetition_penalty, 0, low_open=True, finite=True)


def check_seed_and_eos(seed, eos_id, vocab_size):
    """A sampling seed (None or an int >= 0) and an <eos> id (None or an id of the vocabulary),
    or FastformerError naming them."""
    if seed is not None:
        check_int("seed", seed, minimum=0)
    if eos_id is not None:
        check_int("eos_id", eos_id, minimum=0, maximum=vocab_size - 1)


def check_id_limit(id_limit, vocab_size):
    """`id_limit` (None, or ids below it only: a tokenizer with fewer ids than the model's
    vocabulary of `vocab_size`), checked."""
    if id_limit is not None:
        check_int("id_limit", id_limit, maximum=vocab_size)
    return id_limit


# A model's several-step greedy call (greedy_steps) makes at most GREEDY_CHUNK tokens, and as many as
# take about GREEDY_SECONDS by the last call's pace (the first call's: the prompt's time): a fast
# model's tokens arrive in chunks, a slow one's stream (and stop at Ctrl-C) as they come. Each call
# pays a fixed cost of Python and hand-offs around the kernel, so a fast model's chunk is bounded by
# the time alone: a small cap on its tokens would only add calls. `generate`, which hands out nothing
# before the end, bounds a call by GENERATE_SECONDS instead, about as long as a Ctrl-C may wait (a
# kernel call runs to its end): a 128-token generation of the presets is then one call, not two.
GREEDY_CHUNK, GREEDY_SECONDS, GENERATE_SECONDS = 256, 0.02, 0.25


def sample_tokens(step, logits, n_steps, temperature=0.0, top_k=None, top_p=None, rng=None, eos_id=None,
                  repetition_penalty=None, seen=None, id_limit=None, greedy_steps=None, pace=None, sampled_steps=None):
    """Yield the next ids (N,) of every row for up to `n_steps` steps.

    `logits` (N, V) are the first step's (what the prompt or <bos> gave); `step(ids (N,))`
    feeds the ids just chosen and returns the next logits (N, V). `seen` (N, V) bool marks
    the ids each row already holds, for the repetition penalty. Rows that have produced
    `eos_id` keep yielding it; the generator stops when all have. `id_limit`: only ids below it
    are chosen (a model whose embedding is padded past its tokenizer's ids).
    `greedy_steps(ids (N,), n, done)`, when given, feeds ids and makes up to n plain greedy
    tokens in one call, keeping `done` as this loop does: (tokens (N, m), whether the last
    column's choice was NaN), or None where it does not run (the fused kernel's loop,
    TransformerLM.greedy_steps); the tokens are yielded one by one, as the loop's own, and each
    chunk makes as many as GREEDY_SECONDS allow at the last one's pace. `pace`: seconds a token
    takes at most, for the first chunk (the prompt's time: a token costs no more than the prompt
    that ran the whole model before it, though a long prompt composed on every BLAS thread can run
    faster a token than one step; the chunk is then at most GREEDY_CHUNK tokens late); without it
    the first chunk is one token. `sampled_steps(ids, n, done)`, likewise, makes up to n tokens
    drawn at temperature > 0 with top_k (no top_p, penalty or id_limit), taking their draws from
    rng as this loop would: (tokens (N, m), None or the logits after them when no token can be
    drawn from those), or None.
    """
    yield from _one_by_one(sample_blocks(step, logits, n_steps, temperature, top_k, top_p, rng, eos_id,
                                         repetition_penalty, seen, id_limit, greedy_steps, pace, sampled_steps))


def _one_by_one(blocks):
    """The ids (N,) of each step of blocks (N, m), each its own array."""
    for block in blocks:
        for c in range(block.shape[1]):
            yield block[:, c].copy()


def sample_blocks(step, logits, n_steps, temperature=0.0, top_k=None, top_p=None, rng=None, eos_id=None,
                  repetition_penalty=None, seen=None, id_limit=None, greedy_steps=None, pace=None, sampled_steps=None,
                  seconds=GREEDY_SECONDS):
    """sample_tokens' loop, yielding the ids (N, m) of m >= 1 steps at once: a greedy_steps or
    sampled_steps chunk's whole, each other step alone, each chunk as many steps as `seconds`
    allow at the last one's pace. For `generate`, which keeps them all: a token handed out alone
    costs Python time that counts beside a tiny model's token."""
    N, V = logits.shape
    seen = np.zeros((N, V), dtype=bool) if seen is None else seen
    done = np.zeros(N, dtype=bool)
    rows = np.arange(N)
    plain = repetition_penalty is None and (id_limit is None or id_limit >= V)
    # plain greedy: the argmax is the only pass over the logits (the NaN check reads the chosen ones)
    plain_greedy = temperature == 0 and plain
    # several steps a call: plain greedy, or plain draws without top-p
    several = greedy_steps if plain_greedy else sampled_steps if plain and top_p is None else None
    nxt = None
    stuck = None  # the logits a sampled_steps call stopped at: this loop refuses them
    i = 0  # tokens yielded
    chunk = 1 if pace is None else _chunk(pace, seconds)  # of the next call of `several`
    while i < n_steps:
        if i and several is not None and stuck is None:
            began = time.perf_counter()
            made = several(nxt, min(n_steps - i, chunk), None if eos_id is None else done)
            if made is not None and (made[0].shape[1] or (not plain_greedy and made[1] is not None)):
                tokens, last = made  # last: greedy, whether the last choice was NaN; sampled, the stuck logits
                m = tokens.shape[1]
                ran = m + (not plain_greedy and last is not None)
                chunk = _chunk((time.perf_counter() - began) / ran, seconds)
                if plain_greedy and last:  # the tokens before the NaN's, then the refusal
                    if m > 1:
                        yield tokens[:, :m - 1]
                    _refuse_nan(i + m)
                if not plain_greedy:
                    stuck = last
                if m:
                    nxt = tokens[:, m - 1].copy()
                    i += m
                    yield tokens
                if eos_id is not None and done.all():
                    return
                continue
        if i:
            logits = step(nxt) if stuck is None else stuck
        if plain_greedy:
            nxt = np.argmax(logits, axis=-1).astype(np.int64, copy=False)  # (N,); a NaN row: its first NaN
            nan = np.isnan(logits[rows, nxt]).any()
        else:  # max is NaN when any logit is: one pass per token, no (N, V) mask
            nan = np.isnan(logits.max())
        if nan:
            _refuse_nan(i + 1)
        if not plain_greedy:
            if id_limit is not None and id_limit < V:
                logits = np.array(logits)
                logits[:, id_limit:] = -np.inf
            if repetition_penalty is not None:
                logits = apply_repetition_penalty(logits, seen, repetition_penalty)
            nxt = sample_next(logits, temperature, top_k, top_p, rng)  # (N,)
        if eos_id is not None:
            nxt[done] = eos_id
            done |= nxt == eos_id
        if repetition_penalty is not None:  # only the penalty reads `seen`
            seen[rows, nxt] = True
        i += 1
        yield nxt[:, None].copy()
        if eos_id is not None and done.all():
            return


def _chunk(pace, seconds):
    """Tokens a greedy_steps call makes at `pace` seconds a token, to last about `seconds`."""
    return max(1, min(GREEDY_CHUNK, int(seconds / max(pace, 1e-9))))


def _refuse_nan(token):
    # finite weights can still overflow on some text: stop, not pick garbage
    raise FastformerError(f"the model's logits became NaN at new token {token}: it overflows on this text; use an "
                          f"earlier checkpoint or another prompt")


def lm_step_fn(model, state):
    """`step(ids (N,) or (N, T)) -> logits (N, V)` of the last position, over a language
    model's decoding state; the ids are the model's own choices, so they are not checked again."""
    def step(ids):
        ids = ids[:, None] if ids.ndim == 1 else ids
        return model.step(ids, state, validate=False, last=True)[:, -1]
    return step


def generate_tokens(model, prompt_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None, seed=None,
                    eos_id=None, repetition_penalty=None, attention_mask=None, use_cache=True, id_limit=None):
    """Yield the next ids (B,) of every row, step by step (see `generate` for the arguments).
    Rows that have produced `eos_id` keep yielding it; the generator stops when all have.
    `id_limit`: choose only ids below it (a tokenizer with fewer ids than the model's embedding)."""
    ids, mask, _ = prompt_batch(prompt_ids, attention_mask, model.config.vocab_size)
    check_id_limit(id_limit, model.config.vocab_size)
    yield from _one_by_one(_generate_blocks(model, ids, mask, max_new_tokens, temperature, top_k, top_p, seed,
                                            eos_id, repetition_penalty, use_cache, id_limit))


def _generate_blocks(model, ids, mask, max_new_tokens, temperature, top_k, top_p, seed, eos_id, repetition_penalty,
                     use_cache, id_limit=None, seconds=GREEDY_SECONDS):
    """`generate_tokens`' ids in blocks (sample_blocks, each call of several steps lasting about
    `seconds`), for a prompt batch already made by `prompt_batch`."""
    check_int("max_new_tokens", max_new_tokens, 0)
    check_sampling(temperature, top_k, top_p, repetition_penalty)
    check_seed_and_eos(seed, eos_id, model.config.vocab_size)
    if max_new_tokens == 0:
        return
    B, V = ids.shape[0], model.config.vocab_size
    seen = np.zeros((B, V), dtype=bool)  # ids present in each row, for the repetition penalty
    if repetition_penalty is not None:
        real = mask.astype(bool)
        seen[np.nonzero(real)[0], ids[real]] = True
    state = model.init_state(B, use_cache=use_cache)
    began = time.perf_counter()
    logits = model.step(ids, state, attention_mask=mask, validate=False, last=True)[:, -1]  # (B, V): the prompt
    rng = seeds.sampling_stream(seed) if temperature else None
    yield from sample_blocks(lm_step_fn(model, state), logits, max_new_tokens, temperature, top_k, top_p, rng, eos_id,
                             repetition_penalty, seen, id_limit,
                             lambda ids, n, done: model.greedy_steps(ids, state, n, done, eos_id),
                             pace=time.perf_counter() - began,
                             sampled_steps=lambda ids, n, done: model.sampled_steps(ids, state, n, rng, temperature,
                                                                                    top_k, done, eos_id),
                             seconds=seconds)


def finish(prompt_ids, ids, new, kind, eos_id):
    """The prompts with their new tokens (B, n) in the form `generate` returns."""
    if kind == "list":
        out = []
        for p, row in zip(prompt_ids, new):
            out.append(np.concatenate([np.asarray(p, dtype=np.int64), cut_at_eos(row, eos_id, keep=True)]))
        return out
    full = np.concatenate([ids, new], axis=1)
    return full if kind == "2d" else full[0]


def generate(model, prompt_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None, seed=None,
             eos_id=None, repetition_penalty=None, attention_mask=None, use_cache=True, id_limit=None):
    """Continue prompts with up to max_new_tokens sampled tokens.

    Args:
        model: a language model (`init_state(batch_size)`, `step(tokens, state)`, `config`).
        prompt_ids: (T0,) one prompt, (B, T0) a batch (left-padded if `attention_mask` is given),
            or a list of 1-D prompts of different lengths.
        temperature, top_k, top_p: see the module docstring.
        seed: seeds the sampling generator (ignored when greedy).
        eos_id: stop a row once it has produced this id; finished rows are padded with it.
        repetition_penalty: > 1 discourages ids already in the row (None or 1.0: off).
        use_cache: False runs a full forward per token (slower; the same tokens).
        id_limit: choose only ids below it (a tokenizer with fewer ids than the model's embedding).
    Returns prompt plus new tokens, int64: (T0 + n,) or (B, T0 + n), n <= max_new_tokens; for a
    list of prompts, a list of 1-D arrays, each cut after its first eos_id.
    """
    ids, mask, kind = prompt_batch(prompt_ids, attention_mask, model.config.vocab_size)
    check_id_limit(id_limit, model.config.vocab_size)
    blocks = list(_generate_blocks(model, ids, mask, max_new_tokens, temperature, top_k, top_p, seed, eos_id,
                                   repetition_penalty, use_cache, id_limit, seconds=GENERATE_SECONDS))
    new = np.concatenate(blocks, axis=1) if blocks else np.zeros((ids.shape[0], 0), np.int64)  # (B, n)
    return finish(prompt_ids, ids, new, kind, eos_id)


def sample_decode(model, src_ids, src_mask=None, bos_id=1, eos_id=2, max_len=None, temperature=1.0, top_k=None,
                  top_p=None, seed=None, repetition_penalty=None, id_limit=None):
    """Sampled decoding of a batch of sources (B, S) with an encoder-decoder (`init_state(src,
    mask)`, `step(tokens, state)`): <bos>, then up to max_len tokens (default the model's
    max_tgt_len), <eos> included, each drawn as `generate` draws them (`id_limit`: only target
    ids below it). Returns (B lists of
    target ids without <bos>/<eos>, scores (B,): the summed log-probabilities of the drawn
    tokens under the model, before temperature and filtering)."""
    check_sampling(temperature, top_k, top_p, repetition_penalty)
    state = model.init_state(src_ids, src_mask, max_len=max_len)
    B, V = state.batch_size, model.config.tgt_vocab_size
    check_int("bos_id", bos_id, 0, V - 1)
    check_int("eos_id", eos_id, 0, V - 1)
    check_id_limit(id_limit, V)
    last = {}

    def step(ids):
        last["logits"] = model.step(ids[:, None], state, validate=False)[:, -1]
        return last["logits"]

    logits = step(np.full(B, bos_id, np.int64))
    out = np.zeros((B, 0), np.int64)
    scores = np.zeros(B)
    done = np.zeros(B, dtype=bool)
    for nxt in sample_tokens(step, logits, state.max_len, temperature, top_k, top_p, seeds.sampling_stream(seed),
                             eos_id, repetition_penalty, id_limit=id_limit):
        scores += np.where(done, 0.0, log_softmax(last["logits"])[np.arange(B), nxt])
        done |= nxt == eos_id
        out = np.concatenate([out, nxt[:, None]], axis=1)
    return [cut_at_eos(row, eos_id).tolist() for row in out], scores
