"""Greedy and beam search over any model's `step(tokens, state) -> logits`, batched.

The searches only see a `step(tokens, parents) -> log-probs` function (`search_step` makes one
from a model and its decoding state; `parents` reorders the state's rows first, as beam search
needs), so they can be tested on a hand-made model. An encoder-decoder starts from <bos> after
its sources are encoded once (`greedy_decode`, `beam_decode`, `translate`); a language model
starts from its prompts (`beam_generate`, `TransformerLM.generate(..., beam_size=N)`).

A model whose vocabulary is padded past its tokenizer's ids is searched over the tokenizer's ids
only (`id_limit`, as sampling does): the padding ids get log-probability -inf at every step.

Scores are sums of log-probabilities of the generated tokens, <eos> included; beam search ranks
finished hypotheses by score / length ** length_penalty (length counts <eos>).
"""

import numpy as np

from fastformer.errors import FastformerError, check_int, check_number
from fastformer.generation.sampling import (
    check_id_limit,
    check_seed_and_eos,
    finish,
    log_softmax,
    prompt_batch,
    sample_decode,
)


def search_step(model, state, first_mask=None, id_limit=None):
    """`step(tokens (N,) or (N, T), parents (N,) or None) -> log-probs (N, V)` of the last
    position, over `model.step` and its decoding `state`. `parents` first reorders the state's
    rows (row r continues from row parents[r]). `first_mask` is the attention mask of the
    first call's tokens (a left-padded prompt). Only the first call's tokens are checked: later
    ones are the search's own choices. `id_limit`: the ids from it on get -inf, so no search
    picks them (the log-probs are those of the ids below it)."""
    calls = {"n": 0}

    def step(tokens, parents=None):
        if parents is not None:
            state.reorder(parents)
        tokens = tokens[:, None] if tokens.ndim == 1 else tokens
        first = calls["n"] == 0
        calls["n"] += 1
        logits = model.step(tokens, state, attention_mask=first_mask if first else None, validate=first,
                            last=True)[:, -1]
        if id_limit is not None and id_limit < logits.shape[-1]:
            logits = np.array(logits)
            logits[:, id_limit:] = -np.inf
        return log_softmax(logits)  # (N, V)

    return step


def _check_search_args(bos_id, eos_id, max_len, beam_size=1):
    check_int("max_len", max_len)
    check_int("beam_size", beam_size)
    if np.ndim(bos_id) == 0:
        check_int("bos_id", bos_id, 0)
    if eos_id is not None:
        check_int("eos_id", eos_id, 0)


def _first_tokens(bos_id, rows):
    """The first step's tokens: <bos> for every row, or the given (rows, T0) array."""
    if np.ndim(bos_id) == 0:
        return np.full(rows, bos_id, dtype=np.int64)
    first = np.asarray(bos_id)
    if first.ndim != 2 or first.shape[0] != rows:
        raise FastformerError(f"the first tokens must be an int or an array ({rows}, T0), got shape {first.shape}")
    return first


def greedy_search(step, n, bos_id, eos_id, max_len):
    """Pick the most probable token at every step for n rows until each has produced <eos> or
    max_len tokens. `bos_id` is the first token of every row, or an (n, T0) array of first
    tokens (prompts); eos_id None runs every row to max_len.
    Returns (sequences: n lists of new ids without <eos>, scores (n,))."""
    _check_search_args(bos_id, eos_id, max_len)
    tokens = _first_tokens(bos_id, n)
    out = np.zeros((n, max_len), dtype=np.int64)
    lengths = np.full(n, max_len)
    scores = np.zeros(n)
    done = np.zeros(n, dtype=bool)
    for t in range(max_len):
        logp = step(tokens)  # (n, V)
        tokens = logp.argmax(axis=-1)
        scores += np.where(done, 0.0, logp[np.arange(n), tokens])
        out[:, t] = tokens
        ended = ~done & (tokens == eos_id)
        lengths[ended] = t
        done |= ended
        if done.all():
            break
    return [out[i, :lengths[i]].tolist() for i in range(n)], scores


