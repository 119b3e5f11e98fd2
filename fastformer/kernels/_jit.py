"""What every Numba kernel shares: the compile flags, the two signatures, serial twins, the disk
cache, and the vector helpers that the kernels of several ops inline.

A kernel is a private function of its op's module, decorated with `@kernel("void(R[:, ::1], F[:, ::1])")`:
F is the float type and R the same type read-only (an input the kernel never writes), so a
kernel compiles for exactly float32 and float64, and read-only inputs (np.memmap(mode="r"),
np.frombuffer) are used in place. Nothing is compiled when a module is imported: a kernel is
compiled (or loaded from the disk cache) at its first call, float32 first and float64 once a
call brings float64 arrays (`compile_float64`), so a program compiles only what it runs.

Without Numba installed this module still imports: `inline` and `prange` become the plain
Python function and `range`, and calling a kernel raises ImportError. The op modules keep their
NumPy reference usable either way.

Every process runs the compiled code of the disk cache, the first one after an install too: a
parallel kernel missing from the cache is compiled by a child process and then loaded (`Kernel.jit`
says why), so a run gives the same bits whether its kernels were just compiled or not.

The disk cache (`cache=True`) is keyed by Numba on the source of the kernel's own file. A kernel
also inlines helpers from other files (this one, and e.g. the layernorm row that the GPT-2
decoding step reuses), so each kernel's cache entry is stamped with the source of every
fastformer.kernels module its file takes jitted functions from: editing one op recompiles that
op and the kernels that inline its helpers, never a stale copy, and nothing else.
"""

import functools
import hashlib
import importlib
import math
import os
import subprocess
import sys
import types as pytypes

import numpy as np

from fastformer.kernels.tasks import in_task

try:
    import numba
    from llvmlite import ir
    from numba import prange, types
    from numba.extending import intrinsic, overload
except ImportError:  # the NumPy backend still works; NumbaOps refuses to load
    numba = None
    prange = range

# Fast-math without "nnan" and "ninf": LLVM may reassociate sums (so reductions vectorise) and
# fuse multiply-adds, while -inf (masked attention scores) and NaN keep their IEEE meaning, so
# that the NaN rules of the reference hold here too (tests/kernels/test_kernel_nan.py). "arcp" lets
# a float32 1 / sqrt(x) become an estimate that is NaN at x = 0 and x = inf: write sqrt(1 / x).
FASTMATH = {"nsz", "arcp", "contract", "reassoc"}
FLOAT_TYPES = ("float32", "float64")
_JIT_FLAGS = dict(fastmath=FASTMATH, error_model="numpy", nogil=True)
ROW_CHUNKS = 64  # chunks of rows whose partial weight gradients a backward kernel writes, summed after it
SMALL_WORK = 1 << 14  # elements below which a kernel with a serial twin runs it


class _ReadOnly:
    """`readonly(int64)[::1]` in a signature: the array type of an input the kernel only reads.
    A read-only array matches it and a writeable one converts to it."""

    def __init__(self, dtype):
        self.dtype = dtype

    def __getitem__(self, index):
        return self.dtype[index].copy(readonly=True)


def _sigs(template, floats=FLOAT_TYPES):
    """The float32 and the float64 signature of a kernel (those of `floats`): `template` with F
    replaced by the float type and R by the same type read-only, evaluated with Numba's type
    names as Numba evaluates a signature string."""
    names = {**vars(types), "readonly": _ReadOnly}
    return [eval(template.replace("R", "readonly(F)").replace("F", f), names) for f in floats]


_KERNELS = []  # every Kernel, for compile_float64
_float64_ready = False


