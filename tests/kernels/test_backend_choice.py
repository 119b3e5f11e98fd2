"""Which backend `get_ops()` gives: "auto" is the Numba backend when numba imports and the NumPy
reference when it does not; asking for "numba" without it is a clear error."""

import os
import subprocess
import sys

import pytest

import fastformer

# a fresh interpreter in which `import numba` fails, as if numba were not installed
HIDE_NUMBA = "import sys; sys.modules['numba'] = None\n"


def run(code, backend):
    env = {k: v for k, v in os.environ.items() if k != fastformer.kernels.ENV_VAR}
    if backend is not None:
        env[fastformer.kernels.ENV_VAR] = backend
    r = subprocess.run([sys.executable, "-c", HIDE_NUMBA + code], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.split()


@pytest.mark.parametrize("backend", [None, "auto"])
def test_auto_falls_back_to_numpy_without_numba(backend):
    code = "import fastformer, numpy as np; ops = fastformer.get_ops()\n" \
           "print(ops.name, fastformer.get_backend(), ops.softmax_forward(np.zeros((1, 2)))[0].sum())"
    assert run(code, backend) == ["numpy", "numpy", "1.0"]


def test_numba_without_numba_is_a_clear_error():
    code = """
import fastformer
try:
    fastformer.set_backend("numba")
except ValueError as e:
    print("refused" if "backend 'numba' is not available" in str(e) and "install numba" in str(e) else e)
"""
    assert run(code, None) == ["refused"]


def test_auto_is_numba_when_it_imports():
    pytest.importorskip("numba")
    with fastformer.use_backend("auto") as ops:
        assert ops.name == "numba"


def test_every_op_module_imports_and_references_run_without_numba():
    code = """
import pkgutil, importlib, numpy as np, fastformer.kernels.ops as ops_pkg
for m in pkgutil.iter_modules(ops_pkg.__path__):
    importlib.import_module("fastformer.kernels.ops." + m.name)
from fastformer.kernels import _resolve
ops = _resolve("numpy")
x = np.ones((2, 3), np.float32)
print(ops.name, float(ops.layernorm_forward(x, np.ones(3, np.float32), np.zeros(3, np.float32))[0].sum()))
"""
    assert run(code, None) == ["numpy", "0.0"]


@pytest.mark.parametrize("opt_out, status", [(None, 4), ("1", 0)])
def test_the_suite_fails_without_numba_unless_told(opt_out, status):
    """Without Numba every comparison with the reference would skip and the suite would pass
    proving nothing: it refuses to run, unless FASTFORMER_TEST_NUMPY_ONLY=1 asks for the
    NumPy-only suite."""
    env = {k: v for k, v in os.environ.items() if k != "FASTFORMER_TEST_NUMPY_ONLY"}
    if opt_out:
        env["FASTFORMER_TEST_NUMPY_ONLY"] = opt_out
    code = HIDE_NUMBA + "import pytest; sys.exit(pytest.main(['--co', '-q', '-p', 'no:cacheprovider', %r]))" % __file__
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert r.returncode == status, r.stdout[-2000:] + r.stderr[-2000:]
    if status:
        assert "numba is not installed" in r.stderr + r.stdout
