"""Optimizers, learning-rate schedules and gradient clipping on the flat parameter buffer.

Every optimizer updates `FlatParams.data` from `FlatParams.grad` with whole-buffer array
operations, and keeps its state as flat arrays of the same layout (so it saves to safetensors
as-is and a data-parallel run can shard or reduce it). Weight decay touches only the decayed
slice `data[:n_decay]` -- the 2-D weight matrices -- never biases, LayerNorm or position
embeddings. AdamW (and Adam, which is AdamW without decoupled decay) go through the kernel
interface's `adamw_update`.
"""

import math

import numpy as np

from fastformer.errors import FastformerError, check_bool, check_number
from fastformer.kernels import get_ops
from fastformer.kernels.checks import aligned_zeros

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "linear")


class SGD:
    """SGD with momentum, as torch.optim.SGD (dampening 0):
    g += wd * p (decayed slice only); buf = momentum * buf + g; p -= lr * buf."""

    def __init__(self, flat, momentum=0.9, weight_decay=0.0, nesterov=False):
        check_number("momentum", momentum, low=0, high=1, high_open=True)
        check_number("weight_decay", weight_decay, low=0, finite=True)
        check_bool("nesterov", nesterov)
        self.flat, self.momentum, self.weight_decay, self.nesterov = flat, momentum, weight_decay, nesterov
        self.buf = aligned_zeros(flat.data.shape, flat.dtype)  # momentum buffer, the layout of flat.data
        self.t = 0

    def step(self, lr):
        p, g, nd = self.flat.data, self.flat.grad, self.flat.n_decay
        self.t += 1
        if self.weight_decay:
            g = g.copy()
            g[:nd] += self.weight_decay * p[:nd]
        self.buf *= self.momentum
        self.buf += g
        update = g + self.momentum * self.buf if self.nesterov else self.buf
        p -= p.dtype.type(lr) * update

    def state_dict(self):
        return {"momentum_buffer": self.buf, "t": np.array([self.t], dtype=np.int64)}

    def load_state_dict(self, state):
        _check_state(self, state, ("momentum_buffer",))
        self.buf[...] = state["momentum_buffer"]
        self.t = int(state["t"][0])


class AdamW:
    """AdamW as torch.optim.AdamW, with decoupled weight decay on the decayed slice only.

    With `decoupled=False` it is torch.optim.Adam: the decay is added to the gradient
    (g += wd * p, decayed slice only) before the moments, i.e. L2 regularisation.
    """

    def __init__(self, flat, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True):
        check_number("beta1", beta1, low=0, high=1, high_open=True)
        check_number("beta2", beta2, low=0, high=1, high_open=True)
        check_number("eps", eps, low=0, finite=True)
        check_number("weight_decay", weight_decay, low=0, finite=True)
        check_bool("decoupled", decoupled)
        self.flat, self.beta1, self.beta2, self.eps = flat, beta1, beta2, eps
        self.weight_decay, self.decoupled = weight_decay, decoupled
        self.m = aligned_zeros(flat.data.shape, flat.dtype)  # first moment, the layout of flat.data
        self.v = aligned_zeros(flat.data.shape, flat.dtype)  # second moment
        self.t = 0

    def step(self, lr):
        ops, p, g, nd = get_ops(), self.flat.data, self.flat.grad, self.flat.n_decay
        self.t += 1
        wd = self.weight_decay
        if wd and not self.decoupled:
            g = g.copy()
            g[:nd] += wd * p[:nd]
        kw = dict(lr=lr, beta1=self.beta1, beta2=self.beta2, eps=self.eps, step=self.t)
        decoupled_wd = wd if self.decoupled else 0.0
        ops.adamw_update(p[:nd], g[:nd], self.m[:nd], self.v[:nd], weight_decay=decoupled_wd, **kw)
        ops.adamw_update(p[nd:], g[nd:], self.m[nd:], self.v[nd:], weight_decay=0.0, **kw)

    def state_dict(self):
        return {"exp_avg": self.m, "exp_avg_sq": self.v, "t": np.array([self.t], dtype=np.int64)}

    def load_state_dict(self, state):
        _check_state(self, state, ("exp_avg", "exp_avg_sq"))
        self.m[...] = state["exp_avg"]
        self.v[...] = state["exp_avg_sq"]
        self.t = int(state["t"][0])


def _check_state(opt, state, names):
    expected = set(names) | {"t"}
    if set(state) != expected:
        raise FastformerError(f"{type(opt).__name__} state has keys {sorted(state)}, expected {sorted(expected)}")
    for n in names:
        if state[n].shape != opt.flat.data.shape:
            raise FastformerError(f"{type(opt).__name__} state {n!r} has shape {state[n].shape}, "
                                  f"the model's flat buffer is {opt.flat.data.shape}")
    t = np.asarray(state["t"])
    if t.shape != (1,) or t.dtype.kind not in "iu" or t[0] < 0:
        raise FastformerError(f"{type(opt).__name__} state 't' (the step counter) must hold one integer >= 0, got "
                              f"shape {t.shape} of {t.dtype}")


def make_optimizer(flat, train):
    """The optimizer named by `train.optimizer` ("sgd", "adam" or "adamw") with the settings
    of the TrainConfig `train`, for the FlatParams `flat`."""
    if train.optimizer == "sgd":
        return SGD(flat, momentum=train.momentum, weight_decay=train.weight_decay)
    if train.optimizer in ("adam", "adamw"):
        return AdamW(flat, beta1=train.beta1, beta2=train.beta2, eps=train.eps,
                     weight_decay=train.weight_decay, decoupled=train.optimizer == "adamw")
    raise FastformerError(f"unknown optimizer {train.optimizer!r}: valid values are {', '.join(OPTIMIZERS)}")


def learning_rate(step, *, lr, schedule="constant", warmup_steps=0, max_steps=1, min_lr=0.0):
    """The learning rate for update number `step` (counting from 0).

    Linear warm-up from lr / warmup_steps to lr over the first `warmup_steps` updates, then
    "constant" (lr), "cosine" or "linear" decay from lr to min_lr at step max_steps.
    """
    if schedule not in SCHEDULES:
        raise FastformerError(f"unknown schedule {schedule!r}: valid values are {', '.join(SCHEDULES)}")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    if schedule == "cosine":
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
    return lr - progress * (lr - min_lr)


def clip_grad_norm(grad, max_norm):
    """Scale `grad` in place so its global L2 norm is at most max_norm (0 or None: no clipping),
    as torch.nn.utils.clip_grad_norm_. Returns the norm before clipping (a float, maybe inf/nan)."""
    norm = float(np.sqrt(np.dot(grad, grad)))
    if max_norm and norm > max_norm:
        grad *= grad.dtype.type(max_norm / (norm + 1e-6))
    return norm
