"""Process-wide settings: thread counts, the allocator policy and the BLAS spin.

They are applied by one call, `apply_process_settings`, made when a backend is first chosen
(`fastformer.kernels.get_ops`, `set_backend`, `use_backend`: the NumPy backend without Numba's
part), never when a module is imported; `fastformer info` reports them (`process_info`).

Threads. Numba's parallel kernels and OpenBLAS's GEMMs run one after the other, never at the
same time (no BLAS call sits inside a `prange`), so each may use every core without the two
competing: both get `num_threads()` threads, which is the number of cores this process may run
on, or FASTFORMER_NUM_THREADS when set. The Numba threading layer is OpenMP, whose workers spin
briefly after a parallel loop and then sleep (`_threading_layer_chosen`), else TBB, else
"workqueue" (which two Python threads must not call at once), unless NUMBA_THREADING_LAYER says
otherwise: OpenMP's default workers keep spinning for milliseconds and steal the cores from the
GEMM that follows, workers that sleep at once are slow to wake for each parallel loop, and
workqueue starts each parallel loop more slowly.

Allocator (`keep_freed_memory`): glibc gives every large freed block back to the OS, so each
training step's fresh activations and gradients page-fault again, a large share of a step;
told to keep them, it reuses the memory.

BLAS spin (`shorten_blas_spin`): OpenBLAS's idle threads go to sleep soon after a call, so that
they leave the cores to the Numba kernel that follows.
"""

import contextlib
import functools
import os

from fastformer.errors import FastformerError, check_int

ENV_VAR = "FASTFORMER_NUM_THREADS"
MAX_THREADS = 4096  # what FASTFORMER_NUM_THREADS may ask for: more than any machine's cores
_applied = None  # the thread count apply_process_settings applied, once it ran
_kept_memory = None  # whether keep_freed_memory took effect, once it ran
_numba_started = False  # whether apply_process_settings has started Numba's threads


def available_cores():
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def num_threads():
    """Threads for Numba and BLAS: FASTFORMER_NUM_THREADS, else the cores we may run on."""
    value = os.environ.get(ENV_VAR, "").strip()
    if value:
        if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= MAX_THREADS:
            raise FastformerError(f"{ENV_VAR} must be an integer in [1, {MAX_THREADS}], got {value!r}")
        return int(value)
    return available_cores()


def keep_freed_memory():
    """Make glibc serve large arrays from its heap and keep freed memory for reuse instead of
    unmapping it (mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=1 GiB). Linux/glibc only; skipped when
    FASTFORMER_KEEP_MEMORY=0. Returns True when applied."""
    if os.environ.get("FASTFORMER_KEEP_MEMORY", "1").strip() == "0":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):
        return False


BLAS_SPIN_LOG2 = 18  # an idle OpenBLAS thread spins 2**18 TSC ticks (0.1 ms at 2.6 GHz), then sleeps


def shorten_blas_spin(log2_ticks=BLAS_SPIN_LOG2):
    """Make idle OpenBLAS threads sleep after spinning 2**log2_ticks TSC ticks instead of its
    default 2**28 (0.1 s). Returns True when applied.

    After each call the workers of a pthreads OpenBLAS keep spinning on their cores for that
    long, and the Numba kernel that follows a GEMM runs its threads beside them, on cores already
    taken: the short spin gives them back, at no cost to the GEMMs themselves. This sets
    OPENBLAS_THREAD_TIMEOUT, makes OpenBLAS read its environment again and stops its workers,
    which it starts again, with the new timeout, at its next call (what it does after a fork).
    Skipped when OPENBLAS_THREAD_TIMEOUT is already set: set it (4 to 30, OpenBLAS's log2 of the
    ticks) to choose another spin, 28 for OpenBLAS's own.
    """
    if os.environ.get("OPENBLAS_THREAD_TIMEOUT", "").strip():
        return False
    import ctypes

    import threadpoolctl

    paths = [d["filepath"] for d in threadpoolctl.threadpool_info()
             if d.get("internal_api") == "openblas" and d.get("threading_layer") == "pthreads"]
    os.environ["OPENBLAS_THREAD_TIMEOUT"] = str(int(log2_ticks))  # also for child processes
    applied = False
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
            lib.openblas_read_env()
            lib.blas_thread_shutdown_()
            applied = True
        except (OSError, AttributeError):  # a build without these entry points: keep its spin
            pass
    return applied


