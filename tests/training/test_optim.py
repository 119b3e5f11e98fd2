"""Optimizers against torch.optim (same decay / no-decay groups), schedules and clipping."""

import math

import numpy as np
import pytest

from fastformer.errors import FastformerError
from fastformer.nn.params import FlatParams
from fastformer.training.optim import SGD, AdamW, clip_grad_norm, learning_rate

SHAPES = {"wpe": (5, 2), "w1": (4, 3), "b1": (3,), "ln": (3,), "w2": (3, 6)}
DECAY = {"w1", "w2"}  # 2-D weights; wpe is 2-D but, like the model's position embedding, not decayed


def make_flat(seed=0):
    flat = FlatParams(SHAPES, DECAY)
    flat.data[...] = np.random.default_rng(seed).normal(size=flat.size)
    return flat


def grad_sequence(n_steps, size, seed=1):
    return np.random.default_rng(seed).normal(size=(n_steps, size)).astype(np.float32)


def run_ours(opt_factory, lrs, grads):
    flat = make_flat()
    opt = opt_factory(flat)
    for lr, g in zip(lrs, grads):
        flat.grad[...] = g
        opt.step(lr)
    return flat


def run_torch(torch_cls, lrs, grads, weight_decay, **kw):
    import torch

    flat = make_flat()
    tparams = {n: torch.tensor(p.copy(), requires_grad=True) for n, p in flat.params.items()}
    groups = [{"params": [tparams[n] for n in SHAPES if n in DECAY], "weight_decay": weight_decay},
              {"params": [tparams[n] for n in SHAPES if n not in DECAY], "weight_decay": 0.0}]
    opt = torch_cls(groups, lr=lrs[0], **kw)
    for lr, g in zip(lrs, grads):
        flat.grad[...] = g
        for n, p in tparams.items():
            p.grad = torch.tensor(flat.grads[n].copy())
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
    return {n: p.detach().numpy() for n, p in tparams.items()}


LRS = [0.01, 0.03, 0.02, 0.05, 0.01, 0.02]


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
def test_optimizers_match_torch(kind):
    torch = pytest.importorskip("torch")
    wd = 0.1
    grads = grad_sequence(len(LRS), make_flat().size)
    if kind == "sgd":
        ours = run_ours(lambda f: SGD(f, momentum=0.9, weight_decay=wd), LRS, grads)
        ref = run_torch(torch.optim.SGD, LRS, grads, wd, momentum=0.9)
    elif kind == "adam":
        ours = run_ours(lambda f: AdamW(f, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=wd, decoupled=False),
                        LRS, grads)
        ref = run_torch(torch.optim.Adam, LRS, grads, wd, betas=(0.9, 0.99), eps=1e-8)
    else:
        ours = run_ours(lambda f: AdamW(f, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=wd), LRS, grads)
        ref = run_torch(torch.optim.AdamW, LRS, grads, wd, betas=(0.9, 0.99), eps=1e-8)
    for n in SHAPES:
        np.testing.assert_allclose(ours.params[n], ref[n], rtol=1e-5, atol=1e-6, err_msg=n)


def test_adamw_decays_only_2d_weights():
    flat = make_flat()
    before = {n: p.copy() for n, p in flat.params.items()}
    opt = AdamW(flat, weight_decay=0.5)
    flat.grad[...] = 0.0  # zero gradient: only the decoupled decay can move a parameter
    opt.step(lr=0.1)
    for n in SHAPES:
        if n in DECAY:
            np.testing.assert_allclose(flat.params[n], before[n] * (1 - 0.1 * 0.5), rtol=1e-6)
        else:
            np.testing.assert_array_equal(flat.params[n], before[n])