class Kernel:
    """A jitted kernel made at its first call: compiled for float32 then (or loaded from the disk
    cache), and for float64 as well once `compile_float64` has run, which the first call with
    float64 arrays does. No other type ever compiles."""

    def __init__(self, fn, template, parallel, floats=FLOAT_TYPES):
        self.py_func, self.__name__ = fn, fn.__name__
        self.template, self.parallel, self.floats = template, parallel, floats
        self.dispatcher = None
        _KERNELS.append(self)

    def jit(self):
        """The Numba dispatcher, made (compiled or loaded from the disk cache) on the first
        call, and again with float64 by compile_float64."""
        if numba is None:
            raise ImportError("numba is not installed: the Numba kernels cannot run")
        if numba.config.DISABLE_JIT:  # the kernels run as plain Python functions
            self.dispatcher = self.py_func
            return self.py_func
        sigs = _sigs(self.template, self.floats)
        if not _float64_ready:
            sigs = sigs[:1]
        # numba.njit(sigs, cache=True), with the cache entry stamped by the kernel's dependencies
        dispatcher = numba.njit(parallel=self.parallel, **_JIT_FLAGS)(self.py_func)
        dispatcher.enable_caching()
        _stamp_dependencies(dispatcher)
        # Numba compiles a prange body into a library of its own, which the compiling process
        # registers and runs, and links a copy of it into the kernel's library, which is what the
        # cache keeps; the copy is optimised a second time, and under fast-math LLVM may add a
        # sum's partial sums in another order there (((a + b) + c) + d against (a + b) + (c + d)
        # in _layernorm_bwd). The compiling process keeps running its own body even after loading
        # the cached copy (whose weak symbol resolves to the body already registered), so a child
        # fills the cache and this process only loads. If the child fails, it compiles here.
        if self.parallel and os.environ.get(_CHILD_VAR) != "1" and not all(_in_cache(dispatcher, s) for s in sigs):
            _compile_in_child(self)
        from numba.core import typeinfer

        with typeinfer.register_dispatcher(dispatcher):
            for sig in sigs:
                dispatcher.compile(sig)
        dispatcher.disable_compile()
        self.dispatcher = dispatcher
        return dispatcher

    def __call__(self, *args):
        dispatcher = self.dispatcher or self.jit()
        try:
            return dispatcher(*args)
        except TypeError:  # no signature matches: float64 arrays before compile_float64, or a bad type
            if _float64_ready or not any(getattr(a, "dtype", None) == np.float64 for a in args):
                raise
            compile_float64()
            return self.dispatcher(*args)


def compile_float64():
    """Add the float64 signature to every kernel made so far (loaded from the disk cache, or
    compiled), once; kernels made later get it with their float32 one. float64 (gradient
    checks, tests) waits for the first kernel call with float64 arrays."""
    global _float64_ready
    if _float64_ready or numba is None or numba.config.DISABLE_JIT:
        return
    _float64_ready = True
    for k in _KERNELS:
        if k.dispatcher is not None and len(k.floats) > 1:
            k.jit()


_SERIAL = {}  # kernel name -> its serial twin


def kernel(template, parallel=True, serial_twin=False, floats=FLOAT_TYPES):
    """Make `fn` a `Kernel` with the float32 and float64 signatures of `template` (those of
    `floats`: ("float32",) for a kernel that exists for float32 only).

    With `serial_twin`, the same function also becomes a kernel without threads (prange runs as
    range) for `sized()` to pick on small inputs: starting a parallel region costs tens of
    microseconds, far more than a decoding step's single row of work.
    """
    def make(fn):
        if serial_twin:
            twin = pytypes.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial")
            twin.__qualname__ = fn.__qualname__ + "_serial"  # its own entry in the disk cache
            twin.__module__ = fn.__module__
            _SERIAL[fn.__name__] = Kernel(twin, template, parallel=False, floats=floats)
        return Kernel(fn, template, parallel, floats)

    return make


def sized(k, work, small=None):
    """`k`, or its serial twin when `work` (elements touched) is below `small` (SMALL_WORK), or when the caller
    runs on a thread of the task pool: its tasks run serial kernels side by side, and parallel
    regions started from two Python threads at once are what Numba's workqueue layer (the one it
    takes after torch has loaded its OpenMP) cannot take."""
    return _SERIAL.get(k.__name__, k) if work < (SMALL_WORK if small is None else small) or in_task() else k


def serial(k):
    """The serial twin of `k`, for a caller that runs it on threads of its own."""
    return _SERIAL[k.__name__]


# --------------------------------------------------------- the disk cache
_CHILD_VAR = "FASTFORMER_COMPILE_CHILD"  # set in the child that compiles a parallel kernel into the cache


