"""The one line the command line prints for an error: FastformerError's message, a failed system
call as 'PATH': reason; anything else (an OSError with no errno included) is a bug and is raised."""

import errno
import io

import pytest

from fastformer.cli import info as info_command
from fastformer.cli import main
from fastformer.errors import FastformerError, error_line


@pytest.mark.parametrize("e, line", [
    (FastformerError("bad value\n  of x"), "bad value of x"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "corpus.txt"),
     "'corpus.txt': No such file or directory"),
    (OSError(errno.ENOSPC, "No space left on device", "runs/x/ckpt-000004"),
     "'runs/x/ckpt-000004': No space left on device"),
    (OSError(errno.EXDEV, "Invalid cross-device link", "a", None, "b"), "'a' -> 'b': Invalid cross-device link"),
    (OSError(errno.EPIPE, "Broken pipe"), "Broken pipe"),
    (io.UnsupportedOperation("not writable"), None),
    (OSError("a library's own message"), None),
    (ZeroDivisionError("division by zero"), None),
])
def test_error_line(e, line):
    assert error_line(e) == line


def test_an_os_error_without_errno_keeps_its_traceback(monkeypatch):
    def bug(args):
        raise io.UnsupportedOperation("not readable")

    monkeypatch.setattr(info_command, "main", bug)
    with pytest.raises(io.UnsupportedOperation, match="not readable"):
        main(["info"])