def beam_search(step, n, beam_size, bos_id, eos_id, max_len, length_penalty=1.0):
    """Beam search for n sources with `beam_size` beams each (rows b * beam_size + k of `step`).

    Each step extends every live beam by every token and keeps the best 2 * beam_size
    candidates per source: those ending in <eos> among the first beam_size become finished
    hypotheses, the others fill the beams. A source is done when it has beam_size finished
    hypotheses and none of its live beams, normalised at the current length, scores higher
    than the worst of them; at max_len the live beams count as hypotheses too.
    `bos_id` is the first token of every row, or an (n * beam_size, T0) array of first tokens
    (each source's prompt repeated for its beams); eos_id None runs every beam to max_len.
    Returns (sequences: n lists of new ids without <eos>, normalised scores (n,)).
    """
    _check_search_args(bos_id, eos_id, max_len, beam_size)
    check_number("length_penalty", length_penalty, finite=True)
    K = beam_size
    tokens = _first_tokens(bos_id, n * K)
    parents = None
    alive = np.full((n, K), -np.inf)
    alive[:, 0] = 0.0  # one live beam to start with; the others would be copies of it
    seqs = np.zeros((n, K, 0), dtype=np.int64)
    finished = [[] for _ in range(n)]  # [(normalised score, ids)], best first, at most K
    done = np.zeros(n, dtype=bool)
    for t in range(max_len):
        logp = step(tokens, parents)  # (n K, V)
        V = logp.shape[-1]
        cand = (alive[:, :, None] + logp.reshape(n, K, V)).reshape(n, K * V)
        top = np.argsort(-cand, axis=1, kind="stable")[:, :2 * K]  # (n, 2K)
        norm = float(t + 1) ** length_penalty
        new_alive = np.full((n, K), -np.inf)
        new_parent = np.tile(np.arange(K), (n, 1))
        new_token = np.full((n, K), 0 if eos_id is None else eos_id, dtype=np.int64)  # dead beams: any token
        for b in range(n):
            if done[b]:
                continue
            k = 0
            for rank, j in enumerate(top[b]):
                score = cand[b, j]
                if score == -np.inf or k == K:
                    break
                parent, tok = divmod(int(j), V)
                if tok == eos_id:
                    if rank < K:
                        finished[b].append((score / norm, seqs[b, parent].tolist()))
                else:
                    new_alive[b, k], new_parent[b, k], new_token[b, k] = score, parent, tok
                    k += 1
            finished[b] = sorted(finished[b], key=lambda h: -h[0])[:K]
            best_alive = new_alive[b].max() / norm
            if len(finished[b]) == K and finished[b][-1][0] >= best_alive:
                done[b] = True
        seqs = np.concatenate([np.take_along_axis(seqs, new_parent[:, :, None], axis=1),
                               new_token[:, :, None]], axis=2)  # (n, K, t + 1)
        alive = new_alive
        if done.all():
            break
        tokens = new_token.reshape(-1)
        parents = (np.arange(n)[:, None] * K + new_parent).reshape(-1)
    for b in range(n):
        if not done[b]:  # out of length: live beams are hypotheses as they stand
            norm = float(seqs.shape[2]) ** length_penalty
            finished[b] += [(alive[b, k] / norm, seqs[b, k].tolist()) for k in range(K) if alive[b, k] > -np.inf]
            finished[b].sort(key=lambda h: -h[0])
    return [f[0][1] for f in finished], np.array([f[0][0] for f in finished])


def greedy_decode(model, src_ids, src_mask=None, bos_id=1, eos_id=2, max_len=None, id_limit=None):
    """Greedy decoding of a batch of sources (B, S) with an encoder-decoder. max_len (default
    the model's max_tgt_len) bounds the generated tokens, <eos> included; `id_limit`: only
    target ids below it (a tokenizer with fewer ids than the model's target vocabulary).
    Returns (B lists of target ids without <bos>/<eos>, scores (B,))."""
    check_id_limit(id_limit, model.config.tgt_vocab_size)
    state = model.init_state(src_ids, src_mask, max_len=max_len)
    return greedy_search(search_step(model, state, id_limit=id_limit), state.batch_size, bos_id, eos_id,
                         state.max_len)


def beam_decode(model, src_ids, src_mask=None, beam_size=4, length_penalty=1.0, bos_id=1, eos_id=2,
                max_len=None, id_limit=None):
    """Beam-search decoding of a batch of sources (B, S); see `beam_search` (`id_limit` as in
    `greedy_decode`). Returns (B lists of target ids without <bos>/<eos>, normalised scores (B,))."""
    _check_search_args(bos_id, eos_id, 1, beam_size)
    check_id_limit(id_limit, model.config.tgt_vocab_size)
    state = model.init_state(src_ids, src_mask, repeat=beam_size, max_len=max_len)
    return beam_search(search_step(model, state, id_limit=id_limit), state.batch_size // beam_size, beam_size,
                       bos_id, eos_id, state.max_len, length_penalty)


