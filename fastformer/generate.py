"""Autoregressive sampling from a language model: greedy, temperature, top-k and top-p.

Each new token runs the model on the last `max_seq_len` tokens (no key/value cache yet), takes
the logits of the last position and picks the next id:

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


def generate(model, prompt_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None, seed=None,
             eos_id=None):
    """Continue prompts with up to max_new_tokens sampled tokens.

    Args:
        model: anything with `forward(ids (B, T)) -> logits (B, T, V)` and `config.max_seq_len`.
        prompt_ids: (T0,) one prompt or (B, T0) a batch of equal-length prompts; T0 >= 1.
        temperature, top_k, top_p: see the module docstring.
        seed: seeds the sampling generator (ignored when greedy).
        eos_id: stop a row once it has produced this id; finished rows are padded with it.
    Returns prompt plus new tokens, int64, (T0 + n,) or (B, T0 + n), n <= max_new_tokens.
    """
    prompt = np.asarray(prompt_ids)
    if prompt.dtype.kind not in "iu" or prompt.ndim not in (1, 2):
        raise ValueError(f"prompt_ids must be a 1-D or 2-D integer array, got {prompt.dtype} {prompt.shape}")
    if prompt.shape[-1] == 0:
        raise ValueError("prompt_ids is empty: give at least one token (e.g. <bos>)")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be None or lie in (0, 1], got {top_p}")
    rng = np.random.default_rng(seed)
    ids = np.atleast_2d(prompt).astype(np.int64)  # (B, T)
    done = np.zeros(ids.shape[0], dtype=bool)  # (B,)
    Tmax = model.config.max_seq_len
    for _ in range(max_new_tokens):
        logits = model.forward(ids[:, -Tmax:])[:, -1, :]  # (B, V), prompt cropped to the context
        nxt = sample_next(logits, temperature, top_k, top_p, rng)  # (B,)
        if eos_id is not None:
            nxt[done] = eos_id
            done |= nxt == eos_id
        ids = np.concatenate([ids, nxt[:, None]], axis=1)
        if done.all():
            break
    return ids if prompt.ndim == 2 else ids[0]
