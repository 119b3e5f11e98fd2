"""The whole language model gives the same loss and gradients on every backend."""

import numpy as np
import pytest

import fastformer
from fastformer import LMConfig, TransformerLM

# float32: the kernels round differently (sum order, exp polynomial); grads are O(1e-2)
TOL = {np.float64: dict(rtol=1e-9, atol=1e-12), np.float32: dict(rtol=1e-4, atol=1e-6)}


def loss_and_grads(backend, cfg, dtype, ids, targets, mask):
    with fastformer.use_backend(backend):
        model = TransformerLM(cfg, seed=3, dtype=dtype)
        loss, grads = model.loss_and_grads(ids, targets, attention_mask=mask)
        logits = model.forward(ids, attention_mask=mask)
        return loss, {n: g.copy() for n, g in grads.items()}, logits


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("d_model,n_heads,tie", [(16, 2, True), (8, 8, False)])  # head size 8, and 1
def test_loss_and_grads_match_across_backends(dtype, d_model, n_heads, tie):
    cfg = LMConfig(vocab_size=37, max_seq_len=12, d_model=d_model, n_heads=n_heads, d_ff=24,
                   n_layers=2, tie_embeddings=tie)
    rng = np.random.default_rng(0)
    B, T = 3, 9
    ids = rng.integers(0, 37, size=(B, T))
    targets = rng.integers(0, 37, size=(B, T))
    mask = np.ones((B, T), dtype=np.int64)
    mask[1, :3] = 0  # left padding
    targets[1, :3] = -100
    pytest.importorskip("numba")
    want = loss_and_grads("numpy", cfg, dtype, ids, targets, mask)
    for backend in ("numba",):
        got = loss_and_grads(backend, cfg, dtype, ids, targets, mask)
        np.testing.assert_allclose(got[0], want[0], **TOL[dtype])
        for name, g in want[1].items():
            assert np.isfinite(got[1][name]).all(), name
            np.testing.assert_allclose(got[1][name], g, err_msg=name, **TOL[dtype])
        np.testing.assert_allclose(got[2], want[2], **TOL[dtype])
