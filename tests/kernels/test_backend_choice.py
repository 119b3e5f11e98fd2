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
