import os
import shutil

import numpy as np
import pytest

import fastformer
from fastformer.kernels import _resolve


def _available_backends():
    names = ["numpy"]
    try:
        import numba  # noqa: F401
        names.append("numba")
    except ImportError:
        pass
    return names


BACKENDS = _available_backends()
FAST_BACKENDS = [b for b in BACKENDS if b != "numpy"]  # what the tests compare with the reference
_NO_FAST_BACKEND = pytest.param("numba", marks=pytest.mark.skip(
    reason="numba is not installed: no backend to compare with the NumPy reference"))


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Run the test once per available backend, with that backend selected."""
    with fastformer.use_backend(request.param):
        yield request.param


@pytest.fixture
def ops(backend):
    return fastformer.get_ops()


@pytest.fixture(params=FAST_BACKENDS or [_NO_FAST_BACKEND])
def fast_ops(request):
    """The kernels of each backend other than the NumPy reference, that backend selected: the side
    a test compares with `ref` (the reference against itself would prove nothing)."""
    with fastformer.use_backend(request.param) as ops:
        assert ops.name == request.param != "numpy"
        yield ops


@pytest.fixture
def ref():
    """The NumPy reference kernels, whatever backend is selected."""
    return _resolve("numpy")


def trained_run(directory, config, text):
    """`directory` holding a run trained to its config's max_steps, its lock released: train it once
    per module (a module-scoped fixture) and give each test a copy (copy_run)."""
    from fastformer.training.trainer import Trainer

    trainer = Trainer(config, directory, text=text, verbose=False)
    trainer.train()
    trainer.close()
    return directory


def copy_run(run, tmp_path):
    """A fresh copy of the run directory `run`, for one test to edit."""
    dst = str(tmp_path / "run")
    shutil.copytree(run, dst)
    return dst


def numerical_grad(f, x, eps=1e-6):
    """Central finite differences of the scalar f() with respect to every entry of x (float64)."""
    g = np.zeros_like(x)
    flat, gflat = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        fp = f()
        flat[i] = old - eps
        fm = f()
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * eps)
    return g


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the tests marked slow (the many-trial fault "
                                                         "suites)")


NUMPY_ONLY = "FASTFORMER_TEST_NUMPY_ONLY"  # =1: run without Numba, every comparison with the reference skipped


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: many-trial tests, run only with --slow")
    if "numba" not in BACKENDS and os.environ.get(NUMPY_ONLY) != "1":
        raise pytest.UsageError(f"numba is not installed, so no kernel can be compared with the NumPy reference: "
                                f"install it (pip install -e .), or set {NUMPY_ONLY}=1 to run the NumPy-only suite")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="a many-trial test: run it with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiled(monkeypatch):
    """Attention on BLAS tiles (kernels/ops/attention_tiled.py) from the first query row, in
    blocks of 3 rows and keys, so that small cases cross block edges, the causal diagonal inside
    a block, and padding in a block of their own."""
    from fastformer.kernels.ops import attention, attention_tiled

    monkeypatch.setattr(attention, "ATTENTION_TILED_FROM", 1)
    monkeypatch.setattr(attention, "_on_tiles", lambda *arrays: False)  # not the register tiles either
    monkeypatch.setattr(attention_tiled, "ATTENTION_BLOCK", 3)
