"""Several threads in one kernel call: stages of chunks that any of them may run.

At batch 1 a decoding step is a chain of small matrix products, each needing the one before:
a thread pool's hand-off (tens of microseconds) per product would cost more than the product.
Instead every thread runs the same loops over the same stages -- `parts` copies of one kernel,
started together (tasks.run_together) -- and a stage's work is cut into chunks that the threads
share through atomics in an int64 array, `sync`, STAGE_WORDS words a stage:

    sync[s * STAGE_WORDS]          how many of stage s's chunks are finished
    sync[s * STAGE_WORDS + 1 + c]  0 until a thread claims chunk c of stage s

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

from fastformer.kernels._jit import inline, kernel, numba

STAGE_WORDS = 32  # int64 words of a stage in `sync`: its finished count and up to MAX_CHUNKS claims
MAX_CHUNKS = STAGE_WORDS - 1
CHUNKS_PER_PART = 2  # chunks a part owns in a stage: one more to give away when the other is late


def sync_words(stages):
    """The length of a `sync` array for this many stages."""
    return stages * STAGE_WORDS


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
    call spins in compiled code, without the GIL, and its core stays awake (tasks.run_together).
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
    return parts == 1 or atomic_load(sync, s * STAGE_WORDS) < n


@inline
def claim(sync, s, c, parts):
    """Whether this thread takes chunk c of stage s (no other thread will run it)."""
    return parts == 1 or atomic_add(sync, s * STAGE_WORDS + 1 + c, 1) == 0


@inline
def finish(sync, s, parts):
    """Count a chunk of stage s as finished; what the chunk wrote is visible to every thread that
    then sees the count."""
    if parts > 1:
        atomic_add(sync, s * STAGE_WORDS, 1)


@inline
def wait_stage(sync, s, n, parts):
    """Wait until the n chunks of stage s are finished."""
    if parts > 1:
        spins = 0
        while atomic_load(sync, s * STAGE_WORDS) < n:
            if spins < SPINS_BEFORE_YIELD:
                spin_pause()
                spins += 1
            else:  # the chunk's part may not be running: both parts on one core, or preempted
                cpu_yield()


spin_until_changed = kernel("int64(int64[::1], int64, int64)", parallel=False, floats=("float32",))(
    _spin_until_changed) if numba is not None else None