def beam_generate(model, prompt_ids, max_new_tokens, beam_size, eos_id=None, length_penalty=1.0,
                  attention_mask=None, use_cache=True, id_limit=None):
    """Beam search continuing language-model prompts (the arguments and the result of
    `fastformer.generation.sampling.generate`, `id_limit` included): the most probable
    continuation of up to max_new_tokens tokens per prompt, <eos> (when given and produced) included."""
    ids, mask, kind = prompt_batch(prompt_ids, attention_mask, model.config.vocab_size)
    check_int("max_new_tokens", max_new_tokens)
    check_int("beam_size", beam_size)
    check_seed_and_eos(None, eos_id, model.config.vocab_size)
    check_id_limit(id_limit, model.config.vocab_size)
    B, K = ids.shape[0], beam_size
    state = model.init_state(B * K, use_cache=use_cache)
    step = search_step(model, state, np.repeat(mask, K, axis=0), id_limit)
    seqs, _ = beam_search(step, B, K, np.repeat(ids, K, axis=0), eos_id, max_new_tokens, length_penalty)
    # a hypothesis shorter than max_new_tokens ended with <eos>: put it back, and pad with it
    rows = [s + [eos_id] if len(s) < max_new_tokens else s for s in seqs]
    new = np.full((B, max(map(len, rows))), -1 if eos_id is None else eos_id, dtype=np.int64)
    for b, r in enumerate(rows):
        new[b, :len(r)] = r
    return finish(prompt_ids, ids, new, kind, eos_id)


def translate(model, texts, src_tokenizer, tgt_tokenizer, beam_size=1, length_penalty=1.0, truncate=False,
              max_len=None, temperature=0.0, top_k=None, top_p=None, seed=None, decode=None):
    """Decode a list of source strings to target strings: greedy when beam_size is 1 and
    temperature 0, beam search when beam_size > 1, sampling (top_k, top_p, seed as in
    `generate`) when temperature > 0. A source with more than max_src_len tokens is refused
    with a FastformerError, or cut when `truncate`. `decode` turns each output's ids into its
    string (default tgt_tokenizer.decode)."""
    sampling = temperature != 0 or top_k is not None or top_p is not None
    if sampling and beam_size != 1:
        raise FastformerError("beam search is deterministic: give temperature, top_k or top_p only with beam "
                              "size 1")
    if sampling and not temperature:
        raise FastformerError("top_k and top_p filter a sampling distribution: give a temperature > 0 with them")
    S = model.config.max_src_len
    seqs = []
    for i, text in enumerate(texts):
        ids = src_tokenizer.encode(text)
        if len(ids) > S and not truncate:
            raise FastformerError(f"source {i} has {len(ids)} tokens, more than the model's max_src_len={S}; "
                             f"shorten it or ask for truncation (truncate=True, --truncate)")
        seqs.append(ids[:S] if len(ids) else [src_tokenizer.unk_id])  # an empty source still needs one position
    B, L = len(seqs), max(map(len, seqs))
    src = np.full((B, L), src_tokenizer.pad_id, dtype=np.int64)
    mask = np.zeros((B, L), dtype=np.int64)
    for b, s in enumerate(seqs):
        src[b, :len(s)], mask[b, :len(s)] = s, 1
    bos, eos = tgt_tokenizer.bos_id, tgt_tokenizer.eos_id
    limit = min(tgt_tokenizer.vocab_size, model.config.tgt_vocab_size)  # no id the tokenizer cannot decode
    if sampling:
        out, _ = sample_decode(model, src, mask, bos, eos, max_len, temperature, top_k, top_p, seed, id_limit=limit)
    elif beam_size == 1:
        out, _ = greedy_decode(model, src, mask, bos, eos, max_len, id_limit=limit)
    else:
        out, _ = beam_decode(model, src, mask, beam_size, length_penalty, bos, eos, max_len, id_limit=limit)
    return [(decode or tgt_tokenizer.decode)(o) for o in out]
