"""The checks every tokenizer's `encode` and `decode` share, so that the four kinds refuse the
same inputs with the same FastformerError, and the reading of the text files they learn from."""

import codecs
import os
import re

import numpy as np

from fastformer.errors import FastformerError, check_bool

_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(text, bos=False, eos=False):
    """What `encode(text, bos, eos)` takes: a str and two bools; returns (bos, eos)."""
    if not isinstance(text, str):
        raise FastformerError(f"encode needs a str, got {type(text).__name__}")
    bad = _SURROGATE.search(text)
    if bad is not None:  # e.g. a command-line argument whose bytes are not UTF-8 (Python keeps them as surrogates)
        raise FastformerError(f"the text holds a lone surrogate {ascii(bad.group())[1:-1]} at character {bad.start()}, "
                              f"which is not a character: give UTF-8 text")
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


def text_files(files):
    """`files` (one path or several) as a list of paths of existing files, or FastformerError."""
    files = [os.fspath(f) for f in ([files] if isinstance(files, (str, os.PathLike)) else files)]
    if not files:
        raise FastformerError("no text files given to train the tokenizer on")
    for path in files:
        if not os.path.isfile(path):
            raise FastformerError(f"no such text file to train the tokenizer on: {path}")
    return files


def read_text_chunks(path, chunk_bytes=1 << 20):
    """Yield the text of the UTF-8 file `path` in chunks, never the whole file at once; a byte
    that is not UTF-8 raises FastformerError naming the file and the byte's offset."""
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk_bytes)
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                raise FastformerError(f"text file {path} is not UTF-8 (byte {offset + e.start}: {e.reason})") from None
            offset += len(block)
            if text:
                yield text
            if not block:
                return