def _in_cache(dispatcher, sig):
    """Whether the disk cache holds the dispatcher's function for `sig` (its index alone is read;
    nothing is compiled or loaded). True when this Numba's cache is not the one this reads, so
    that the kernel compiles in the process as it would without this check."""
    try:
        cache = dispatcher._cache
        return cache._index_key(sig, dispatcher.targetctx.codegen()) in cache._cache_file._load_index()
    except (AttributeError, OSError):
        return True


def _compile_in_child(k):
    """Compile the kernel `k` (its signatures of now) into the disk cache in a child process that
    imports this copy of fastformer. Returns whether the child succeeded."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, _CHILD_VAR: "1",
           "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    code = (f"from fastformer.kernels import _jit; "
            f"_jit._compile_for_cache({k.py_func.__module__!r}, {k.__name__!r}, {_float64_ready})")
    try:
        return subprocess.run([sys.executable, "-c", code], env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
    except OSError:
        return False


def _compile_for_cache(module, name, float64):
    """The child's side of _compile_in_child: compile the kernel `name` of `module` (and with
    float64 its float64 signature), which writes it to the disk cache."""
    global _float64_ready
    importlib.import_module(module)
    _float64_ready = float64
    (k,) = [k for k in _KERNELS if k.py_func.__module__ == module and k.__name__ == name]
    k.jit()



@functools.lru_cache(maxsize=None)
def _source_hash(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@functools.lru_cache(maxsize=None)
def _dependencies(module_name):
    """The source files of `module_name` and of every fastformer.kernels module it takes a jitted
    function (a kernel, an inlined helper or an intrinsic) from, transitively, this one included."""
    module = importlib.import_module(module_name)
    files = {module.__file__, __file__}
    for value in list(vars(module).values()):
        function = getattr(value, "py_func", None) or getattr(value, "_defn", None)  # a jitted one, an intrinsic
        origin = getattr(function, "__module__", None)
        if isinstance(origin, str) and origin.startswith("fastformer.kernels") and origin != module_name \
                and origin in sys.modules:
            files |= _dependencies(origin)
    return frozenset(files)


def _stamp_dependencies(dispatcher):
    """Stamp the dispatcher's disk-cache entry with the source of its dependencies as well as
    of its own file: Numba checks only the latter, so a kernel inlining a helper from another
    file would otherwise load compiled code from before that helper changed."""
    cache_file = getattr(getattr(dispatcher, "_cache", None), "_cache_file", None)
    if cache_file is None or not hasattr(cache_file, "_source_stamp"):  # another Numba: its own stamp only
        return
    deps = _dependencies(dispatcher.py_func.__module__)
    cache_file._source_stamp = (cache_file._source_stamp, tuple(_source_hash(p) for p in sorted(deps)))


# ------------------------------------------------------------ array helpers
def jit_writable(*arrays):
    """Whether a kernel can update these arrays in place: C-contiguous and aligned, as its
    signature requires (the reference updates any other array)."""
    return all(a.flags.c_contiguous and a.flags.aligned for a in arrays)


def rows(x):
    """2-D (rows, last axis) view of a contiguous array."""
    return x.reshape(-1, x.shape[-1])


# ------------------------------------------------------------ vector math
# libm's expf and tanhf are scalar calls that stop LLVM from vectorising a loop (and tanhf is a
# slow one). For float32 the kernels use the polynomial below (Cephes' expf, within 1 ulp), which
# vectorises, and build tanh from it; float64 keeps math.exp.

def exp(x):
    """exp(x) in a kernel; with NUMBA_DISABLE_JIT (or without Numba) this plain function runs,
    jitted code uses the overload below."""
    return math.exp(x)


def exp_nonpositive64(x):
    """exp(x) of a float64 x <= 0 (or -inf) in a kernel, within about 1 ulp of libm's (not its bits):
    a polynomial that vectorises, where libm's exp is a scalar call. As `exp`, this plain function
    runs without the JIT."""
    return math.exp(x)


if numba is None:
    def inline(fn):
        return fn

    def function(fn):
        return fn

    def bits_as_float(i):
        bits = np.asarray(i)
        return bits.view(np.float32 if bits.itemsize == 4 else np.float64)[()]
else:
    inline = numba.njit(inline="always", **_JIT_FLAGS)
    # a jitted function that kernels call rather than inline: a body too large to copy into its caller
    function = numba.njit(**_JIT_FLAGS)

    def ir_loop(builder, name, end, step, carried, body):
        """The IR of `for at in range(0, end, step)` carrying values from one pass to the next:
        carried are their first values, body(at, values) makes the next ones (the builder in the
        loop's body). Returns their last values, the builder in the block after the loop. Every
        phi node heads its block, as LLVM's verifier wants."""
        i64 = ir.IntType(64)
        entry = builder.block
        head = builder.append_basic_block(f"{name}.head")
        inside = builder.append_basic_block(f"{name}.body")
        done = builder.append_basic_block(f"{name}.done")
        builder.branch(head)
        builder.position_at_end(head)
        at = builder.phi(i64)
        values = [builder.phi(v.type) for v in carried]
        at.add_incoming(ir.Constant(i64, 0), entry)
        for phi, v in zip(values, carried):
            phi.add_incoming(v, entry)
        builder.cbranch(builder.icmp_signed("<", at, end), inside, done)
        builder.position_at_end(inside)
        new = body(at, values)
        at.add_incoming(builder.add(at, ir.Constant(i64, step)), builder.block)
        for phi, v in zip(values, new):
            phi.add_incoming(v, builder.block)
        builder.branch(head)
        builder.position_at_end(done)
        return values

    @intrinsic
    def bits_as_float(typingctx, i):
        """Reinterpret the bits of an int32 as a float32, or of an int64 as a float64 (builds 2**k
        from its exponent bits). Numba's integer arithmetic widens to int64: a float32's bits are
        passed as np.int32(...)."""
        if i not in (types.int32, types.int64):
            return None
        out, ty = (types.float32, ir.FloatType()) if i == types.int32 else (types.float64, ir.DoubleType())

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ty)

        return out(i), codegen

    def _exp_f32(x):
        # exp(x) = 2**k * exp(r) with k = round(x / ln 2), |r| <= ln(2) / 2. Exact 0 below -87.3
        # (so exp(-inf) = 0); the kernels only ever pass x <= 0.
        xc = min(max(x, np.float32(-87.3)), np.float32(88.3))
        k = np.floor(xc * np.float32(1.4426950408889634) + np.float32(0.5))
        r = xc - k * np.float32(0.693359375) + k * np.float32(2.12194440e-4)
        p = np.float32(1.9875691500e-4)
        p = p * r + np.float32(1.3981999507e-3)
        p = p * r + np.float32(8.3334519073e-3)
        p = p * r + np.float32(4.1665795894e-2)
        p = p * r + np.float32(1.6666665459e-1)
        p = p * r + np.float32(5.0000001201e-1)
        p = p * (r * r) + r + np.float32(1.0)
        y = p * bits_as_float(np.int32((np.int32(k) + np.int32(127)) << 23))
        return y * np.float32(x >= np.float32(-87.3))  # a select, not a branch: keeps loops vectorised

    @overload(exp, inline="always")
    def _exp_overload(x):
        return _exp_f32 if x == types.float32 else (lambda x: math.exp(x))

    def _exp_f64(x):
        # exp(x) = 2**k * exp(r), k = round(x / ln 2), |r| <= ln(2) / 2 (ln 2 in two parts, the first
        # exact times any k here); exp(r) by its Taylor series to r**13 (the remainder is below
        # 1e-17 of it); 2**k as two factors, each a normal float64 down to the subnormal results.
        # x below -746 (-inf too) gives 0.
        xc = max(x, -746.0)
        k = np.floor(xc * 1.4426950408889634 + 0.5)
        r = (xc - k * 6.93147180369123816490e-01) - k * 1.90821492927058770002e-10
        p = 1.0 / 6227020800.0
        p = p * r + 1.0 / 479001600.0
        p = p * r + 1.0 / 39916800.0
        p = p * r + 1.0 / 3628800.0
        p = p * r + 1.0 / 362880.0
        p = p * r + 1.0 / 40320.0
        p = p * r + 1.0 / 5040.0
        p = p * r + 1.0 / 720.0
        p = p * r + 1.0 / 120.0
        p = p * r + 1.0 / 24.0
        p = p * r + 1.0 / 6.0
        p = p * r + 0.5
        p = p * r + 1.0
        p = p * r + 1.0
        ki = np.int64(k)
        half = ki >> 1
        return (p * bits_as_float((half + 1023) << 52)) * bits_as_float((ki - half + 1023) << 52)

    @overload(exp_nonpositive64, inline="always")
    def _exp_nonpositive64_overload(x):
        return _exp_f64