OPENMP_RUNTIMES = ("libgomp", "libiomp", "libomp")  # GNU's, Intel's, LLVM's


def openmp_already_loaded():
    """True when an OpenMP runtime is mapped into this process (Linux; False elsewhere)."""
    try:
        with open("/proc/self/maps") as f:
            return any(name in line for line in f for name in OPENMP_RUNTIMES)
    except OSError:
        return False


@contextlib.contextmanager
def _threading_layer_chosen():
    """Around Numba's thread start: choose its threading layer, unless NUMBA_THREADING_LAYER
    did. OpenMP first, then TBB, then workqueue: the first two may be called from several Python
    threads at once, workqueue may not (two threads in a parallel kernel abort the process), so
    it is taken only where neither loads. OpenMP stays first when another library (torch) has
    already loaded an OpenMP runtime: that is when a program is most likely to run threads of
    its own. OpenMP's workers wait briefly (OMP_WAIT_POLICY=passive and GOMP_SPINCOUNT=OMP_SPINS,
    unless OMP_WAIT_POLICY or GOMP_SPINCOUNT is set).

    Workers that spin for long after a parallel loop (OpenMP's default, some milliseconds) take
    the cores from the BLAS GEMM that follows it, and workqueue starts each loop more slowly: both
    cost steps/s in `fastformer bench`. Workers that sleep at once are slow to wake for every
    parallel loop, which a bf16 step pays at each of its GEMMs (Numba's). libgomp's workers spin
    OMP_SPINS pauses and then sleep: back-to-back kernels find them awake and start at once, and a
    BLAS GEMM after a Numba kernel loses at most that short spin of the second core.
    The runtime reads both variables once, when it loads at the thread start, so they are set
    only for that moment: a runtime loaded earlier or later by another library keeps its own
    policy. (GOMP_SPINCOUNT is libgomp's; another OpenMP runtime keeps the passive policy.)
    """
    import numba

    if "NUMBA_THREADING_LAYER" in os.environ:
        yield
        return
    numba.config.THREADING_LAYER_PRIORITY = list(THREADING_LAYERS)
    numba.config.THREADING_LAYER = "default"  # the first of the priority list that loads
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        yield
        return
    os.environ["OMP_WAIT_POLICY"], os.environ["GOMP_SPINCOUNT"] = "passive", str(OMP_SPINS)
    try:
        yield
    finally:
        del os.environ["OMP_WAIT_POLICY"], os.environ["GOMP_SPINCOUNT"]


THREADING_LAYERS = ("omp", "tbb", "workqueue")  # Numba's layers, the thread-safe ones first
# pauses libgomp's idle workers spin before they sleep (_threading_layer_chosen): long enough that
# back-to-back kernels find them awake (tiny's bf16 step gains most), short enough to leave an fp32
# step's BLAS GEMMs their cores (a longer spin slowed it). Chosen with `fastformer bench` in
# alternating processes at several spin counts.
OMP_SPINS = 3000


def apply_process_settings(n=None, numba_threads=True):
    """Apply `n` threads (default `num_threads()`) to BLAS and, unless numba_threads is False,
    to Numba; set the allocator policy and the short BLAS spin; returns n.

    fastformer.kernels calls it when a backend is first chosen: with numba_threads=False for
    the NumPy backend (its kernels are BLAS and NumPy: Numba's threads are not started). Call
    it again to change the count.
    """
    global _applied, _kept_memory, _numba_started
    n = num_threads() if n is None else check_int("the thread count n", n)
    import threadpoolctl

    if numba_threads:
        import numba

        with _threading_layer_chosen():
            numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))  # starts the threads once
        _numba_started = True
    threadpoolctl.threadpool_limits(n, user_api="blas")
    _kept_memory = keep_freed_memory()
    shorten_blas_spin()
    _applied = n
    return n


_blas_controller = None  # threadpoolctl's view of the loaded BLAS libraries, found once


def blas_threads(n):
    """A context in which the BLAS libraries run `n` threads (then their count before)."""
    global _blas_controller
    import threadpoolctl

    if _blas_controller is None:
        _blas_controller = threadpoolctl.ThreadpoolController()
    return _blas_controller.limit(limits=n, user_api="blas")


def numba_threads_started():
    """Whether apply_process_settings has set (and so started) Numba's threads."""
    return _numba_started


