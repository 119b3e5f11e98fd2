"""TransformerLM: gradients against finite differences, masks, initial loss, memorisation, bad input."""

import math

import numpy as np
import pytest
from conftest import numerical_grad

import fastformer
from fastformer import LMConfig, TransformerLM
from fastformer.kernels.checks import aligned_zeros

TINY = dict(vocab_size=11, max_seq_len=8, d_model=8, n_heads=2, d_ff=12, n_layers=2)


def _batch(rng, B=2, T=5, V=11):
    ids = rng.integers(0, V, size=(B, T))
    targets = rng.integers(0, V, size=(B, T))
    targets[0, 1] = -100
    return ids, targets


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("positions", ["learned", "sinusoidal"])
def test_model_gradients_match_finite_differences(backend, tie, padded, positions):
    rng = np.random.default_rng(0)
    model = TransformerLM(LMConfig(**TINY, tie_embeddings=tie, positions=positions), seed=1, dtype=np.float64)
    # larger weights than the 0.02 init, so every path carries a gradient well above FD noise
    model.flat.data[:] = rng.normal(0, 0.3, size=model.flat.size)
    ids, targets = _batch(rng)
    mask = None
    if padded:
        mask = np.ones_like(ids)
        mask[1, :2] = 0  # left padding in row 1
        targets[1, :2] = -100
    loss, grads = model.loss_and_grads(ids, targets, attention_mask=mask)
    assert np.isfinite(loss)
    analytic = model.flat.grad.copy()
    numeric = numerical_grad(lambda: model.loss(ids, targets, attention_mask=mask), model.flat.data)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-8)
    assert set(grads) == set(model.state_dict())
    assert all(grads[n].shape == p.shape for n, p in model.state_dict().items())


def test_loss_and_grads_is_repeatable_and_overwrites_grads(backend):
    rng = np.random.default_rng(1)
    model = TransformerLM(LMConfig(**TINY), seed=0)
    ids, targets = _batch(rng)
    l1, _ = model.loss_and_grads(ids, targets)
    g1 = model.flat.grad.copy()
    l2, _ = model.loss_and_grads(ids, targets)
    assert l1 == l2
    np.testing.assert_array_equal(model.flat.grad, g1)  # overwritten, not accumulated


def test_calls_are_independent_and_forward_logits_are_the_callers(backend):
    """Shapes may change between calls, a call's results never depend on the calls before, and
    the arrays forward() returns are the caller's own: no later call writes over them."""
    rng = np.random.default_rng(3)
    model, fresh = TransformerLM(LMConfig(**TINY), seed=0), TransformerLM(LMConfig(**TINY), seed=0)
    ids, targets = _batch(rng)
    logits = model.forward(ids)
    kept = logits.copy()
    for B, T in ((2, 5), (3, 4), (2, 5)):
        ids, targets = _batch(rng, B, T)
        loss, _ = model.loss_and_grads(ids, targets)
        want_loss, _ = fresh.loss_and_grads(ids, targets)
        assert loss == want_loss
        np.testing.assert_array_equal(model.flat.grad, fresh.flat.grad)
        assert model.loss(ids, targets) == fresh.loss(ids, targets)
        assert model.forward(ids) is not model.forward(ids)
    np.testing.assert_array_equal(logits, kept)


def test_training_and_loss_never_make_the_logits(backend):
    """The LM head runs fused with the cross-entropy over row chunks: neither loss_and_grads nor
    loss allocates anything near the (B, T, V) logits (traced by tracemalloc, which sees NumPy's
    allocations), while forward() does return them."""
    import tracemalloc

    cfg = LMConfig(vocab_size=8192, max_seq_len=64, d_model=16, n_heads=2, d_ff=32, n_layers=1)
    model = TransformerLM(cfg, seed=0)
    ids, targets = _batch(np.random.default_rng(0), 32, 64, V=8192)
    logits_bytes = 32 * 64 * 8192 * 4  # 64 MiB in float32
    model.loss_and_grads(ids, targets)  # compiles, warms up

    def traced_peak(fn):
        tracemalloc.start()
        try:
            fn()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    assert traced_peak(lambda: model.forward(ids)) >= logits_bytes  # the tracer sees the logits when made
    for fn in (lambda: model.loss_and_grads(ids, targets), lambda: model.loss(ids, targets)):
        peak = traced_peak(fn)
        assert peak < logits_bytes / 3, f"{peak / 2**20:.1f} MiB traced"


