"""Several threads in one kernel call: stages of chunks that any of them may run.

At batch 1 a decoding step is a chain of small matrix products, each needing the one before:
a thread pool's hand-off (tens of microseconds) per product would cost more than the product.
Instead every thread runs the same loops over the same stages -- `parts` copies of one kernel,
started together (run_together, below) -- and a stage's work is cut into chunks that the threads
share through atomics in an int64 array, `sync` (new_sync), W = stage_words(parts) words a stage:

    sync[s * W]          how many of stage s's chunks are finished
    sync[s * W + 1 + c]  0 until a thread claims chunk c of stage s

For two or three parts a stage is one cache line (its count and up to 7 claims): a greedy call of
128 medium steps has 2,817 stages, 180 KB of words rather than 720.

A thread first runs its own chunks (`chunk_at`: part p owns the p-th share, so each core keeps
reading the same weights, which then stay in its cache), then takes whatever the others have not
claimed yet, from the far end, and waits until every chunk of the stage is finished before the
next stage reads what it wrote: it spins, then yields its core, so that a part the scheduler has put
on the same core (or preempted) gets to finish its chunk. A chunk is run by whoever claims it, so the call finishes
whatever the threads do: one that starts late, or never gets a core, only finds less work; run one
after the other, the first part does everything and the others nothing. The bits of the result
do not depend on who ran what.

With parts == 1 no atomic is touched. Without Numba this module defines nothing.
"""

import os
import threading

import numpy as np

from fastformer.kernels import tasks
from fastformer.kernels._jit import inline, kernel, numba
from fastformer.kernels.checks import aligned_zeros

STAGE_WORDS = 32  # int64 words of a stage in `sync`: its finished count and up to MAX_CHUNKS claims
LINE_WORDS = 8  # int64 words of a cache line: a stage of few parts
MAX_CHUNKS = STAGE_WORDS - 1
CHUNKS_PER_PART = 2  # chunks a part owns in a stage: one more to give away when the other is late


def _stage_words(parts):
    """The words of a stage of `parts` parts in `sync`: one cache line while its chunks fit."""
    return LINE_WORDS if parts * CHUNKS_PER_PART < LINE_WORDS else STAGE_WORDS


stage_words = inline(_stage_words)


def new_sync(stages, parts):
    """A zeroed `sync` array for this many stages of `parts` parts, starting on a cache line (a
    stage's words then share no line with another stage's)."""
    return aligned_zeros(stages * _stage_words(parts), np.int64)


if numba is not None:
    import platform

    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    from fastformer.kernels._tiles import pointer

    _I64 = ir.IntType(64)

    @intrinsic
    def atomic_add(typingctx, array, index, value):
        """array[index] += value as one atomic (sequentially consistent) step; returns the old value."""
        sig = types.int64(array, types.int64, types.int64)

        def codegen(context, builder, signature, args):
            at = pointer(context, builder, signature.args[0], args[0], args[1])
            return builder.atomic_rmw("add", at, args[2], "seq_cst")

        return sig, codegen

    @intrinsic
    def atomic_load(typingctx, array, index):
        """array[index] read atomically, with acquire order: what a thread wrote before its
        atomic_add of this word is visible after reading that add's result."""
        sig = types.int64(array, types.int64)

        def codegen(context, builder, signature, args):
            return builder.load_atomic(pointer(context, builder, signature.args[0], args[0], args[1]), "acquire", 8)

        return sig, codegen

    _X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    _LINUX_X86_64 = platform.system() == "Linux" and platform.machine().lower() in ("x86_64", "amd64")

    def _pause(builder):
        """The IR of the `pause` hint of a spin-wait loop on x86 (nothing elsewhere)."""
        if _X86:
            name = "llvm.x86.sse2.pause"
            fn = builder.module.globals.get(name) or ir.Function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                                 name)
            builder.call(fn, [])

    @intrinsic
    def spin_pause(typingctx):
        """The `pause` hint of a spin-wait loop on x86 (nothing elsewhere)."""
        def codegen(context, builder, signature, args):
            _pause(builder)
            return context.get_dummy_value()

        return types.void(), codegen

    if _LINUX_X86_64:
        from llvmlite import binding

        binding.initialize_native_asmparser()  # LLVM parses the inline `syscall` below

    @intrinsic
    def cpu_yield(typingctx):
        """sched_yield(2) on x86-64 Linux, as the system call itself (a libc address would keep the
        kernels out of Numba's disk cache): the core goes to another runnable thread, if any, such
        as the part being waited for when the scheduler has put both on one core. Elsewhere, the
        `pause` hint."""
        def codegen(context, builder, signature, args):
            if _LINUX_X86_64:
                call = ir.InlineAsm(ir.FunctionType(_I64, [_I64]), "syscall", "={rax},{rax},~{rcx},~{r11},~{memory}",
                                    side_effect=True)
                builder.call(call, [ir.Constant(_I64, 24)])  # __NR_sched_yield
            else:
                _pause(builder)
            return context.get_dummy_value()

        return types.void(), codegen
