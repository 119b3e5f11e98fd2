"""Files written so that a crash never leaves half of one: write a temporary file beside the
target, fsync it, then rename it over the target (an atomic step on POSIX file systems)."""

import contextlib
import json
import os

from fastformer.errors import check_choice


@contextlib.contextmanager
def atomic_open(path, mode="w"):
    """Open a temporary file for writing ("w" text, "wb" bytes) that replaces `path` only when
    the block succeeds."""
    check_choice("mode", mode, ("w", "wb"))
    tmp = os.fspath(path) + ".tmp"
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(obj, path, **dump_kwargs):
    """json.dump(obj) into `path` atomically; `dump_kwargs` go to json.dump (default indent=1)."""
    with atomic_open(path) as f:
        json.dump(obj, f, **{"indent": 1, **dump_kwargs})