def lanes_max(x, n):
    """(max(x[0:c]), c) for the first c = n - n % 64 values of a contiguous float32 row in jitted
    code, (-inf, 0) elsewhere: the part of `row_max` that 16-lane vectors take."""
    return -np.inf, 0


if numba is not None:
    @intrinsic
    def _max_of_lanes(typingctx, x, c):
        """max(x[0:c]) of a contiguous float32 row, c a multiple of 64: four 16-lane running maxima,
        each lane kept unless the new value is greater (an ordered compare: a NaN never is), then
        folded the same way. LLVM does not vectorise the scalar form: without `nnan` a maximum is
        not a reduction it may reorder."""
        sig = types.float32(x, types.int64)

        def codegen(context, builder, signature, args):
            x_arr, c = args
            base = context.make_array(signature.args[0])(context, builder, x_arr).data
            f32 = ir.FloatType()
            v16 = ir.VectorType(f32, 16)
            i64 = ir.IntType(64)

            def greater(a, b):
                return builder.select(builder.fcmp_ordered(">", a, b), a, b)

            def vector(at):
                return builder.load(builder.bitcast(builder.gep(base, [at]), v16.as_pointer()), align=4)

            def step(at, acc):
                return [greater(vector(builder.add(at, ir.Constant(i64, 16 * k))), a) for k, a in enumerate(acc)]

            acc = ir_loop(builder, "max", c, 64, [ir.Constant(v16, [float("-inf")] * 16)] * 4, step)
            m = greater(greater(acc[0], acc[1]), greater(acc[2], acc[3]))
            out = builder.extract_element(m, ir.Constant(ir.IntType(32), 0))
            for lane in range(1, 16):
                out = greater(builder.extract_element(m, ir.Constant(ir.IntType(32), lane)), out)
            return out

        return sig, codegen

    @overload(lanes_max, inline="always")
    def _lanes_max_jit(x, n):
        if isinstance(x, types.Array) and x.ndim == 1 and x.dtype == types.float32 and x.layout == "C":
            def in_lanes(x, n):
                c = n // 64 * 64
                return _max_of_lanes(x, c), c
            return in_lanes
        return lambda x, n: (-np.inf, 0)


