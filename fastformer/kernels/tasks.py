"""The task pool of the Numba backend: independent pieces of one kernel call run side by side.

The tiled attention runs its heads, and the fused LM head its groups of row chunks, as tasks
that write to disjoint arrays. Each runs on a thread of a pool of the applied thread count
(process.py), with one BLAS thread and serial Numba kernels (NumPy's GEMMs and the kernels
release the GIL): no parallel region per block or chunk hands the cores back and forth between
the BLAS and the Numba thread pools, which on a busy machine wait for each other.
"""

import concurrent.futures
import os
import threading

import numpy as np

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


# Pauses the partner of run_together spins after a call, awake, for the next one: about 3 ms here
# (1,000 pauses of 28 ns, then each with a yield of the core, 0.38 us). A sleeping pool thread took
# 57 us to start a task back to back and 130-140 us after an idle pause (a submitted no-op, timed);
# a spinning one starts at once.
WARM_SPINS = 8_000


class _Finished:
    """The partner's side of one call: set when its part has returned, with what it raised."""
    def __init__(self):
        self.event, self.error = threading.Event(), None


def _cpus():
    """The CPUs the calling thread may run on (None where the system does not say)."""
    try:
        return os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return None


def _set_cpus(cpus):
    try:
        os.sched_setaffinity(0, cpus)
    except (AttributeError, OSError, ValueError):
        pass


class _Partner:
    """The thread that runs part 1 of two-part calls (run_together), on a core of its own: the
    last CPU this process may use. During a call the caller keeps off that core. Unpinned, the
    two threads ended up on one core in most generations after an idle pause (read from
    /proc/self/task/*/stat): each wakes the other through the GIL, and Linux wakes a thread on
    its waker's core; medium int8, 128 tokens, after 0.2 s: 14.0 ms on two parts unpinned against
    13.3 on one, 10.2 pinned. After each part it spins for the next call in compiled code
    (_sync.spin_until_changed: no GIL held, its core kept awake) for WARM_SPINS pauses, then
    sleeps until one is posted: the calls of one generation, milliseconds apart, find it awake."""
    def __init__(self):
        cpus = _cpus()
        self.cpu = max(cpus) if cpus and len(cpus) > 1 else None  # the partner's own core
        self.pid = os.getpid()
        self.word = np.zeros(8, np.int64)  # word[0]: calls posted, word[1]: parts finished
        self.cond = threading.Condition()
        self.work = None
        self.busy = threading.Lock()  # one caller at a time; another takes the pool
        threading.Thread(target=self._loop, name="fastformer-partner", daemon=True).start()

    def post(self, fn, args):
        finished = _Finished()
        with self.cond:
            self.work = fn, args, finished
            self.word[0] += 1
            self.cond.notify()
        return finished

    def _loop(self):
        from fastformer.kernels import _sync  # (not at the top: _jit, which _sync imports, imports this module)

        _here.inside = True
        if self.cpu is not None:
            _set_cpus({self.cpu})
        taken = 0
        while True:
            if _sync.spin_until_changed(self.word, taken, WARM_SPINS) == taken:  # nothing new: sleep
                with self.cond:
                    self.cond.wait_for(lambda: self.word[0] != taken)
            with self.cond:
                fn, args, finished = self.work
                taken = int(self.word[0])
            try:
                fn(*args)
            except BaseException as e:  # noqa: BLE001 -- handed to the caller, which raises it
                finished.error = e
            finally:
                self.word[1] += 1  # parts finished: what the caller spins on
                finished.event.set()

    def wait(self, finished, done_before):
        """Wait for the part of `finished`: spinning (the part ends about when the caller's does),
        so that the caller never sleeps on the partner: woken by it, the scheduler would move the
        caller onto the partner's core, and the two parts would share one core from then on."""
        from fastformer.kernels import _sync

        if _sync.spin_until_changed(self.word[1:2], done_before, WARM_SPINS) == done_before:
            finished.event.wait()


_partner = None


def _get_partner():
    """The partner thread, started at the first two-part call; None without Numba."""
    global _partner
    from fastformer.kernels import _sync

    if _sync.spin_until_changed is None:
        return None
    if _partner is None or _partner.pid != os.getpid():  # (a forked child has no partner thread)
        with _partner_made:
            if _partner is None or _partner.pid != os.getpid():
                _sync.spin_until_changed.dispatcher or _sync.spin_until_changed.jit()  # made before the thread runs it
                _partner = _Partner()
    return _partner


_partner_made = threading.Lock()


def run_together(fn, args, parts):
    """Run fn(*args, part, parts) for part = 0 .. parts - 1 at once, part 0 on the calling thread
    and the others on the partner thread (two parts) or the pool; returns part 0's result. For
    the parts of one kernel call that share its work as they go (_sync.py): each part must be able
    to finish alone, since another thread may start late, or after the caller's part is done."""
    if parts > task_threads() or in_task():  # one after the other
        return [fn(*args, part, parts) for part in range(parts)][0]
    partner = _get_partner() if parts == 2 else None
    if partner is not None:
        if partner.busy.acquire(blocking=False):  # else another thread's call has it: the pool
            mine = _cpus()
            away = mine - {partner.cpu} if mine is not None and partner.cpu is not None else None
            if away:
                _set_cpus(away)  # off the partner's core for the call
            try:
                done_before = int(partner.word[1])
                finished = partner.post(fn, (*args, 1, parts))
                try:
                    return fn(*args, 0, parts)
                finally:
                    partner.wait(finished, done_before)
                    if finished.error is not None:
                        raise finished.error
            finally:
                if away:
                    _set_cpus(mine)
                partner.busy.release()
    pool = _executor(task_threads())
    others = [pool.submit(_run, fn, (*args, part, parts)) for part in range(1, parts)]
    try:
        return fn(*args, 0, parts)
    finally:
        for f in others:
            f.result()
