"""The checks every tokenizer's `encode` and `decode` share, so that the four kinds refuse the
same inputs with the same FastformerError."""

import numpy as np

from fastformer.errors import FastformerError, check_bool


def check_text(text, bos=False, eos=False):
    """What `encode(text, bos, eos)` takes: a str and two bools; returns (bos, eos)."""
    if not isinstance(text, str):
        raise FastformerError(f"encode needs a str, got {type(text).__name__}")
    return check_bool("bos", bos), check_bool("eos", eos)


def decode_ids(ids, vocab_size, vocabulary):
    """`ids` (any shape) as a flat int64 array of ids in [0, vocab_size); `vocabulary` names it
    in the message ("the char vocabulary")."""
    ids = np.asarray(ids).reshape(-1)
    if ids.size and ids.dtype.kind not in "iu":
        raise FastformerError(f"token ids must be integers, got dtype {ids.dtype}")
    ids = ids.astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = ids[(ids < 0) | (ids >= vocab_size)][0]
        raise FastformerError(f"token id {bad} is outside {vocabulary} [0, {vocab_size})")
    return ids