@inline
def row_max(x, n):
    """max(x[0:n]), -inf when n is 0. A NaN is skipped like the plain loop from -inf skips it; the
    exp of x - max then makes it NaN wherever it was. A contiguous float32 row goes 64 values a
    step in 16-lane vectors (`lanes_max`); the rest, and other rows, in eight running maxima, so
    that eight comparisons are in flight instead of one chain."""
    F = x.dtype.type
    first, c = lanes_max(x, n)
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = F(-np.inf)
    m7 = F(first)
    while c + 8 <= n:
        m0, m1, m2, m3 = max(m0, x[c]), max(m1, x[c + 1]), max(m2, x[c + 2]), max(m3, x[c + 3])
        m4, m5, m6, m7 = max(m4, x[c + 4]), max(m5, x[c + 5]), max(m6, x[c + 6]), max(m7, x[c + 7])
        c += 8
    m = max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))
    while c < n:
        m = max(m, x[c])
        c += 1
    return m


@inline
def exp_row(sc, last, n, m):
    """sc[j] = exp(sc[j] - m) in place for j < last, 0 for last <= j < n; returns their sum. m =
    -inf (no key left, or every score NaN) shifts by 0: the masked scores give 0, a NaN stays NaN."""
    F = sc.dtype.type
    total = F(0.0)
    if m == F(-np.inf):  # every key masked, or every score NaN: exp(s - 0) is 0, or NaN
        m = F(0.0)
    for j in range(last):
        p = exp(sc[j] - m)
        sc[j] = p
        total += p
    for j in range(last, n):
        sc[j] = F(0.0)
    return total
