"""Kernels with a serial twin (used on small inputs) give the same results through both paths."""

import numpy as np
import pytest

K = pytest.importorskip("fastformer.kernels.numba_kernels")


def test_every_twin_matches_its_parallel_kernel(monkeypatch):
    from fastformer.kernels import _resolve

    ops = _resolve("numba")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 9, 32)).astype(np.float32)  # 1152 elements: the serial path
    w, b = rng.normal(size=32).astype(np.float32), rng.normal(size=32).astype(np.float32)
    q = rng.normal(size=(2, 3, 5, 4)).astype(np.float32)
    kpm = np.zeros((2, 5), bool)
    kpm[1, 0] = True
    ids = rng.integers(0, 7, size=(3, 4))
    emb = rng.normal(size=(7, 32)).astype(np.float32)

    def run():
        return [ops.layernorm_forward(x, w, b)[0], ops.residual_layernorm_forward(x, x, w, b)[0][1],
                ops.gelu_forward(x, b)[0], ops.gelu_forward(x, b, approximate="none")[0],
                ops.attention_forward(q, q, q, True, kpm)[0], ops.embedding_forward(emb, ids)[0]]

    assert set(K._SERIAL) == {"_layernorm_fwd", "_residual_layernorm_fwd", "_gelu_fwd", "_embedding_fwd",
                              "_attention_fwd"}
    serial = run()
    monkeypatch.setattr(K, "SMALL_WORK", 0)  # every call takes the parallel kernel
    parallel = run()
    for a, p in zip(serial, parallel):
        np.testing.assert_allclose(a, p, rtol=1e-6, atol=1e-6)
