"""Greedy and beam-search decoding for the encoder-decoder model, batched over sources.

The encoder runs once; each step feeds one new token per row to `Seq2SeqTransformer.decode_step`,
which keeps the decoder's self-attention keys/values per layer and reuses the cross-attention
keys/values of the encoder output (see `DecoderState`). The searches themselves only see a
`step(tokens, parents) -> log-probs` function, so they can be tested on a hand-made model.

Scores are sums of log-probabilities of the generated tokens, <eos> included; beam search ranks
finished hypotheses by score / length ** length_penalty (length counts <eos>).
"""

import numpy as np


def log_softmax(logits):
    """log softmax over the last axis, in float64."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def model_step_fn(model, src_ids, src_mask=None, repeat=1, max_len=None):
    """Encode the sources once and return `step(tokens (N,), parents (N,) or None) -> log-probs
    (N, V)` over N = B * repeat rows (row r decodes source r // repeat). `parents` reorders the
    cached rows first (beam search). Also returns the decoding length limit."""
    memory, src_kpm = model.encode(src_ids, src_mask)  # (B, S, C)
    if repeat > 1:
        memory = np.repeat(memory, repeat, axis=0)  # (B * repeat, S, C)
        src_kpm = None if src_kpm is None else np.repeat(src_kpm, repeat, axis=0)
    state = model.init_decoder_state(memory, src_kpm, max_len)

    def step(tokens, parents=None):
        if parents is not None:
            state.reorder(parents)
        return log_softmax(model.decode_step(tokens[:, None], state)[:, 0])  # (N, V)

    return step, state.self_kv[0][0].shape[2]


def _check_search_args(bos_id, eos_id, max_len, beam_size=1):
    for name, v, lo in (("bos_id", bos_id, 0), ("eos_id", eos_id, 0), ("max_len", max_len, 1),
                        ("beam_size", beam_size, 1)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")


def greedy_search(step, n, bos_id, eos_id, max_len):
    """Pick the most probable token at every step for n rows until each has produced <eos> or
    max_len tokens. Returns (sequences: n lists of ids without <bos>/<eos>, scores (n,))."""
    _check_search_args(bos_id, eos_id, max_len)
    tokens = np.full(n, bos_id, dtype=np.int64)
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
    Returns (sequences: n lists without <bos>/<eos>, normalised scores (n,)).
    """
    _check_search_args(bos_id, eos_id, max_len, beam_size)
    K = beam_size
    tokens = np.full(n * K, bos_id, dtype=np.int64)
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
        new_token = np.full((n, K), eos_id, dtype=np.int64)
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


def greedy_decode(model, src_ids, src_mask=None, bos_id=1, eos_id=2, max_len=None):
    """Greedy decoding of a batch of sources (B, S) with a Seq2SeqTransformer. max_len (default
    the model's max_tgt_len) bounds the generated tokens, <eos> included.
    Returns (B lists of target ids without <bos>/<eos>, scores (B,))."""
    step, max_len = model_step_fn(model, src_ids, src_mask, 1, max_len)
    return greedy_search(step, np.shape(src_ids)[0], bos_id, eos_id, max_len)


def beam_decode(model, src_ids, src_mask=None, beam_size=4, length_penalty=1.0, bos_id=1, eos_id=2,
                max_len=None):
    """Beam-search decoding of a batch of sources (B, S); see `beam_search`.
    Returns (B lists of target ids without <bos>/<eos>, normalised scores (B,))."""
    _check_search_args(bos_id, eos_id, 1, beam_size)
    step, max_len = model_step_fn(model, src_ids, src_mask, beam_size, max_len)
    return beam_search(step, np.shape(src_ids)[0], beam_size, bos_id, eos_id, max_len, length_penalty)


def translate(model, texts, src_tokenizer, tgt_tokenizer, beam_size=1, length_penalty=1.0, truncate=False,
              max_len=None):
    """Decode a list of source strings to target strings (greedy when beam_size is 1). A source
    with more than max_src_len tokens is refused with a ValueError, or cut when `truncate`."""
    S = model.config.max_src_len
    seqs = []
    for i, text in enumerate(texts):
        ids = src_tokenizer.encode(text)
        if len(ids) > S and not truncate:
            raise ValueError(f"source {i} has {len(ids)} tokens, more than the model's max_src_len={S}; "
                             f"shorten it or ask for truncation (truncate=True, --truncate)")
        seqs.append(ids[:S] if len(ids) else [src_tokenizer.unk_id])  # an empty source still needs one position
    B, L = len(seqs), max(map(len, seqs))
    src = np.full((B, L), src_tokenizer.pad_id, dtype=np.int64)
    mask = np.zeros((B, L), dtype=np.int64)
    for b, s in enumerate(seqs):
        src[b, :len(s)], mask[b, :len(s)] = s, 1
    bos, eos = tgt_tokenizer.bos_id, tgt_tokenizer.eos_id
    if beam_size == 1:
        out, _ = greedy_decode(model, src, mask, bos, eos, max_len)
    else:
        out, _ = beam_decode(model, src, mask, beam_size, length_penalty, bos, eos, max_len)
    return [tgt_tokenizer.decode(o) for o in out]
