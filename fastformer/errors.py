"""The one error type fastformer raises for bad input, and the checks that make its messages.

`FastformerError` is a `ValueError`, so callers that catch `ValueError` keep working. Public
entry points (model methods, configs, file loaders, the CLI) check their inputs once with the
helpers below and raise it with a message that names the argument, the value and what is
allowed; the CLI prints that message as one line and exits with status 2. Anything else that
escapes is a bug and keeps its traceback.
"""

import numpy as np


class FastformerError(ValueError):
    """Bad input to fastformer: the message names the thing, its value and what is allowed."""


def is_int(value):
    """Whether `value` is a Python or NumPy integer (a bool is not)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_int(name, value, minimum=1, maximum=None):
    """`value` as an int in [minimum, maximum], or FastformerError."""
    if not is_int(value) or value < minimum or (maximum is not None and value > maximum):
        allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise FastformerError(f"{name} must be an integer {allowed}, got {value!r}")
    return int(value)


def check_bool(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise FastformerError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_choice(name, value, choices):
    if value not in choices:
        raise FastformerError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def check_number(name, value, low=None, high=None, low_open=False, high_open=False):
    """`value` as a float within the given bounds (closed unless `*_open`), or FastformerError."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    v = float(value) if ok else None
    if ok and v != v:
        ok = False  # NaN
    if ok and low is not None:
        ok = v > low if low_open else v >= low
    if ok and high is not None:
        ok = v < high if high_open else v <= high
    if not ok:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low}"
        hi = "" if high is None else f"{high}" + (")" if high_open else "]")
        allowed = f"in {lo}, {hi}" if low is not None and high is not None else \
            (f"{'>' if low_open else '>='} {low}" if low is not None else f"{'<' if high_open else '<='} {high}")
        raise FastformerError(f"{name} must be a number {allowed}, got {value!r}")
    return v


def check_ids(name, ids, vocab_size, ndim=(1, 2), vocab_name="vocab_size", shapes=None):
    """Token ids as an int64 array of `ndim` dimensions, every id in [0, vocab_size).
    `shapes` names the allowed shapes in the message, e.g. "(B, T) or (T,)"."""
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise FastformerError(f"{name} must be an integer array, got dtype {ids.dtype}")
    if ids.ndim not in ndim:
        allowed = shapes or " or ".join(f"{d} dimensions" for d in ndim)
        raise FastformerError(f"{name} must have shape {allowed}, got {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = ids[(ids < 0) | (ids >= vocab_size)].flat[0]
        raise FastformerError(f"{name} must lie in [0, {vocab_name}={vocab_size}), got {bad}")
    return ids.astype(np.int64, copy=False)


def check_token_mask(name, mask, shape):
    """A 1 (token) / 0 (padding) mask shaped like its ids, as a key-padding mask (True at
    padding); None stays None."""
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.shape != tuple(shape):
        raise FastformerError(f"{name} must have the shape of its ids {tuple(shape)}, got {mask.shape}")
    if mask.dtype.kind not in "biu" or not ((mask == 0) | (mask == 1)).all():
        raise FastformerError(f"{name} must hold only 0 (padding) and 1 (token)")
    return mask == 0


def check_targets(targets, shape, of):
    """Integer targets of `shape` (B, T), the shape of the ids `of` (or (T,) when B is 1)."""
    targets = np.asarray(targets)
    if targets.dtype.kind not in "iu":
        raise FastformerError(f"targets must be an integer array, got dtype {targets.dtype}")
    shape = tuple(shape)
    if targets.shape != shape and not (shape[0] == 1 and targets.shape == shape[1:]):
        raise FastformerError(f"targets must have the shape of {of} {tuple(shape)}, got {targets.shape}")
    return targets.reshape(shape)


def error_line(e):
    """The one line the command line prints for `e`: a FastformerError's message, or an OSError
    from a failed system call (errno set: a missing file, a full disk, a read-only directory) as
    'PATH: reason'. None for anything else, which is a bug and keeps its traceback (an OSError
    with no errno behind it, such as io.UnsupportedOperation, is one)."""
    if isinstance(e, FastformerError):
        text = str(e)
    elif isinstance(e, OSError) and e.errno is not None:
        reason = e.strerror or str(e)
        if e.filename is None:
            text = reason
        else:
            text = repr(e.filename) + (f" -> {e.filename2!r}" if e.filename2 is not None else "") + f": {reason}"
    else:
        return None
    return " ".join(line.strip() for line in text.splitlines() if line.strip())