def test_optimizer_state_round_trip():
    grads = grad_sequence(4, make_flat().size)
    a = run_ours(lambda f: AdamW(f, weight_decay=0.1), LRS[:4], grads)
    # two steps, save state, new optimizer, load, two more steps
    flat = make_flat()
    opt = AdamW(flat, weight_decay=0.1)
    for lr, g in zip(LRS[:2], grads[:2]):
        flat.grad[...] = g
        opt.step(lr)
    state = {k: v.copy() for k, v in opt.state_dict().items()}
    opt2 = AdamW(flat, weight_decay=0.1)
    opt2.load_state_dict(state)
    assert opt2.t == 2
    for lr, g in zip(LRS[2:4], grads[2:4]):
        flat.grad[...] = g
        opt2.step(lr)
    np.testing.assert_array_equal(flat.data, a.data)


def test_optimizer_state_wrong_shape_is_rejected():
    opt = SGD(make_flat())
    with pytest.raises(FastformerError, match="momentum_buffer"):
        opt.load_state_dict({"momentum_buffer": np.zeros(3, np.float32), "t": np.array([1])})


def test_optimizer_settings_are_checked():
    with pytest.raises(FastformerError, match=r"momentum must be a number in \[0, 1\), got 1.5"):
        SGD(make_flat(), momentum=1.5)
    with pytest.raises(FastformerError, match="beta1 must be a number"):
        AdamW(make_flat(), beta1=-0.1)
    with pytest.raises(FastformerError, match="decoupled must be True or False, got 'yes'"):
        AdamW(make_flat(), decoupled="yes")


def test_schedules():
    kw = dict(lr=1.0, warmup_steps=10, max_steps=110, min_lr=0.1)
    assert learning_rate(0, schedule="cosine", **kw) == pytest.approx(0.1)
    assert learning_rate(4, schedule="cosine", **kw) == pytest.approx(0.5)
    assert learning_rate(10, schedule="cosine", **kw) == pytest.approx(1.0)
    assert learning_rate(60, schedule="cosine", **kw) == pytest.approx(0.55)  # half-way: mean of lr and min_lr
    assert learning_rate(110, schedule="cosine", **kw) == pytest.approx(0.1)
    assert learning_rate(500, schedule="cosine", **kw) == pytest.approx(0.1)  # stays at min_lr after the end
    assert learning_rate(35, schedule="linear", **kw) == pytest.approx(1.0 - 0.25 * 0.9)
    assert learning_rate(110, schedule="linear", **kw) == pytest.approx(0.1)
    assert learning_rate(80, schedule="constant", **kw) == 1.0
    assert learning_rate(0, schedule="constant", lr=0.3) == 0.3
    cos = [learning_rate(s, schedule="cosine", **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(cos, cos[1:]))
    with pytest.raises(FastformerError, match="valid values are constant, cosine, linear"):
        learning_rate(0, schedule="step", lr=1.0)


def test_clip_grad_norm_matches_torch_and_bounds_the_norm():
    g = np.random.default_rng(2).normal(size=1000).astype(np.float32) * 3
    norm0 = float(np.linalg.norm(g.astype(np.float64)))
    g1 = g.copy()
    assert clip_grad_norm(g1, 1.0) == pytest.approx(norm0, rel=1e-5)
    assert float(np.linalg.norm(g1)) == pytest.approx(1.0, rel=1e-4)
    g2 = g.copy()
    clip_grad_norm(g2, 1e9)  # below the limit: untouched
    np.testing.assert_array_equal(g2, g)
    g3 = g.copy()
    clip_grad_norm(g3, 0.0)  # 0 turns clipping off
    np.testing.assert_array_equal(g3, g)
    torch = pytest.importorskip("torch")
    t = torch.tensor(g.copy())
    t.grad = t.clone()
    torch.nn.utils.clip_grad_norm_([t], 1.0)
    np.testing.assert_allclose(g1, t.grad.numpy(), rtol=1e-5, atol=1e-7)


def test_clip_reports_non_finite_norm():
    g = np.array([1.0, np.nan], dtype=np.float32)
    assert math.isnan(clip_grad_norm(g, 1.0))
