"""One writer per run directory: an advisory lock on RUN/.lock, held while a Trainer writes.

    lock = lock_run_dir("runs/tiny")    # FastformerError naming the holder's PID if it is taken
    ...
    lock.release()                       # or the process exits

The lock is `fcntl.flock` on the lock file, so the kernel drops it when its holder exits, however
it exits (`kill -9` included): the file a dead process left is taken over, never waited for. The
holder writes its PID into the file so that a refused writer can name it. Where flock is not
supported (some network file systems) the PID decides: a file naming a live process refuses, one
naming a dead process is taken over. Within one process the lock is shared: a second Trainer on
the same directory (a resume in a test or a notebook) reuses it. Readers (generate, eval, export)
take no lock. Under MPI only rank 0 writes, so only rank 0 locks.
"""

import errno
import fcntl
import os
import time

from fastformer.atomic import file_mode
from fastformer.errors import FastformerError

LOCK_FILE = ".lock"
_HELD = {}  # (st_dev, st_ino) of a locked run directory -> its RunLock, in this process


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _read_pid(fd):
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None


class RunLock:
    """The lock of one run directory, held by this process (see lock_run_dir)."""

    def __init__(self, run_dir, key, fd, created):
        self.run_dir, self.key, self.fd, self.created, self.users = run_dir, key, fd, created, 1

    def release(self):
        """Give the lock up (once per lock_run_dir call). A run directory this lock created and
        that holds nothing else (a run refused before it wrote anything) is removed."""
        if self.fd is None:
            return
        self.users -= 1
        if self.users:
            return
        path = os.path.join(self.run_dir, LOCK_FILE)
        try:
            os.ftruncate(self.fd, 0)
            if self.created and os.listdir(self.run_dir) == [LOCK_FILE]:
                os.remove(path)
                os.rmdir(self.run_dir)
        except OSError:
            pass  # the kernel drops the lock at close in any case
        finally:
            os.close(self.fd)  # drops the flock
            self.fd = None
            _HELD.pop(self.key, None)


def lock_run_dir(run_dir, wait=1.0):
    """Take the lock of `run_dir` (made if missing) for this process; returns its RunLock.

    Raises FastformerError naming the PID of the process that holds it, and OSError naming
    `run_dir` when it cannot be made or locked (a read-only directory, a path under a file).
    `wait` seconds cover a holder that has the lock but has not yet written its PID.
    """
    run_dir = os.fspath(run_dir)
    if not run_dir:
        raise FastformerError("the run directory (--out) is an empty path: name a directory")
    if os.path.lexists(run_dir) and not os.path.isdir(run_dir):
        raise FastformerError(f"run directory {run_dir!r} exists and is not a directory: choose another --out")
    created = not os.path.lexists(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    st = os.stat(run_dir)
    key = (st.st_dev, st.st_ino)
    if key in _HELD:
        _HELD[key].users += 1
        return _HELD[key]
    try:
        fd = os.open(os.path.join(run_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, file_mode())
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise FastformerError(f"{os.path.join(run_dir, LOCK_FILE)!r} is a symlink, not fastformer's lock "
                                  f"file: remove it") from None
        raise OSError(e.errno, e.strerror, run_dir) from None
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _read_pid(fd)
                if holder is not None or time.monotonic() > deadline:
                    raise FastformerError(
                        f"run directory {run_dir!r} is in use by another fastformer process (PID "
                        f"{holder if holder is not None else 'unknown'}): one run writes to a directory at a "
                        f"time; wait for it to end or choose another --out") from None
                time.sleep(0.05)  # the holder has the lock and is about to write its PID
            except OSError as e:  # flock unsupported here: the PID in the file decides
                holder = _read_pid(fd)
                if holder is not None and holder != os.getpid() and _pid_alive(holder):
                    raise FastformerError(f"run directory {run_dir!r} is in use by another fastformer process "
                                          f"(PID {holder}; file locks are not supported there: {e.strerror})") from None
                break
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    except BaseException:
        os.close(fd)
        raise
    _HELD[key] = lock = RunLock(run_dir, key, fd, created)
    return lock
