"""The task pool of the Numba backend: independent pieces of one kernel call run side by side.

The tiled attention runs its heads, and the fused LM head its groups of row chunks, as tasks
that write to disjoint arrays. Each runs on a thread of a pool of the applied thread count
(process.py), with one BLAS thread and serial Numba kernels (NumPy's GEMMs and the kernels
release the GIL): no parallel region per block or chunk hands the cores back and forth between
the BLAS and the Numba thread pools, which on a busy machine wait for each other.
"""

import concurrent.futures
import threading

from fastformer.kernels.process import applied_threads, blas_threads

_pool = None  # (threads, executor), made at the first call that needs two threads or more
_here = threading.local()  # .inside: this thread runs a task of the pool


def in_task():
    """Whether the calling thread is running a task of the pool: its kernels should not start
    threads of their own."""
    return getattr(_here, "inside", False)


def _run(fn, args):
    _here.inside = True
    try:
        fn(*args)
    finally:
        _here.inside = False


def task_threads():
    """How many tasks run at once: the applied thread count (1 before process settings apply)."""
    return applied_threads() or 1


def run_tasks(tasks):
    """Run every (function, args) of `tasks` and wait for all of them; one by one when there is
    a single thread or a single task."""
    threads = min(len(tasks), task_threads())
    if threads < 2:
        for fn, args in tasks:
            fn(*args)
        return
    pool = _executor(threads)
    with blas_threads(1):
        for f in [pool.submit(_run, fn, args) for fn, args in tasks]:
            f.result()


def _executor(threads):
    """The pool, of `threads` threads."""
    global _pool
    if _pool is None or _pool[0] != threads:
        _pool = threads, concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="fastformer-tasks")
    return _pool[1]
