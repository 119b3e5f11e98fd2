"""Autoregressive sampling from a language model: greedy, temperature, top-k and top-p.

The prompt runs through the model once, filling a per-layer key/value cache; after that each
new token costs one O(T) attention per layer (`TransformerLM.decode`). Once a sequence outgrows
the context window every step is a full forward over its last `max_seq_len` tokens, as nanoGPT
crops. Prompts of different lengths are left-padded and positions count real tokens only, so a
row generates the same tokens alone or in a batch. Each step takes the last position's logits,
applies the repetition penalty, and picks the next id:

    temperature == 0   greedy: the argmax (lowest id among equal maxima)
    temperature > 0    sample from softmax(logits / temperature), after
        top_k          keeping the tokens whose logit is at least the k-th largest -- all tokens
                       tied with the k-th are kept, so the result never depends on id order
        top_p          keeping the smallest set of most probable tokens whose mass reaches p
"""

import numpy as np


def filter_top_k(logits, k):
    """Logits (..., V) with every entry below the k-th largest of its row set to -inf."""
    V = logits.shape[-1]
    if not 1 <= k:
        raise ValueError(f"top_k must be an integer >= 1, got {k}")
    if k >= V:
        return logits
    kth = np.partition(logits, V - k, axis=-1)[..., V - k:V - k + 1]  # (..., 1)
    return np.where(logits >= kth, logits, -np.inf)


def filter_top_p(probs, p):
    """Probabilities (..., V) restricted to the smallest set of most probable tokens whose total
    reaches p, renormalised. Ties in probability are broken by lower id."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1], got {p}")
    order = np.argsort(-probs, axis=-1, kind="stable")  # (..., V) most probable first
    sorted_p = np.take_along_axis(probs, order, axis=-1)
    cum = np.cumsum(sorted_p, axis=-1)
    # keep sorted position j while the mass before it is still short of p
    keep_sorted = (cum - sorted_p) < p * (1.0 - 1e-12)
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    out = np.where(keep, probs, 0.0)
    return out / out.sum(axis=-1, keepdims=True)


def next_token_probs(logits, temperature, top_k=None, top_p=None):
    """The sampling distribution (B, V) float64 for last-position logits (B, V), temperature > 0."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    if top_k is not None:
        z = filter_top_k(z, top_k)
    z = z - z.max(axis=-1, keepdims=True)
    probs = np.exp(z)
    probs /= probs.sum(axis=-1, keepdims=True)
    if top_p is not None:
        probs = filter_top_p(probs, top_p)
    return probs