else:
    atomic_add = atomic_load = spin_pause = cpu_yield = None

SPINS_BEFORE_YIELD = 1000  # pauses (some microseconds) a waiting part spins before it yields its core


def _spin_until_changed(word, seen, spins):
    """word[0] once it differs from `seen`, or after `spins` pauses: a thread waiting for its next
    call spins in compiled code, without the GIL, and its core stays awake (run_together).
    As wait_stage, it yields its core between pauses after the first SPINS_BEFORE_YIELD, to a
    thread the scheduler has put on the same core (the caller, between its calls)."""
    for i in range(spins):
        now = atomic_load(word, 0)
        if now != seen:
            return now
        spin_pause()
        if i >= SPINS_BEFORE_YIELD:
            cpu_yield()
    return atomic_load(word, 0)


@inline
def stage_chunks(items, parts):
    """How many chunks a stage of `items` units (groups of columns, heads) is cut into."""
    if parts == 1:
        return 1
    return max(1, min(items, parts * CHUNKS_PER_PART, MAX_CHUNKS))


@inline
def chunk_span(c, n, items):
    """The units [first, end) of chunk c of n over `items` units."""
    return c * items // n, (c + 1) * items // n


@inline
def chunk_at(j, n, part, parts):
    """The j-th chunk that `part` tries to claim: its own share ascending, then the others' from
    the far end down."""
    lo, hi = part * n // parts, (part + 1) * n // parts
    if j < hi - lo:
        return lo + j
    return (lo - 1 - (j - (hi - lo))) % n


@inline
def stage_open(sync, s, n, parts):
    """Whether some chunk of stage s (of n) may still be unfinished: a thread that arrives after
    the stage is done skips its preparations too."""
    return parts == 1 or atomic_load(sync, s * stage_words(parts)) < n


@inline
def claim(sync, s, c, parts):
    """Whether this thread takes chunk c of stage s (no other thread will run it)."""
    return parts == 1 or atomic_add(sync, s * stage_words(parts) + 1 + c, 1) == 0


@inline
def finish(sync, s, parts):
    """Count a chunk of stage s as finished; what the chunk wrote is visible to every thread that
    then sees the count."""
    if parts > 1:
        atomic_add(sync, s * stage_words(parts), 1)


@inline
def wait_stage(sync, s, n, parts):
    """Wait until the n chunks of stage s are finished."""
    if parts > 1:
        spins = 0
        at = s * stage_words(parts)
        while atomic_load(sync, at) < n:
            if spins < SPINS_BEFORE_YIELD:
                spin_pause()
                spins += 1
            else:  # the chunk's part may not be running: both parts on one core, or preempted
                cpu_yield()


spin_until_changed = kernel("int64(int64[::1], int64, int64)", parallel=False, floats=("float32",))(
    _spin_until_changed) if numba is not None else None


# ------------------------------------------------------------ the parts' threads
# Pauses the partner of run_together spins after a call, awake, for the next one: a few milliseconds
# (SPINS_BEFORE_YIELD pauses, then each with a yield of the core), which covers the gaps between the
# calls of one generation. A sleeping pool thread is slow to start a task, back to back and slower
# after an idle pause (a submitted no-op, timed); a spinning one starts at once.
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


def _siblings(cpu):
    """The CPUs that share `cpu`'s core (hyperthreads), itself included."""
    try:
        with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list", encoding="ascii") as f:
            spans = f.read().strip().split(",")
        return {c for span in spans for lo, _, hi in [span.partition("-")] for c in range(int(lo), int(hi or lo) + 1)}
    except (OSError, ValueError):
        return {cpu}