def applied_threads():
    """The thread count apply_process_settings applied last, or None before it ran."""
    return _applied


@functools.lru_cache(maxsize=1)
def cpu_has_bf16():
    """Whether this CPU runs AVX-512 BF16, as LLVM (llvmlite, Numba's) sees it: the kernels that
    emit its instructions are compiled only then -- LLVM aborts the process, rather than raising,
    when told to emit them for a CPU without it."""
    try:
        import llvmlite.binding as llvm
    except ImportError:  # no Numba, no kernel to run it
        return False
    features = llvm.get_host_cpu_features()
    return bool(features.get("avx512bf16")) and bool(features.get("avx512f"))


@functools.lru_cache(maxsize=1)
def cpu_has_vnni():
    """Whether this CPU runs AVX-512 VNNI (`vpdpbusd`, the int8 weights' product), as LLVM sees it;
    checked, as cpu_has_bf16, before any kernel that emits it is compiled."""
    try:
        import llvmlite.binding as llvm
    except ImportError:
        return False
    features = llvm.get_host_cpu_features()
    return bool(features.get("avx512vnni")) and bool(features.get("avx512f"))


def cpu_vector_isa():
    """The widest x86 vector extension the CPU reports ("AVX-512", "AVX2", ...), or None when
    /proc/cpuinfo does not say (not Linux, not x86)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return None
    for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"), ("sse4_2", "SSE4.2")):
        if flag in flags:
            return name
    return None


def process_info():
    """{name: value} describing the threads, libraries and process settings in use, for
    `fastformer info`."""
    info = {"cores_available": available_cores(), ENV_VAR: os.environ.get(ENV_VAR),
            "threads_configured": _applied, "keep_freed_memory": _kept_memory}
    try:
        import numba

        info["numba_version"] = numba.__version__
        if not _numba_started:  # asking Numba would start its threads
            info["numba_threads"] = info["numba_threading_layer"] = "not started (the numba backend is not loaded)"
        else:
            info["numba_threads"] = numba.get_num_threads()
            try:
                info["numba_threading_layer"] = numba.threading_layer()
            except ValueError:  # no parallel kernel has run yet, so no layer is loaded
                info["numba_threading_layer"] = f"{numba.config.THREADING_LAYER} (not loaded yet)"
    except ImportError:
        info["numba_version"] = None
    import threadpoolctl

    blas = [d for d in threadpoolctl.threadpool_info() if d.get("user_api") == "blas"]
    info["blas"] = [f"{d.get('internal_api')} {d.get('version')} ({d.get('architecture')} kernels), "
                    f"{d.get('num_threads')} threads" for d in blas]
    info["cpu_vector_isa"] = cpu_vector_isa()
    found = [name for name, has in (("avx512_bf16", cpu_has_bf16()), ("avx512_vnni", cpu_has_vnni())) if has]
    info["cpu_instruction_sets"] = ", ".join(found) or "neither avx512_bf16 nor avx512_vnni"
    native = ["fp32"] + [fmt for fmt, has in (("bf16", cpu_has_bf16()), ("int8", cpu_has_vnni())) if has]
    info["weight_formats"] = (f"{', '.join(native)} run natively (--weights; the numba backend)"
                              + ("" if len(native) == 3 else "; the others only on the numpy reference"))
    info["bf16_matmul"] = ("available (AVX-512 BF16): train.precision=bf16 runs on the Numba backend, and "
                           "train.precision=auto picks it there; the default stays fp32" if cpu_has_bf16() else
                           "not on this CPU (no avx512_bf16): train.precision=fp32 only (auto picks fp32)")
    # a kernel set chosen in the environment overrides OpenBLAS's own detection: Haswell's
    # (AVX2) GEMMs run at half the float32 rate of SkylakeX's (AVX-512) on an AVX-512 CPU
    info["OPENBLAS_CORETYPE"] = os.environ.get("OPENBLAS_CORETYPE")
    info["OPENBLAS_THREAD_TIMEOUT"] = os.environ.get("OPENBLAS_THREAD_TIMEOUT")
    info["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY")  # the user's; fastformer's is not kept
    user = {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ}
    info["openmp_idle_workers"] = (f"as set: {user}" if user else
                                   f"spin {OMP_SPINS} pauses (about 100 us), then sleep (libgomp)")
    return info