def sample_next(logits, temperature=0.0, top_k=None, top_p=None, rng=None):
    """Next ids (B,) int64 from last-position logits (B, V); rng is needed when temperature > 0."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return np.argmax(logits, axis=-1).astype(np.int64)
    probs = next_token_probs(logits, temperature, top_k, top_p)  # (B, V)
    # inverse-CDF sampling, one uniform draw per row; `<=` steps over zero-probability ids
    u = rng.random(probs.shape[0])[:, None]  # (B, 1)
    cdf = np.cumsum(probs, axis=-1)  # (B, V)
    idx = (cdf <= u * cdf[:, -1:]).sum(axis=-1)
    last = probs.shape[-1] - 1 - np.argmax(probs[:, ::-1] > 0, axis=-1)  # last id with mass
    return np.minimum(idx, last).astype(np.int64)


def apply_repetition_penalty(logits, seen, penalty):
    """CTRL's repetition penalty on logits (B, V) for the ids marked in `seen` (B, V): a positive
    logit is divided by `penalty`, a negative one multiplied by it."""
    return np.where(seen, np.where(logits > 0, logits / penalty, logits * penalty), logits)


def _positions(mask):
    """Position ids that count real tokens only: (B, T) from a left-padded 0/1 mask."""
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0)


def _prompt_batch(prompt_ids, attention_mask):
    """(ids (B, T0) int64, mask (B, T0) int64, how to return the result)."""
    ragged = isinstance(prompt_ids, (list, tuple)) and len(prompt_ids) > 0 and not np.isscalar(prompt_ids[0])
    if ragged:
        if attention_mask is not None:
            raise ValueError("attention_mask is only for a 2-D prompt array; a list of prompts is padded here")
        rows = [np.asarray(p) for p in prompt_ids]
        for r in rows:
            if r.ndim != 1 or r.dtype.kind not in "iu" or r.size == 0:
                raise ValueError(f"each prompt in a list must be a non-empty 1-D integer sequence, "
                                 f"got {r.dtype} {r.shape}")
        T0 = max(r.size for r in rows)
        ids = np.zeros((len(rows), T0), np.int64)
        mask = np.zeros((len(rows), T0), np.int64)
        for b, r in enumerate(rows):  # left padding: the newest tokens line up on the right
            ids[b, T0 - r.size:] = r
            mask[b, T0 - r.size:] = 1
        return ids, mask, "list"
    prompt = np.asarray(prompt_ids)
    if prompt.dtype.kind not in "iu" or prompt.ndim not in (1, 2):
        raise ValueError(f"prompt_ids must be a 1-D or 2-D integer array (or a list of prompts), got "
                         f"{prompt.dtype} {prompt.shape}")
    if prompt.shape[-1] == 0:
        raise ValueError("prompt_ids is empty: give at least one token (e.g. <bos>)")
    ids = np.atleast_2d(prompt).astype(np.int64)
    if attention_mask is None:
        mask = np.ones_like(ids)
    else:
        mask = np.asarray(attention_mask).astype(np.int64).reshape(ids.shape)
        if not (mask[:, -1] == 1).all() or (np.diff(mask, axis=1) < 0).any():
            raise ValueError("attention_mask must be left padding: 0s then 1s in each row, ending with a token")
    return ids, mask, "2d" if prompt.ndim == 2 else "1d"


def generate_tokens(model, prompt_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None, seed=None,
                    eos_id=None, repetition_penalty=None, attention_mask=None, use_cache=True):
    """Yield the next ids (B,) of every row, step by step (see `generate` for the arguments).
    Rows that have produced `eos_id` keep yielding it; the generator stops when all have."""
    ids, mask, _ = _prompt_batch(prompt_ids, attention_mask)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be None or lie in (0, 1], got {top_p}")
    if repetition_penalty is not None and not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be None or > 0, got {repetition_penalty}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    rng = np.random.default_rng(seed)
    B, V, Tmax = ids.shape[0], model.config.vocab_size, model.config.max_seq_len
    ids, mask = ids[:, -Tmax:], mask[:, -Tmax:]  # a prompt longer than the context is cropped
    seen = np.zeros((B, V), dtype=bool)  # ids present in each row, for the repetition penalty
    if repetition_penalty is not None:
        real = mask.astype(bool)
        seen[np.nonzero(real)[0], ids[real]] = True
    # the sequences so far, in buffers filled step by step (new tokens are never padding)
    T0 = ids.shape[1]
    all_ids = np.empty((B, T0 + max_new_tokens), np.int64)
    all_ids[:, :T0] = ids
    all_mask = np.ones((B, T0 + max_new_tokens), np.int64)
    all_mask[:, :T0] = mask
    positions = _positions(mask)  # of the prompt; each new token's is one more than its row's last
    next_pos = positions[:, -1:] + 1  # (B, 1)
    cache = model.new_cache(B) if use_cache else None
    done = np.zeros(B, dtype=bool)
    rows = np.arange(B)
    for step in range(max_new_tokens):
        T = T0 + step  # tokens so far
        if cache is not None and step == 0 and T0 <= Tmax:  # the prompt fills the cache
            logits = model.decode(ids, cache, attention_mask=mask, position_ids=positions)[:, -1]  # (B, V)
        elif cache is not None and cache.length < Tmax:  # one new token a row
            logits = model.decode(all_ids[:, T - 1:T], cache, position_ids=next_pos)[:, -1]
            next_pos += 1
        else:  # no cache, or the context is full: a full forward over the last Tmax tokens
            cache = None
            w_ids, w_mask = all_ids[:, max(0, T - Tmax):T], all_mask[:, max(0, T - Tmax):T]
            logits = model.forward(w_ids, attention_mask=w_mask, position_ids=_positions(w_mask))[:, -1]
        if repetition_penalty is not None:
            logits = apply_repetition_penalty(logits, seen, repetition_penalty)
        nxt = sample_next(logits, temperature, top_k, top_p, rng)  # (B,)
        if eos_id is not None:
            nxt[done] = eos_id
            done |= nxt == eos_id
        seen[rows, nxt] = True
        all_ids[:, T] = nxt
        yield nxt
        if eos_id is not None and done.all():
            return


def generate(model, prompt_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None, seed=None,
             eos_id=None, repetition_penalty=None, attention_mask=None, use_cache=True):
    """Continue prompts with up to max_new_tokens sampled tokens.

    Args:
        model: a TransformerLM (anything with `forward`, `decode`, `new_cache` and `config`).
        prompt_ids: (T0,) one prompt, (B, T0) a batch (left-padded if `attention_mask` is given),
            or a list of 1-D prompts of different lengths.
        temperature, top_k, top_p: see the module docstring.
        seed: seeds the sampling generator (ignored when greedy).
        eos_id: stop a row once it has produced this id; finished rows are padded with it.
        repetition_penalty: > 1 discourages ids already in the row (None or 1.0: off).
        use_cache: False runs a full forward per token (slower; the same tokens).
    Returns prompt plus new tokens, int64: (T0 + n,) or (B, T0 + n), n <= max_new_tokens; for a
    list of prompts, a list of 1-D arrays, each cut after its first eos_id.
    """
    ids, _, kind = _prompt_batch(prompt_ids, attention_mask)
    steps = list(generate_tokens(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, eos_id,
                                 repetition_penalty, attention_mask, use_cache))
    new = np.stack(steps, axis=1) if steps else np.zeros((ids.shape[0], 0), np.int64)  # (B, n)
    if kind == "list":
        out = []
        for p, row in zip(prompt_ids, new):
            if eos_id is not None and (row == eos_id).any():
                row = row[:int(np.argmax(row == eos_id)) + 1]
            out.append(np.concatenate([np.asarray(p, dtype=np.int64), row]))
        return out
    full = np.concatenate([ids, new], axis=1)
    return full if kind == "2d" else full[0]
