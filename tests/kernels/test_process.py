"""The process settings of process.py (threads, allocator, BLAS spin): the short OpenBLAS spin keeps BLAS working."""

import ctypes
import json
import os
import subprocess
import sys

import pytest

threadpoolctl = pytest.importorskip("threadpoolctl")

from fastformer.kernels import process  # noqa: E402


def _pthreads_openblas():
    return [d for d in threadpoolctl.threadpool_info()
            if d.get("internal_api") == "openblas" and d.get("threading_layer") == "pthreads"]


def test_a_timeout_the_user_set_is_left_alone(monkeypatch):
    monkeypatch.setenv("OPENBLAS_THREAD_TIMEOUT", "25")
    assert process.shorten_blas_spin() is False
    assert os.environ["OPENBLAS_THREAD_TIMEOUT"] == "25"


@pytest.mark.skipif(not _pthreads_openblas(), reason="NumPy's BLAS is not a pthreads OpenBLAS")
def test_short_spin_is_applied_and_blas_still_works():
    # in a child process: the policy is per process and must not leak into this one
    code = """
import ctypes, numpy as np, threadpoolctl
from fastformer.kernels import process
rng = np.random.default_rng(0)
a, b = rng.standard_normal((300, 200)), rng.standard_normal((200, 100))
before = a @ b
n = [d["num_threads"] for d in threadpoolctl.threadpool_info() if d.get("internal_api") == "openblas"]
assert process.shorten_blas_spin(16)
path = [d["filepath"] for d in threadpoolctl.threadpool_info() if d.get("internal_api") == "openblas"][0]
assert ctypes.CDLL(path).openblas_thread_timeout() == 16
assert np.allclose(a @ b, before, rtol=1e-12, atol=1e-12)
assert [d["num_threads"] for d in threadpoolctl.threadpool_info() if d.get("internal_api") == "openblas"] == n
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_cpu_vector_isa_names_the_widest_extension(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse4_2 avx avx2 fma\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: real_open(cpuinfo if p == "/proc/cpuinfo" else p, *a, **k))
    assert process.cpu_vector_isa() == "AVX2"
    cpuinfo.write_text("flags\t\t: avx2 avx512f\n")
    assert process.cpu_vector_isa() == "AVX-512"
    cpuinfo.write_text("model name\t: something without flags\n")
    assert process.cpu_vector_isa() is None


@pytest.mark.parametrize("preset_env, preload, layer, at_start", [
    # OpenMP where it loads; its workers told to spin briefly, then sleep, while the runtime loads
    ({}, False, ("omp", "workqueue"), ["passive", str(process.OMP_SPINS)]),
    ({}, True, ("omp",), ["passive", str(process.OMP_SPINS)]),  # another library's runtime is loaded: still OpenMP
    ({"NUMBA_THREADING_LAYER": "workqueue"}, False, ("workqueue",), [None, None]),  # the user's choice stands
    ({"OMP_WAIT_POLICY": "active"}, False, ("omp", "workqueue"), ["active", None]),  # and the user's policy
    ({"GOMP_SPINCOUNT": "0"}, False, ("omp", "workqueue"), [None, "0"]),
])
def test_threading_layer_choice(preset_env, preload, layer, at_start):
    pytest.importorskip("numba")
    code = f"""
import ctypes, json, os, numpy as np, numba
if {preload}:
    ctypes.CDLL("libgomp.so.1")
import fastformer
from fastformer.kernels import process
assert process.openmp_already_loaded() == {preload}
seen, start = [], numba.set_num_threads
def wait_settings():
    return [os.environ.get("OMP_WAIT_POLICY"), os.environ.get("GOMP_SPINCOUNT")]
def set_num_threads(n):  # what the runtime reads as it loads
    seen.append(wait_settings())
    return start(n)
numba.set_num_threads = set_num_threads
fastformer.set_backend("numba")
fastformer.get_ops().softmax_forward(np.ones((512, 512), np.float32))  # a parallel launch
print(json.dumps([numba.threading_layer(), seen[0], wait_settings()]))
"""
    if preload:
        try:
            ctypes.CDLL("libgomp.so.1")
        except OSError:
            pytest.skip("no libgomp.so.1 on this machine")
    unset = ("NUMBA_THREADING_LAYER", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env.update(preset_env, FASTFORMER_BACKEND="numba")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    got_layer, got_at_start, got_after = json.loads(out.stdout.splitlines()[-1])
    assert got_layer in layer
    assert got_at_start == at_start
    # fastformer's settings are not left in the environment, the user's are
    assert got_after == [preset_env.get("OMP_WAIT_POLICY"), preset_env.get("GOMP_SPINCOUNT")]


def test_numpy_backend_applies_the_thread_count_to_blas_without_starting_numba():
    code = """
import sys, threadpoolctl
import fastformer
fastformer.get_ops()
from fastformer.kernels import process
blas = {d["num_threads"] for d in threadpoolctl.threadpool_info() if d.get("user_api") == "blas"}
pool = sys.modules.get("numba.np.ufunc.parallel")  # Numba's thread pool, when anything imported it
print(process.applied_threads(), sorted(blas), bool(pool and pool._is_initialized))
"""
    env = dict(os.environ, FASTFORMER_NUM_THREADS="1", FASTFORMER_BACKEND="numpy")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1", "[1]", "False"]


def test_importing_fastformer_applies_no_process_setting():
    # every module of the package imported, no backend asked for: threads, allocator and BLAS spin untouched
    code = """
import os, pkgutil, importlib, sys
import fastformer
for m in pkgutil.walk_packages(fastformer.__path__, "fastformer."):
    if not m.name.endswith("__main__"):
        importlib.import_module(m.name)
from fastformer.kernels import process
pool = sys.modules.get("numba.np.ufunc.parallel")
print(process.applied_threads(), os.environ.get("OPENBLAS_THREAD_TIMEOUT"), bool(pool and pool._is_initialized))
fastformer.get_ops()
print(process.applied_threads())
"""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    env["FASTFORMER_NUM_THREADS"] = "1"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "None", "False", "1"]


def test_numba_kernels_from_two_threads_after_torch():
    """torch loads an OpenMP runtime of its own; Numba's layer must stay a thread-safe one (not
    workqueue, which aborts the process when two threads launch parallel kernels at once)."""
    pytest.importorskip("numba")
    pytest.importorskip("torch")
    code = """
import threading, numpy as np, torch, numba
import fastformer
fastformer.set_backend("numba")
ops = fastformer.get_ops()
x = np.ones((256, 512), np.float32)
ops.softmax_forward(x)
def work():
    for _ in range(200):
        ops.softmax_forward(x)
threads = [threading.Thread(target=work) for _ in range(2)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(numba.threading_layer())
"""
    unset = ("NUMBA_THREADING_LAYER", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env.update(FASTFORMER_BACKEND="numba", FASTFORMER_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() in (["omp"], ["tbb"])
