"""The one error type fastformer raises for bad input, and the checks that make its messages.

`FastformerError` is a `ValueError`, so callers that catch `ValueError` keep working. Public
entry points (model methods, configs, file loaders, the CLI) check their inputs once with the
helpers below and raise it with a message that names the argument, the value and what is
allowed; the CLI prints that message as one line and exits with status 2. Anything else that
escapes is a bug and keeps its traceback.
"""

import json
import os
import re
import reprlib
import time

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


def check_number(name, value, low=None, high=None, low_open=False, high_open=False, finite=False):
    """`value` as a float within the given bounds (closed unless `*_open`), or FastformerError.
    NaN is always refused; +-inf too when `finite` (a setting such as a learning rate or a length
    penalty, where inf means nothing)."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    v = float(value) if ok else None
    if ok and (v != v or (finite and not np.isfinite(v))):
        ok = False  # NaN, or +-inf where only finite values mean something
    if ok and low is not None:
        ok = v > low if low_open else v >= low
    if ok and high is not None:
        ok = v < high if high_open else v <= high
    if not ok:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low}"
        hi = "" if high is None else f"{high}" + (")" if high_open else "]")
        allowed = f" in {lo}, {hi}" if low is not None and high is not None else \
            (f" {'>' if low_open else '>='} {low}" if low is not None else
             f" {'<' if high_open else '<='} {high}" if high is not None else "")
        raise FastformerError(f"{name} must be a {'finite ' if finite else ''}number{allowed}, got {value!r}")
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


_UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")  # controls but tab and newline; surrogates


def printable(text):
    """`text` safe to print on a terminal: control characters (an escape sequence from a
    hand-edited file would drive the terminal) and lone surrogates (bytes of a path that are not
    UTF-8, which a strict stdout cannot encode) written as Python escapes, e.g. "\\x1b"."""
    return _UNPRINTABLE.sub(lambda m: ascii(m.group())[1:-1], str(text))


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxdict, _SHORT.maxlist, _SHORT.maxstring, _SHORT.maxother = 3, 4, 4, 60, 60


def short_repr(value):
    """repr(value) bounded in length and depth, for a message about a value read from a file: a
    YAML alias bomb or a deeply nested JSON value is named in a line, never formatted whole."""
    try:
        return _SHORT.repr(value)
    except RecursionError:
        return f"<a {type(value).__name__} nested too deeply>"


def check_input_file(path, what, hint=""):
    """Refuse, naming `what`, a path that names no file to read: missing (FastformerError ending
    with `hint`), a directory, or a FIFO or device that could block for good. A pipe the shell
    passes as /dev/fd/N (`<(command)`) is read like a file."""
    if not os.path.exists(path):
        raise FastformerError(f"{what} {path!r} does not exist{hint}")
    if os.path.isdir(path):
        raise FastformerError(f"{what} {path!r} is a directory, not a file{hint}")
    shell_pipe = re.match(r"^/(dev|proc/self)/fd/\d+$", os.fspath(path)) is not None
    if not (os.path.isfile(path) or shell_pipe):
        raise FastformerError(f"{what} {path!r} is not a regular file (a FIFO or a device){hint}")
    return path


def read_utf8(path, what="file"):
    """The text of the UTF-8 file `path`; other bytes raise FastformerError naming `what` and the path."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FastformerError(f"{what} {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None


def load_json(path, what="JSON file"):
    """The parsed contents of the JSON file `path`; a file that is not UTF-8 JSON (truncated,
    binary, nested too deep to parse) raises FastformerError naming `what` and the path."""
    text = read_utf8(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise FastformerError(f"{what} {path} is not valid JSON (corrupt or truncated): {e}") from None
    except RecursionError:
        raise FastformerError(f"{what} {path} is nested too deeply to be a file fastformer wrote") from None


def check_fields(where, d, types):
    """Check that the mapping `d` (read from `where`) has each key of `types` with a value of
    that type or tuple of types (a bool is an int only where `bool` is named); returns `d`."""
    if not isinstance(d, dict):
        raise FastformerError(f"{where} must hold a JSON object, got {type(d).__name__}")
    for key, t in types.items():
        t = t if isinstance(t, tuple) else (t,)
        value = d.get(key)
        ok = bool in t if isinstance(value, (bool, np.bool_)) else \
            any(is_int(value) if x is int else isinstance(value, x) for x in t)
        if not ok:
            names = " or ".join("null" if x is type(None) else x.__name__ for x in t)
            raise FastformerError(f"{where}: field {key!r} must be {names}, got {value!r}")
    return d


def format_bytes(n):
    """A byte count for people, in SI units (1 GB = 10**9 bytes) as the docs' memory figures are:
    "0.50 MB", "3.41 GB"."""
    return f"{n / 1e9:,.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB"


# A reading of available memory is reused for a second by requests below an eighth of it: reading
# the system's figures (/proc/meminfo) once a decoding state is a visible share of a short
# generation's time. A larger request reads them again.
_READING_FOR, _SMALL_SHARE = 1.0, 8
_reading = (-float("inf"), None)  # (time.monotonic() of the last reading, its value)


def available_memory(need=0):
    """Bytes this process may still allocate: the least of the kernel's MemAvailable, the cgroup
    memory limit less its usage, and the address-space rlimit; None when none can be read.
    `need`: the bytes about to be asked for; below an eighth of a reading under a second old,
    that reading is the answer."""
    global _reading
    at, have = _reading
    now = time.monotonic()
    if have is not None and now - at < _READING_FOR and need * _SMALL_SHARE < have:
        return have
    have = _read_available_memory()
    _reading = (now, have)
    return have


def _read_available_memory():
    limits = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    limits.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        try:
            limits.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError, AttributeError):
            pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            cap = f.read().strip()
        if cap != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                limits.append(int(cap) - int(f.read().strip()))
    except (OSError, ValueError):
        pass
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:  # less the address space already mapped
            with open("/proc/self/status") as f:
                mapped = next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:")), 0)
            limits.append(soft - mapped)
    except (ImportError, OSError, ValueError, IndexError):
        pass
    return max(min(limits), 0) if limits else None


def check_memory(what, nbytes, advice=""):
    """Refuse, before anything is allocated, work whose estimated memory `nbytes` exceeds what
    the machine has available (available_memory()); `what` names it ("training a model of ..."),
    `advice` says what to change."""
    have = available_memory(nbytes)
    if have is not None and nbytes > have:
        raise FastformerError(f"{what} needs about {format_bytes(nbytes)} of memory, but only {format_bytes(have)} is "
                              f"available{': ' + advice if advice else ''}")
    return nbytes