class _Partner:
    """The thread that runs part 1 of two-part calls (run_together), on a core of its own: the
    last CPU this process may use, when the process uses as many threads as it has CPUs (the
    default; with fewer, nothing is pinned). During a call the caller keeps off that core.
    Unpinned, the two threads ended up on one core in most generations after an idle pause (read
    from /proc/self/task/*/stat): each wakes the other through the GIL, and Linux wakes a thread on
    its waker's core, so two parts unpinned ran slower than one, and pinned, faster. After each
    part it spins for the next call in compiled code (spin_until_changed: no GIL held, its core
    kept awake) for WARM_SPINS pauses, then sleeps until one is posted: the calls of one
    generation, milliseconds apart, find it awake."""
    def __init__(self, threads):
        cpus = _cpus()
        pin = cpus is not None and len(cpus) > 1 and len(cpus) == threads
        self.cpu = max(cpus) if pin else None  # the partner's own CPU
        self.core = _siblings(self.cpu) if pin else set()  # and its hyperthreads
        self.pid = os.getpid()
        self.word = np.zeros(8, np.int64)  # word[0]: calls posted, word[1]: the last call whose part ended
        self.cond = threading.Condition()
        self.work = None
        self.sleeps = 0  # times it has stopped spinning and slept
        self.busy = threading.Lock()  # one caller at a time; another takes the pool
        self.thread = threading.Thread(target=self._loop, name="fastformer-partner", daemon=True)
        self.thread.start()

    def post(self, fn, args):
        """Hand part 1 of a call to the partner: returns (its ticket, its _Finished)."""
        finished = _Finished()
        with self.cond:
            self.work = fn, args, finished
            self.word[0] += 1
            ticket = int(self.word[0])
            self.cond.notify()
        return ticket, finished

    def _loop(self):
        tasks._here.inside = True
        if self.cpu is not None:
            _set_cpus({self.cpu})
        taken = 0
        while True:
            if spin_until_changed(self.word, taken, WARM_SPINS) == taken:  # nothing new: sleep
                with self.cond:
                    self.sleeps += 1
                    self.cond.wait_for(lambda: self.word[0] != taken)
            with self.cond:
                fn, args, finished = self.work
                taken = int(self.word[0])
            try:
                fn(*args)
            except BaseException as e:  # noqa: BLE001 -- handed to the caller, which raises it
                finished.error = e
            finally:
                self.word[1] = taken  # what the caller spins on
                finished.event.set()

    def wait(self, ticket, finished):
        """Wait for the part of call `ticket`: spinning (the part ends about when the caller's does),
        so that the caller never sleeps on the partner: woken by it, the scheduler would move the
        caller onto the partner's core, and the two parts would share one core from then on."""
        if spin_until_changed(self.word[1:2], ticket - 1, WARM_SPINS) != ticket:
            while not finished.event.wait(0.5):
                if not self.thread.is_alive():
                    raise RuntimeError("the partner thread of two-part kernel calls has died")


_partner = None
_partner_made = threading.Lock()


def _alive(partner):
    """Whether `partner` runs in this process (a forked child has no partner thread)."""
    return partner is not None and partner.pid == os.getpid() and partner.thread.is_alive()


def _get_partner():
    """The partner thread, started at the first two-part call; None without compiled Numba."""
    global _partner
    if spin_until_changed is None or numba.config.DISABLE_JIT:
        return None
    if not _alive(_partner):
        with _partner_made:
            if not _alive(_partner):
                spin_until_changed.dispatcher or spin_until_changed.jit()  # made before the thread runs it
                _partner = _Partner(tasks.task_threads())
    return _partner


def _in_turn(fn, args, parts):
    """run_together's parts one after the other on the calling thread; part 0's result."""
    return [fn(*args, part, parts) for part in range(parts)][0]


def _with_partner(partner, fn, args, parts):
    """run_together's two parts, the second on the partner (whose `busy` lock the caller holds)."""
    mine = _cpus() if partner.cpu is not None else None
    away = None
    if mine is not None and partner.cpu in mine:
        away = (mine - partner.core) or (mine - {partner.cpu})
        if not away:  # the caller may only run where the partner does: one part after the other
            return _in_turn(fn, args, parts)
        _set_cpus(away)  # off the partner's core for the call
    try:
        ticket, finished = partner.post(fn, (*args, 1, parts))
        try:
            result = fn(*args, 0, parts)
        except BaseException:  # the caller's error first, once the partner's part is done
            _wait_through_interrupts(partner, ticket, finished)
            raise
        if _wait_through_interrupts(partner, ticket, finished):
            raise KeyboardInterrupt
        if finished.error is not None:
            raise finished.error
        return result
    finally:
        if away:
            _set_cpus(mine)


def _wait_through_interrupts(partner, ticket, finished):
    """partner.wait, to the end whatever interrupts it (the partner's part may still be writing
    the call's arrays); returns whether a KeyboardInterrupt came meanwhile."""
    interrupted = False
    while True:
        try:
            partner.wait(ticket, finished)
            return interrupted
        except KeyboardInterrupt:
            interrupted = True


def run_together(fn, args, parts):
    """Run fn(*args, part, parts) for part = 0 .. parts - 1 at once, part 0 on the calling thread
    and the others on the partner thread (two parts) or the pool; returns part 0's result. For
    the parts of one kernel call that share its work as they go (_sync.py): each part must be able
    to finish alone, since another thread may start late, or after the caller's part is done."""
    if parts > tasks.task_threads() or tasks.in_task():  # one after the other
        return _in_turn(fn, args, parts)
    partner = _get_partner() if parts == 2 else None
    if partner is not None and partner.busy.acquire(blocking=False):  # else another thread has it: the pool
        try:
            return _with_partner(partner, fn, args, parts)
        finally:
            partner.busy.release()
    pool = tasks._executor(tasks.task_threads())
    others = [pool.submit(tasks._run, fn, (*args, part, parts)) for part in range(1, parts)]
    try:
        return fn(*args, 0, parts)
    finally:
        for f in others:
            f.result()
