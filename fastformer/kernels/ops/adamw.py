"""AdamW, one step in place on a parameter buffer and its two moments, as torch.optim.AdamW. The
checks, the NumPy reference, the Numba kernel. The trainer calls it once per step on the whole
flat parameter buffer (two slices: decayed and not).
"""

import math

import numpy as np

from fastformer.errors import FastformerError, check_int, check_number
from fastformer.kernels._jit import jit_writable, kernel, prange
from fastformer.kernels.checks import FLOAT_DTYPES, check_finite, describe, quiet


# ------------------------------------------------------------------- checks
def adamw_inputs(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step):
    """The arrays and settings of `adamw_update`: param, m, v writeable float arrays updated in
    place, grad of their shape and dtype; returns step as an int."""
    arrays = {"param": param, "grad": grad, "m": m, "v": v}
    if not all(isinstance(a, np.ndarray) for a in arrays.values()) or param.dtype not in FLOAT_DTYPES \
            or not (param.shape == grad.shape == m.shape == v.shape) \
            or not (param.dtype == grad.dtype == m.dtype == v.dtype):
        raise FastformerError("adamw_update needs param, grad, m, v as float32 or float64 arrays of one shape and "
                              "dtype, got " + ", ".join(f"{n} {describe(a)}" for n, a in arrays.items()))
    for name in ("param", "m", "v"):
        if not arrays[name].flags.writeable:
            raise FastformerError(f"{name} must be writeable: adamw_update updates it in place")
    check_finite("lr", lr, low=0)
    check_number("beta1", beta1, low=0, high=1, high_open=True)
    check_number("beta2", beta2, low=0, high=1, high_open=True)
    check_finite("eps", eps, low=0)
    check_finite("weight_decay", weight_decay, low=0)
    return check_int("step", step)


# ---------------------------------------------------------------- reference
@quiet
def adamw_update(ops, param, grad, m, v, *, lr, beta1=0.9, beta2=0.999, eps=1e-8,
                 weight_decay=0.0, step=1):
    """One AdamW step in place on `param`, `m` and `v` (same shape and dtype as `grad`).

    As torch.optim.AdamW: p *= 1 - lr * wd; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
    p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps). `step` t counts from 1.
    """
    step = adamw_inputs(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step)
    bc1 = 1.0 - beta1 ** step
    bc2 = 1.0 - beta2 ** step
    param *= param.dtype.type(1.0 - lr * weight_decay)
    m *= beta1
    m += (1.0 - beta1) * grad
    v *= beta2
    v += (1.0 - beta2) * (grad * grad)
    param -= (lr / bc1) * m / (np.sqrt(v / bc2) + eps)


# -------------------------------------------------------------------- Numba
@kernel("void(F[::1], R[::1], F[::1], F[::1], F, F, F, F, F, F, F, F)")
def _adamw(p, g, m, v, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay, step_size, bc2):
    # p *= 1 - lr wd; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2
    # p -= lr / bc1 * m / (sqrt(v / bc2) + eps)
    for i in prange(p.shape[0]):
        gi = g[i]
        mi = beta1 * m[i] + one_minus_beta1 * gi
        vi = beta2 * v[i] + one_minus_beta2 * (gi * gi)
        m[i] = mi
        v[i] = vi
        p[i] = p[i] * decay - step_size * mi / (math.sqrt(vi / bc2) + eps)


def adamw_update_numba(ops, param, grad, m, v, *, lr, beta1=0.9, beta2=0.999, eps=1e-8,
                       weight_decay=0.0, step=1):
    step = adamw_inputs(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step)
    if not jit_writable(param, grad, m, v):  # strided or unaligned: updated in place by the reference
        return adamw_update(ops, param, grad, m, v, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                            weight_decay=weight_decay, step=step)
    F = param.dtype.type
    _adamw(param.reshape(-1), grad.reshape(-1), m.reshape(-1), v.reshape(-1),
           F(beta1), F(1.0 - beta1), F(beta2), F(1.0 - beta2), F(eps), F(1.0 - lr * weight_decay),
           F(lr / (1.0 - beta1 ** step)), F(1.0 - beta2 ** step))
