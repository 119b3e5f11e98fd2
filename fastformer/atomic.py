"""Files and directories written so that a crash never leaves half of one: write a temporary
beside the target, fsync it, then rename it over the target (an atomic step on POSIX file systems).

Every temporary gets a fresh name, `<target>.tmp-XXXXXXXX`, made with O_EXCL in the target's
directory (tempfile.mkstemp / mkdtemp): a file or symlink already there is never opened, followed
or deleted, and two writers never share one. A temporary directory stays private (0700) while it
is filled, so nothing can be planted in it; the finished files and directories get the modes a
plain open() / mkdir() would give under the user's umask. `remove_stale_temps` deletes the
temporaries a killed process left, by that name pattern only.

A write error (a full disk, a read-only directory) is raised as an OSError naming the target,
never the temporary name.
"""

import contextlib
import json
import os
import re
import shutil
import stat
import tempfile

from fastformer.errors import check_choice

TEMP_MARK = ".tmp-"
_TEMP_RE = re.compile(r"^(?P<target>.+)\.tmp-[a-z0-9_]{8}$")  # tempfile's 8 random characters


def _umask():
    """The process's umask (from /proc, so it is never changed; else set and restored)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode():
    """The mode open(path, "w") gives a new file: 0o666 less the umask."""
    return 0o666 & ~_umask()


def dir_mode():
    """The mode os.mkdir gives a new directory: 0o777 less the umask."""
    return 0o777 & ~_umask()


def _split(path):
    path = os.fspath(path)
    if not path:
        raise FileNotFoundError(2, "an empty path names no file", path)
    parent, name = os.path.split(os.path.normpath(path))
    return parent or ".", name


def _named(e, path, tmp=None):
    """`e` as an OSError naming `path` (the target) when it names no file, or the temporary `tmp`
    (or a file inside it); an error about another file is returned as it is."""
    name = e.filename if isinstance(e.filename, str) else None
    if name is None or tmp is None or name == tmp or name.startswith(tmp + os.sep):
        return OSError(e.errno, e.strerror or str(e), os.fspath(path))
    return e


NAME_MAX = 255  # bytes in a file name on Linux's file systems


def _temp_prefix(name):
    """`<name>.tmp-`, the name cut so that the temporary's (8 random characters after it) fits
    in NAME_MAX bytes: a target whose own name is legal always gets a temporary."""
    raw = os.fsencode(name)[:NAME_MAX - len(TEMP_MARK) - 8]
    return os.fsdecode(raw) + TEMP_MARK


def temp_target(name):
    """The target name of a temporary made here (`<target>.tmp-XXXXXXXX`), or None."""
    m = _TEMP_RE.match(name)
    return m.group("target") if m else None


class AtomicFile:
    """A fresh temporary file beside `path`, open for writing as `.file` ("w" text, "wb" bytes):
    `commit()` fsyncs it and renames it over `path`, `discard()` deletes it. atomic_open is the
    `with` form; this one serves a writer that stays open across calls."""

    def __init__(self, path, mode="wb"):
        check_choice("mode", mode, ("w", "wb"))
        self.path = path
        parent, name = _split(path)
        try:
            fd, self.tmp = tempfile.mkstemp(prefix=_temp_prefix(name), suffix="", dir=parent)
        except OSError as e:
            raise _named(e, path) from None
        try:
            os.fchmod(fd, file_mode())
            self.file = os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8")
        except BaseException:
            os.close(fd)
            self.discard()
            raise

    def commit(self):
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.path)
        except OSError as e:
            self.discard()
            raise _named(e, self.path, self.tmp) from None

    def discard(self):
        if getattr(self, "file", None) is not None:
            with contextlib.suppress(OSError):
                self.file.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.tmp)


@contextlib.contextmanager
def atomic_open(path, mode="w"):
    """Open a fresh temporary file for writing ("w" text, "wb" bytes) that replaces `path` only
    when the block succeeds; on any failure the temporary is removed and `path` is untouched."""
    out = AtomicFile(path, mode)
    try:
        yield out.file
    except OSError as e:
        out.discard()
        raise _named(e, path, out.tmp) from None
    except BaseException:
        out.discard()
        raise
    out.commit()


def write_json_atomic(obj, path, **dump_kwargs):
    """json.dump(obj) into `path` atomically; `dump_kwargs` go to json.dump (default indent=1)."""
    with atomic_open(path) as f:
        json.dump(obj, f, **{"indent": 1, **dump_kwargs})


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _finish_modes(tmp):
    """Give the files and directories of a finished temporary directory the umask's modes (files
    a library wrote privately, e.g. safetensors' 0600, included); symlinks are left alone."""
    fmode, dmode = file_mode(), dir_mode()
    for root, dirs, files in os.walk(tmp):
        for name in files + dirs:
            p = os.path.join(root, name)
            kind = os.lstat(p).st_mode
            if stat.S_ISREG(kind) or stat.S_ISDIR(kind):
                os.chmod(p, fmode if stat.S_ISREG(kind) else dmode)
    os.chmod(tmp, dmode)


@contextlib.contextmanager
def atomic_dir(path, replace=False):
    """A fresh private temporary directory beside `path`, to be filled in the block; it becomes
    `path` when the block succeeds (fsynced, modes set from the umask), and is deleted when it
    fails. `path` may exist as an empty directory; a non-empty one is replaced only with
    `replace=True` (moved aside under a temporary name, then deleted)."""
    parent, name = _split(path)
    try:
        tmp = tempfile.mkdtemp(prefix=_temp_prefix(name), suffix="", dir=parent)
    except OSError as e:
        raise _named(e, path) from None
    try:
        yield tmp
        _finish_modes(tmp)
        _fsync_dir(tmp)
        if replace and os.path.isdir(path) and not os.path.islink(path) and os.listdir(path):
            old = _aside(path)
            try:
                os.replace(tmp, path)
            except OSError:
                os.replace(old, path)
                raise
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
        _fsync_dir(parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _named(e, path, tmp) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _aside(path):
    """Move the directory `path` to a fresh temporary name beside it, in one rename (onto the
    empty directory mkdtemp makes); returns that name."""
    parent, name = _split(path)
    trash = tempfile.mkdtemp(prefix=_temp_prefix(name), suffix="", dir=parent)
    os.replace(path, trash)
    return trash


def remove_dir(path):
    """Delete the directory `path`: renamed to a temporary name first, so a delete cut short
    leaves a name remove_stale_temps deletes, never a half-emptied directory under its own."""
    shutil.rmtree(_aside(path))


def remove_stale_temps(directory, targets):
    """Delete the temporaries (`<target>.tmp-XXXXXXXX`) a killed process left in `directory` for
    targets matching the regular expression `targets`: real files and directories only (a symlink
    is never followed nor removed). Returns the names removed."""
    pattern = re.compile(targets)
    removed = []
    for entry in os.scandir(directory):
        target = temp_target(entry.name)
        if target is None or not pattern.fullmatch(target):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        elif entry.is_file(follow_symlinks=False):
            os.remove(entry.path)
        else:
            continue
        removed.append(entry.name)
    return removed