def test_initial_loss_is_close_to_log_vocab(backend):
    V = 256
    model = TransformerLM(LMConfig(vocab_size=V, max_seq_len=32, d_model=32, n_heads=4, d_ff=64, n_layers=2))
    rng = np.random.default_rng(2)
    ids = rng.integers(0, V, size=(4, 32))
    loss = model.loss(ids, rng.integers(0, V, size=(4, 32)))
    assert abs(loss - math.log(V)) < 0.1


def test_tiny_model_memorises_a_batch_with_adamw(backend):
    model = TransformerLM(LMConfig(vocab_size=32, max_seq_len=16, d_model=32, n_heads=2, d_ff=64, n_layers=2))
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 32, size=(4, 16))
    targets = np.roll(ids, -1, axis=1)
    ops = fastformer.get_ops()
    m, v = np.zeros_like(model.flat.data), np.zeros_like(model.flat.data)
    for step in range(1, 301):
        loss, _ = model.loss_and_grads(ids, targets)
        ops.adamw_update(model.flat.data, model.flat.grad, m, v, lr=3e-3, weight_decay=0.0, step=step)
    assert loss < 0.05, loss


def test_attention_mask_isolates_padding(backend):
    """Padded keys get zero weight: a row's logits at real tokens do not depend on what its
    padding holds, and a row that is all padding gives finite logits."""
    model = TransformerLM(LMConfig(**TINY), seed=0)
    ids = np.array([[3, 4, 5, 6], [0, 0, 7, 8], [1, 2, 3, 4]])
    mask = np.array([[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0]])
    out = model.forward(ids, attention_mask=mask)
    ids2 = ids.copy()
    ids2[1, :2] = [9, 10]
    out2 = model.forward(ids2, attention_mask=mask)
    np.testing.assert_allclose(out[1, 2:], out2[1, 2:], rtol=1e-6, atol=1e-6)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[0], model.forward(ids[:1])[0], rtol=1e-6, atol=1e-6)


def test_causality(backend):
    model = TransformerLM(LMConfig(**TINY), seed=0)
    ids = np.array([[1, 2, 3, 4, 5]])
    changed = ids.copy()
    changed[0, 3] = 9
    a, b = model.forward(ids), model.forward(changed)
    np.testing.assert_allclose(a[0, :3], b[0, :3], rtol=1e-6, atol=1e-6)
    assert not np.allclose(a[0, 3:], b[0, 3:])


def test_one_dimensional_ids_give_two_dimensional_logits(backend):
    model = TransformerLM(LMConfig(**TINY), seed=0)
    ids = np.array([1, 2, 3])
    np.testing.assert_allclose(model.forward(ids), model.forward(ids[None])[0])


def test_parameter_names_and_shapes_follow_gpt2():
    model = TransformerLM(LMConfig(vocab_size=50, max_seq_len=16, d_model=8, n_heads=2, d_ff=32, n_layers=3,
                                   tie_embeddings=False))
    sd = model.state_dict()
    assert sd["transformer.wte.weight"].shape == (50, 8)
    assert sd["transformer.wpe.weight"].shape == (16, 8)
    assert sd["transformer.h.2.attn.c_attn.weight"].shape == (8, 24)
    assert sd["transformer.h.0.mlp.c_fc.weight"].shape == (8, 32)
    assert sd["transformer.h.0.mlp.c_proj.weight"].shape == (32, 8)
    assert sd["lm_head.weight"].shape == (50, 8)
    assert len(sd) == 2 + 12 * 3 + 2 + 1
    assert model.num_parameters() == sum(p.size for p in sd.values())
    # GPT-2 init: residual projections have std 0.02 / sqrt(2 L)
    proj = np.concatenate([sd[f"transformer.h.{i}.mlp.c_proj.weight"].ravel() for i in range(3)])
    assert abs(proj.std() - 0.02 / math.sqrt(6)) < 0.002
    assert abs(sd["transformer.h.0.mlp.c_fc.weight"].std() - 0.02) < 0.004
    tied = TransformerLM(LMConfig(**TINY))
    assert "lm_head.weight" not in tied.state_dict()


def test_state_dict_round_trip_and_errors():
    a = TransformerLM(LMConfig(**TINY), seed=0)
    b = TransformerLM(LMConfig(**TINY), seed=1)
    ids = np.array([[1, 2, 3]])
    assert not np.allclose(a.forward(ids), b.forward(ids))
    b.load_state_dict({k: v.copy() for k, v in a.state_dict().items()})
    np.testing.assert_array_equal(a.forward(ids), b.forward(ids))
    sd = {k: v.copy() for k, v in a.state_dict().items()}
    sd.pop("transformer.ln_f.bias")
    with pytest.raises(ValueError, match="missing keys.*ln_f.bias"):
        b.load_state_dict(sd)
    sd = {k: v.copy() for k, v in a.state_dict().items()}
    sd["lm_head.weight"] = np.zeros((11, 8), np.float32)
    with pytest.raises(ValueError, match="unexpected keys.*lm_head"):
        b.load_state_dict(sd)
    sd = {k: v.copy() for k, v in a.state_dict().items()}
    sd["transformer.wpe.weight"] = np.zeros((4, 8), np.float32)
    with pytest.raises(ValueError, match="wpe.weight.*shape"):
        b.load_state_dict(sd)


