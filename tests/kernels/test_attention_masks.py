"""Attention masks: probabilities read off through an identity value matrix."""

import numpy as np
import pytest


def _probs(ops, T, S, causal, kpm, seed=0):
    """With v = I (S x S, so hs = S) the attention output is the probability matrix itself."""
    rng = np.random.default_rng(seed)
    B, H = (kpm.shape[0] if kpm is not None else 2), 2
    q, k = rng.normal(size=(B, H, T, S)), rng.normal(size=(B, H, S, S))
    v = np.broadcast_to(np.eye(S), (B, H, S, S)).copy()
    out, _ = ops.attention_forward(q, k, v, causal=causal, key_padding_mask=kpm)
    return out


@pytest.mark.parametrize("T,S", [(5, 5), (2, 6)])
def test_causal_rows_sum_to_one_and_future_keys_get_zero(ops, T, S):
    p = _probs(ops, T, S, causal=True, kpm=None)
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-12)
    future = ~np.tril(np.ones((T, S), bool), k=S - T)  # query i sits at position S - T + i
    assert (p[..., future] == 0.0).all()
    assert (p[..., ~future] > 0.0).all()


def test_padded_keys_get_exactly_zero_weight(ops):
    kpm = np.array([[False, False, True, True, False], [True, False, False, False, False]])
    p = _probs(ops, 5, 5, causal=False, kpm=kpm)
    assert (p[0, :, :, 2:4] == 0).all() and (p[1, :, :, 0] == 0).all()
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-12)


def test_fully_masked_rows_give_zeros_not_nan(ops):
    kpm = np.array([[True, True, True, False], [True, True, True, True]])
    p = _probs(ops, 4, 4, causal=True, kpm=kpm)
    assert not np.isnan(p).any()
    assert (p[0, :, :3] == 0).all()  # causal + left padding: the first 3 queries see nothing
    np.testing.assert_allclose(p[0, :, 3].sum(-1), 1.0)
    assert (p[1] == 0).all()
    rng = np.random.default_rng(1)
    q = rng.normal(size=(2, 1, 4, 3))
    out, cache = ops.attention_forward(q, q, q, causal=True, key_padding_mask=kpm)
    grads = ops.attention_backward(np.ones_like(out), cache)
    assert all(np.isfinite(g).all() for g in grads)
    assert (grads[0][1] == 0).all()


def test_attention_shape_errors(ops):
    q = np.zeros((1, 2, 3, 4))
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        ops.attention_forward(q, q, q, key_padding_mask=np.zeros((1, 4), bool))
    with pytest.raises(ValueError, match="attention expects q"):
        ops.attention_forward(q, q[..., :2], q)
    with pytest.raises(ValueError, match="causal attention needs at least as many keys"):
        ops.attention_forward(q, q[:, :, :2], q[:, :, :2], causal=True)


def test_softmax_masked_and_all_masked_rows(ops):
    x = np.array([[0.0, -np.inf, 1.0], [-np.inf, -np.inf, -np.inf]])
    y, _ = ops.softmax_forward(x)
    assert y[0, 1] == 0.0 and abs(y[0].sum() - 1) < 1e-12
    assert (y[1] == 0).all()


def test_kernels_refuse_wrong_dtypes(ops):
    with pytest.raises(ValueError, match="x must be a float32 or float64 array, got dtype int64"):
        ops.softmax_forward(np.arange(3))
    with pytest.raises(ValueError, match="targets must be an integer array"):
        ops.cross_entropy_forward(np.zeros((2, 3)), np.zeros(2))
    with pytest.raises(ValueError, match="approximate must be one of"):
        ops.gelu_forward(np.zeros(3), approximate="sigmoid")
