"""Training text: the embedded default corpus, text files to token ids, the train/validation
split and the random windows a training step reads.

The default corpus is the documentation of Python's standard library as it is installed on the
machine: for a fixed list of modules, the module docstring and then, for each public class and
function in name order, a `name(signature)` line followed by its docstring -- roughly what
`help(module)` shows, with defaults other than literals written `...` (their reprs may hold
memory addresses or program state, which would make each process's corpus differ). It is real
English technical prose, needs no download and no file from the user, and is rebuilt in memory
on every run (nothing is copied into the repository). Its exact bytes depend on the Python
version, so its SHA-256 is saved with each checkpoint.

A run's data is either text (a file or the default corpus), encoded at start with the tokenizer
`data.tokenizer` names, or a directory made by `fastformer prepare`, whose token files are
memory-mapped (fastformer.prepare). Batches are contiguous windows at uniformly random offsets,
drawn from an explicit `np.random.Generator` whose state the trainer saves, so the data order
resumes exactly; windows are copied out as int64 whatever the stored dtype.
"""

import hashlib
import os
import subprocess
import sys

import numpy as np

from fastformer.data.prepare import is_prepared_dir, load_prepared
from fastformer.data.tokenizer import make_tokenizer, same_tokenizer
from fastformer.errors import FastformerError, check_input_file


def default_corpus():
    """The embedded default corpus as one str (see the module docstring); about 0.9 MB of text.

    It is built by fastformer/stdlib_corpus.py in a fresh interpreter that loads nothing but the
    standard library (`python -I -S`): libraries imported in this process may have changed the
    standard library's classes (transformers adds methods to logging.Logger, for one), and the
    corpus must not depend on them. Where no child process can start, it is built here."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stdlib_corpus.py")
    try:
        proc = subprocess.run([sys.executable, "-I", "-S", script], capture_output=True, timeout=300, check=True)
        return proc.stdout.decode("utf-8")
    except (OSError, subprocess.SubprocessError, UnicodeDecodeError):
        from fastformer.data import stdlib_corpus

        return stdlib_corpus.build()


def load_text(path, what="data file", hint=" (pass a UTF-8 text file with --data)"):
    """The contents of a UTF-8 text file; a missing, empty or non-UTF-8 file raises FastformerError
    naming it as `what` (the missing file's message ends with `hint`)."""
    check_input_file(path, what, hint)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FastformerError(f"{what} {path!r} is not UTF-8 text ({e})") from None
    if not text:
        raise FastformerError(f"{what} {path!r} is empty")
    return text


def ids_sha256(ids):
    """Fingerprint of a token stream, saved with checkpoints to detect a changed corpus."""
    return hashlib.sha256(np.ascontiguousarray(ids, dtype=np.int64).tobytes()).hexdigest()


def split_ids(ids, val_fraction, seq_len):
    """Split a 1-D token stream into (train, val): the last `val_fraction` is validation.

    Both parts must hold at least one window of seq_len + 1 tokens (input plus shifted target).
    """
    n_val = int(round(len(ids) * val_fraction))
    train, val = ids[:len(ids) - n_val], ids[len(ids) - n_val:]
    for part, what in ((train, "training"), (val, "validation")):
        if len(part) < seq_len + 1:
            raise FastformerError(f"the {what} split has {len(part)} tokens, fewer than seq_len + 1 = "
                                  f"{seq_len + 1}: use more text, a shorter train.seq_len or another "
                                  f"data.val_fraction (now {val_fraction})")
    return train, val


def get_batch(ids, batch_size, seq_len, rng):
    """B windows of T + 1 contiguous tokens at random offsets drawn from `rng`.

    Returns (x, y), each (B, T) int64, with y the next token of x at every position.
    """
    starts = rng.integers(0, len(ids) - seq_len, size=batch_size)  # (B,)
    win = ids[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64)  # (B, T + 1)
    return win[:, :-1], win[:, 1:]


def eval_batches(ids, batch_size, seq_len, n_batches):
    """Up to n_batches batches of non-overlapping windows evenly spread over `ids`: the same
    windows at every evaluation, with no generator involved. Yields (x, y) of (b, T)."""
    n_windows = (len(ids) - 1) // seq_len
    n = min(n_windows, batch_size * n_batches)
    starts = (np.arange(n) * (n_windows // n)) * seq_len  # (n,)
    for i in range(0, n, batch_size):
        win = ids[starts[i:i + batch_size, None] + np.arange(seq_len + 1)].astype(np.int64)
        yield win[:, :-1], win[:, 1:]


def load_training_data(data, seq_len, text=None, tokenizer=None):
    """The token streams of a run: (tokenizer, train_ids, val_ids, fingerprint).

    Args:
        data: the run's DataConfig. `data.path` is a text file, a prepared directory (its own
            tokenizer and splits are used; data.tokenizer must then be unset) or None (the
            default corpus).
        text: use this str instead of data.path.
        tokenizer: use this tokenizer (a resumed run's) instead of building data.tokenizer.
    """
    if text is None and is_prepared_dir(data.path):
        prepared = load_prepared(data.path)
        tok = prepared.tokenizer
        if data.tokenizer is not None:
            raise FastformerError(f"data.tokenizer={data.tokenizer!r} but data.path {data.path!r} is a prepared "
                                  f"directory, whose tokens were made by its own {tok.kind} tokenizer "
                                  f"({tok.vocab_size} ids): leave data.tokenizer unset")
        if tokenizer is not None and tokenizer.vocab_size != tok.vocab_size:
            raise FastformerError(f"the prepared directory {data.path!r} has a {tok.kind} tokenizer of "
                                  f"{tok.vocab_size} ids, but the run's tokenizer has {tokenizer.vocab_size}")
        if tokenizer is not None and not same_tokenizer(tokenizer, tok):
            raise FastformerError(f"the prepared directory {data.path!r} was made by another {tok.kind} tokenizer "
                                  f"than the run's (the same {tok.vocab_size} ids, another vocabulary): prepare "
                                  f"the text with the run's tokenizer")
        for name, ids in (("train", prepared.train), ("val", prepared.val)):
            if len(ids) < seq_len + 1:
                raise FastformerError(f"the {name} split of {data.path!r} has {len(ids)} tokens, fewer than "
                                      f"seq_len + 1 = {seq_len + 1}: prepare more text or use a shorter train.seq_len")
        return tok, prepared.train, prepared.val, prepared.fingerprint
    if text is None:
        text = load_text(data.path) if data.path else default_corpus()
    if tokenizer is None:
        tokenizer = make_tokenizer(data.tokenizer or "byte", text)
    ids = tokenizer.encode(text)
    train, val = split_ids(ids, data.val_fraction, seq_len)
    return tokenizer, train, val, ids_sha256(ids)