def test_dropout_is_seeded_and_off_in_inference():
    cfg = LMConfig(**{**TINY, "n_layers": 1}, dropout=0.5)
    ids = np.array([[1, 2, 3, 4]])
    a, b = TransformerLM(cfg, seed=3), TransformerLM(cfg, seed=3)
    assert a.loss_and_grads(ids, ids)[0] == b.loss_and_grads(ids, ids)[0]
    l1, l2 = a.loss_and_grads(ids, ids)[0], a.loss_and_grads(ids, ids)[0]
    assert l1 != l2  # a fresh mask every step
    np.testing.assert_array_equal(a.forward(ids), a.forward(ids))


@pytest.mark.parametrize("kwargs,match", [
    (dict(d_model=10, n_heads=3), "d_model=10 must be divisible by n_heads=3"),
    (dict(vocab_size=0), "vocab_size must be an integer >= 1, got 0"),
    (dict(n_layers=2.5), "n_layers must be an integer"),
    (dict(dropout=1.0), "dropout must be a number in \\[0, 1\\)"),
    (dict(tie_embeddings="yes"), "tie_embeddings must be True or False"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LMConfig(**{**TINY, **kwargs})


def test_unknown_config_field_lists_valid_fields():
    with pytest.raises(ValueError, match="unknown LMConfig field.*'d_modle'.*valid fields are.*d_model"):
        LMConfig.from_dict({**TINY, "d_modle": 8})


@pytest.mark.parametrize("ids,match", [
    (np.array([[1, 11]]), "ids must lie in \\[0, vocab_size=11\\), got 11"),
    (np.array([[-1, 2]]), "ids must lie in \\[0, vocab_size=11\\), got -1"),
    (np.zeros((1, 9), dtype=np.int64), "T=9 .* max_seq_len=8"),
    (np.array([[1.0, 2.0]]), "ids must be an integer array, got dtype float64"),
    (np.zeros((1, 2, 3), dtype=np.int64), "ids must have shape \\(B, T\\) or \\(T,\\)"),
])
def test_bad_ids(ids, match):
    model = TransformerLM(LMConfig(**TINY))
    with pytest.raises(ValueError, match=match):
        model.forward(ids)


def test_bad_targets_and_mask():
    model = TransformerLM(LMConfig(**TINY))
    ids = np.array([[1, 2, 3]])
    with pytest.raises(ValueError, match="targets must lie in \\[0, 11\\)"):
        model.loss_and_grads(ids, np.array([[1, 2, 11]]))
    with pytest.raises(ValueError, match="attention_mask must have the shape of its ids"):
        model.forward(ids, attention_mask=np.ones((1, 2)))
    with pytest.raises(ValueError, match="only 0 \\(padding\\) and 1"):
        model.forward(ids, attention_mask=np.array([[1, 2, 1]]))


def test_backend_selection_errors_and_context():
    with pytest.raises(ValueError, match="unknown fastformer backend 'cuda': valid values are auto, numpy, numba"):
        fastformer.set_backend("cuda")
    before = fastformer.get_backend()
    with fastformer.use_backend("numpy"):
        assert fastformer.get_backend() == "numpy"
    assert fastformer.get_backend() == before


@pytest.mark.parametrize("shape, dtype", [((7,), np.float32), ((3, 5), np.float64), ((0,), np.float32)])
def test_aligned_zeros(shape, dtype):
    a = aligned_zeros(shape, dtype)
    assert a.shape == shape and a.dtype == dtype and a.flags.c_contiguous and a.flags.writeable
    assert (a.size == 0 or a.ctypes.data % 64 == 0) and not a.any()  # an empty array has no first element


def test_parameter_gradient_and_cache_buffers_start_on_a_cache_line():
    m = TransformerLM(LMConfig(vocab_size=11, d_model=12, n_heads=3, d_ff=5, n_layers=1), seed=0)
    cache = m.init_state(2)
    for a in (m.flat.data, m.flat.grad, cache.k, cache.v):
        assert a.ctypes.data % 64 == 0
