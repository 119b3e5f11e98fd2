"""The kernel interface refuses bad input the same way on every backend.

Each case below is a bad call of one kernel: both backends must raise FastformerError (a
ValueError) with the message given, and -- when Numba is installed -- with the very same message,
since both call fastformer.kernels.checks and nothing else validates. Cases marked "was:" are
inputs the two backends used to treat differently.
"""

import numpy as np
import pytest

from fastformer.errors import FastformerError
from fastformer.kernels import _resolve

f32, f64 = np.float32, np.float64


def x24(dtype=f32):
    return np.ones((2, 4), dtype)


def qkv(B=1, T=3, C=4, dtype=f32):
    return np.ones((B, T, 3 * C), dtype)


def heads(B=1, H=2, T=3, hs=2, dtype=f32):
    return np.ones((B, H, T, hs), dtype)


def caches(B=1, H=2, Tmax=5, hs=2, dtype=f32):
    return np.zeros((B, H, Tmax, hs), dtype), np.zeros((B, H, Tmax, hs), dtype)


def frozen(a):
    a.flags.writeable = False
    return a


def adamw(ops, param=None, grad=None, m=None, v=None, **kw):
    """An adamw_update call with good defaults for whatever is not given."""
    param, grad, m, v = (np.zeros(6, f32) if a is None else a for a in (param, grad, m, v))
    return lambda: ops.adamw_update(param, grad, m, v, **{"lr": 1e-3, **kw})


def backward(forward, backward_name, *args, grad=None, **bwd):
    """A call of the backward `backward_name` with `grad` on the cache of `forward`'s call."""
    def make(ops):
        out, cache = getattr(ops, forward)(*args)
        return lambda: getattr(ops, backward_name)(grad(out) if callable(grad) else grad, cache, **bwd)
    return make


def residual_ds(ds):
    """residual_layernorm_backward with a good dy and the gradient `ds` of the residual stream."""
    def make(ops):
        _, cache = ops.residual_layernorm_forward(x24(), x24(), np.ones(4, f32), np.zeros(4, f32))
        return lambda: ops.residual_layernorm_backward(np.ones((2, 4), f32), ds, cache)
    return make


# id: (make(ops) -> a call that must fail, the message it must fail with)
CASES = {
    # dtypes and shapes of the inputs
    "softmax int": (lambda ops: lambda: ops.softmax_forward(np.arange(6).reshape(2, 3)),
                    "x must be a float32 or float64 array, got dtype int64"),
    "softmax float16": (lambda ops: lambda: ops.softmax_forward(np.ones(3, np.float16)),
                        "x must be a float32 or float64 array, got dtype float16"),
    "softmax 0-d": (lambda ops: lambda: ops.softmax_forward(np.float32(1.0)),
                    "x must be an array with at least one axis, got a 0-d array"),
    "softmax empty rows": (lambda ops: lambda: ops.softmax_forward(np.ones((3, 0), f32)),  # was: NumPy's error
                           r"x must have a non-empty last axis, got shape \(3, 0\)"),
    "layernorm mixed dtypes": (lambda ops: lambda: ops.layernorm_forward(x24(), np.ones(4), np.zeros(4, f32)),
                               "weight must have dtype float32 like the other inputs, got float64"),
    "layernorm weight shape": (lambda ops: lambda: ops.layernorm_forward(x24(), np.ones(3, f32), np.zeros(4, f32)),
                               r"weight must have shape \(4,\) to match the last axis of x, got \(3,\)"),
    "layernorm bias list": (lambda ops: lambda: ops.layernorm_forward(x24(), np.ones(4, f32), [0.0] * 4),
                            "bias must have dtype float32 like the other inputs, got float64"),
    "layernorm eps text": (lambda ops: lambda: ops.layernorm_forward(x24(), np.ones(4, f32), np.zeros(4, f32), "1e-5"),
                           "eps must be a number >= 0, got '1e-5'"),  # was: NumPy's error or a TypeError
    "residual branch broadcast": (lambda ops: lambda: ops.residual_layernorm_forward(  # was: numpy broadcast it
        x24(), np.ones(4, f32), np.ones(4, f32), np.zeros(4, f32)), r"branch must have the shape of x \(2, 4\)"),
    "gelu form": (lambda ops: lambda: ops.gelu_forward(x24(), approximate="sigmoid"),
                  "approximate must be one of tanh, none, got 'sigmoid'"),
    "gelu form None": (lambda ops: lambda: ops.gelu_forward(x24(), approximate=None),
                       "approximate must be one of tanh, none, got None"),  # was: tanh on numba, erf on numpy
    "gelu form array": (lambda ops: lambda: ops.gelu_forward(x24(), approximate=np.array(["tanh", "none"])),
                        "approximate must be one of tanh, none, got array"),  # was: NumPy's ambiguous truth value
    "gelu bias dtype": (lambda ops: lambda: ops.gelu_forward(x24(), np.zeros(4, f64)),
                        "bias must have dtype float32 like the other inputs, got float64"),
    "relu bias shape": (lambda ops: lambda: ops.relu_forward(x24(), np.zeros(2, f32)),
                        r"bias must have shape \(4,\) to match the last axis of x"),
    # gradients must have the forward's output shape and dtype (was: the reference broadcast them)
    "softmax dy shape": (backward("softmax_forward", "softmax_backward", x24(), grad=np.ones(4, f32)),
                         r"dy must be a float32 array of the forward's output shape \(2, 4\), got float32 \(4,\)"),
    "softmax dy dtype": (backward("softmax_forward", "softmax_backward", x24(), grad=lambda y: y.astype(f64)),
                         r"dy must be a float32 array of the forward's output shape \(2, 4\), got float64"),
    "layernorm dy shape": (backward("layernorm_forward", "layernorm_backward", x24(), np.ones(4, f32),
                                    np.zeros(4, f32), grad=np.ones(4, f32)), "dy must be a float32 array"),
    "residual ds shape": (residual_ds(np.ones((1, 4), f32)), r"ds must be a float32 array .* got float32 \(1, 4\)"),
    "residual ds dtype": (residual_ds(np.ones((2, 4), f64)), r"ds must be a float32 array .* got float64 \(2, 4\)"),
    "gelu dy shape": (backward("gelu_forward", "gelu_backward", x24(), grad=np.ones((4, 2), f32)),
                      r"dy must be a float32 array of the forward's output shape \(2, 4\)"),
    "relu dy shape": (backward("relu_forward", "relu_backward", x24(), grad=np.ones((1, 4), f32)),
                      r"dy must be a float32 array of the forward's output shape \(2, 4\)"),
    "attention dout shape": (backward("attention_forward", "attention_backward", heads(), heads(), heads(),
                                      grad=np.ones((1, 2, 3, 1), f32)),
                             r"dout must be a float32 array .* \(1, 2, 3, 2\)"),
    "qkv dout shape": (backward("attention_qkv_forward", "attention_qkv_backward", qkv(), 2,
                                grad=np.ones((1, 3, 5), f32)), r"dout must be a float32 array .* \(1, 3, 4\)"),
    "embedding dout shape": (backward("embedding_forward", "embedding_backward", np.ones((5, 3), f32), np.array([1, 2]),
                                      grad=np.ones((3,), f32)), r"dout must be a float32 array .* \(2, 3\)"),
    # attention
    "attention q 3-d": (lambda ops: lambda: ops.attention_forward(qkv(), qkv(), qkv()), "attention expects q"),
    "attention k 3-d": (lambda ops: lambda: ops.attention_forward(heads(), np.ones((1, 2, 3), f32),  # was: IndexError
                                                                  np.ones((1, 2, 3), f32)), "attention expects q"),
    "attention mixed dtypes": (lambda ops: lambda: ops.attention_forward(heads(), heads(dtype=f64), heads()),
                               "k must have dtype float32 like the other inputs, got float64"),
    # was: zeros from numba, NumPy's error from the reference
    "attention no keys": (lambda ops: lambda: ops.attention_forward(heads(), heads(T=0), heads(T=0)),
                          r"attention needs at least one key, got k and v \(1, 2, 0, 2\)"),
    "attention causal S < T": (lambda ops: lambda: ops.attention_forward(heads(), heads(T=2), heads(T=2), causal=True),
                               "causal attention needs at least as many keys as queries, got T=3, S=2"),
    "attention causal text": (lambda ops: lambda: ops.attention_forward(heads(), heads(), heads(), causal="yes"),
                              "causal must be True or False, got 'yes'"),
    "attention mask shape": (lambda ops: lambda: ops.attention_forward(heads(), heads(), heads(),
                                                                       key_padding_mask=np.zeros((1, 4), bool)),
                             r"key_padding_mask must have shape \(B, S\) = \(1, 3\), got \(1, 4\)"),
    "attention scale 0": (lambda ops: lambda: ops.attention_forward(heads(), heads(), heads(), scale=0),
                          r"scale must be a finite number > 0, got 0"),
    "attention scale inf": (lambda ops: lambda: ops.attention_forward(heads(), heads(), heads(), scale=np.inf),
                            r"scale must be a finite number > 0, got inf"),  # was: NaN on numba, inf on numpy
    "attention scale nan": (lambda ops: lambda: ops.attention_forward(heads(), heads(), heads(), scale=np.nan),
                            r"scale must be a finite number > 0, got nan"),
    "qkv n_heads bool": (lambda ops: lambda: ops.attention_qkv_forward(qkv(), True),
                         "n_heads must be an integer >= 1, got True"),
    "qkv n_heads float": (lambda ops: lambda: ops.attention_qkv_forward(qkv(), 2.0),
                          "n_heads must be an integer >= 1, got 2.0"),
    "qkv n_heads 0": (lambda ops: lambda: ops.attention_qkv_forward(qkv(), 0),
                      "n_heads must be an integer >= 1, got 0"),
    "qkv not 3C": (lambda ops: lambda: ops.attention_qkv_forward(np.ones((2, 3, 10), f32), 2),
                   r"qkv must have shape \(B, T, 3C\) with C divisible by n_heads, got qkv \(2, 3, 10\)"),
    "qkv C % n_heads": (lambda ops: lambda: ops.attention_qkv_forward(qkv(C=4), 3), "C divisible by n_heads"),
    "qkv mask shape": (lambda ops: lambda: ops.attention_qkv_forward(qkv(), 2, key_padding_mask=np.zeros((2, 3))),
                       r"key_padding_mask must have shape \(B, S\) = \(1, 3\), got \(2, 3\)"),
    # was: an unpacking error from numba
    "cached qkv 2-d": (lambda ops: lambda: ops.attention_cached(np.ones((3, 12), f32), *caches(), 0, 2),
                       "qkv must have shape"),
    "cached cache dtype": (lambda ops: lambda: ops.attention_cached(qkv(), *caches(dtype=f64), 0, 2),
                           r"k_cache and v_cache must be writeable float32 arrays \(B, H, Tmax, hs\) = \(1, 2, 5, 2\), "
                           r"got float64 \(1, 2, 5, 2\) and float64 \(1, 2, 5, 2\)"),
    "cached cache read-only": (lambda ops: lambda: ops.attention_cached(  # was: NumPy's "read-only" error
        qkv(), frozen(caches()[0]), caches()[1], 0, 2), "k_cache and v_cache must be writeable float32 arrays"),
    "cached cache list": (lambda ops: lambda: ops.attention_cached(qkv(), [[0.0]], caches()[1], 0, 2),
                          r"k_cache and v_cache must be writeable float32 arrays .* got list and float32"),
    "cached start float": (lambda ops: lambda: ops.attention_cached(qkv(), *caches(), 1.0, 2),
                           "start must be an integer, got 1.0"),
    "cached overflow": (lambda ops: lambda: ops.attention_cached(qkv(), *caches(), 3, 2),
                        "3 new tokens at position 3 do not fit a cache of 5 positions"),
    "cached mask short": (lambda ops: lambda: ops.attention_cached(qkv(), *caches(), 1, 2,
                                                                   key_padding_mask=np.zeros((1, 3), bool)),
                          r"key_padding_mask must have shape \(B, >= start \+ Tn\) = \(1, >= 4\), got \(1, 3\)"),
    # cross-entropy
    "ce targets float": (lambda ops: lambda: ops.cross_entropy_forward(x24(), np.zeros(2)),
                         "targets must be an integer array, got dtype float64"),
    "ce targets shape": (lambda ops: lambda: ops.cross_entropy_forward(x24(), np.zeros(3, int)),
                         r"targets must have shape \(2,\) \(logits without the last axis\), got \(3,\)"),
    "ce target range": (lambda ops: lambda: ops.cross_entropy_forward(x24(), np.array([0, 4])),
                        r"targets must lie in \[0, 4\) or equal ignore_index=-100, got 4"),
    "ce ignore_index float": (lambda ops: lambda: ops.cross_entropy_forward(x24(), np.array([0, 1]), ignore_index=1.5),
                              "ignore_index must be an integer, got 1.5"),  # was: numba truncated it to 1
    "ce ignore_index huge": (lambda ops: lambda: ops.cross_entropy_forward(x24(), np.array([0, 1]),
                                                                           ignore_index=2 ** 70),
                             "ignore_index must fit int64, got 1180591620717411303424"),  # was: OverflowError on numba
    "ce targets uint64": (lambda ops: lambda: ops.cross_entropy_forward(x24(), np.array([0, 2 ** 63 + 1], np.uint64)),
                          "targets must hold values that fit int64, got 9223372036854775809"),
    "ce dloss nan": (lambda ops: lambda: ops.cross_entropy_backward(np.nan, ops.cross_entropy_forward(
        x24(), np.array([0, 1]))[1]), "dloss must be a finite number, got nan"),
    "ce dloss text": (lambda ops: lambda: ops.cross_entropy_backward("1", ops.cross_entropy_forward(
        x24(), np.array([0, 1]))[1]), "dloss must be a finite number, got '1'"),
    "ce no classes": (lambda ops: lambda: ops.cross_entropy_forward(np.ones((2, 0), f32), np.full(2, -100)),
                      r"logits must have a non-empty last axis, got shape \(2, 0\)"),  # was: NumPy's error
    "ce out shape": (lambda ops: lambda: ops.cross_entropy_forward(x24(), np.array([0, 1]), out=np.ones((2, 5), f32)),
                     r"out must be a writeable C-contiguous float32 array of shape \(2, 4\), got float32 \(2, 5\)"),
    "ce out before targets": (lambda ops: lambda: ops.cross_entropy_forward(x24(), np.zeros(2), out=[0.0]),
                              "out must be a writeable C-contiguous float32 array of shape \\(2, 4\\), got list"),
    # embedding
    "embedding ids float": (lambda ops: lambda: ops.embedding_forward(np.ones((5, 3), f32), np.array([0.0, 1.0])),
                            "ids must be an integer array, got dtype float64"),
    "embedding ids range": (lambda ops: lambda: ops.embedding_forward(np.ones((5, 3), f32), np.array([[0, 5]])),
                            r"ids must lie in \[0, 5\), got 5"),
    "embedding ids negative": (lambda ops: lambda: ops.embedding_forward(np.ones((5, 3), f32), np.array([-1, 0])),
                               r"ids must lie in \[0, 5\), got -1"),
    # was: checked by numba only
    "embedding weight 1-D": (lambda ops: lambda: ops.embedding_forward(np.ones(5, f32), np.array([0])),
                             r"weight must have shape \(V, C\), got \(5,\)"),
    "embedding dweight dtype": (backward("embedding_forward", "embedding_backward", np.ones((5, 3), f32),
                                         np.array([1, 2]), grad=np.ones((2, 3), f32), dweight=np.zeros((5, 3), f64)),
                                r"dweight must be a writeable float32 array of the weight's shape \(5, 3\), "
                                r"got float64"),
    "embedding dweight read-only": (backward("embedding_forward", "embedding_backward", np.ones((5, 3), f32),
                                             np.array([1, 2]), grad=np.ones((2, 3), f32),
                                             dweight=frozen(np.zeros((5, 3), f32))), "dweight must be a writeable"),
    # AdamW
    "adamw shapes": (lambda ops: adamw(ops, grad=np.zeros(5, f32)),
                     "adamw_update needs param, grad, m, v as float32 or float64 arrays of one shape and dtype, "
                     r"got param float32 \(6,\), grad float32 \(5,\)"),
    "adamw mixed dtypes": (lambda ops: adamw(ops, grad=np.zeros(6, f64)),  # was: numba fell back, numpy cast
                           r"of one shape and dtype, got param float32 \(6,\), grad float64 \(6,\)"),
    "adamw int arrays": (lambda ops: adamw(ops, *(np.zeros(6, int) for _ in range(4))), "float32 or float64 arrays"),
    "adamw grad list": (lambda ops: adamw(ops, grad=[0.0] * 6), "grad list"),
    "adamw read-only": (lambda ops: adamw(ops, m=frozen(np.zeros(6, f32))),
                        "m must be writeable: adamw_update updates it in place"),
    "adamw step 0": (lambda ops: adamw(ops, step=0), "step must be an integer >= 1, got 0"),
    "adamw step bool": (lambda ops: adamw(ops, step=True), "step must be an integer >= 1, got True"),
    "adamw lr": (lambda ops: adamw(ops, lr=-1.0), "lr must be a finite number >= 0, got -1.0"),
    "adamw beta1": (lambda ops: adamw(ops, beta1=1.0), r"beta1 must be a number in \[0, 1\), got 1.0"),
    "adamw lr text": (lambda ops: adamw(ops, lr="fast"), "lr must be a finite number >= 0, got 'fast'"),
    "adamw lr inf": (lambda ops: adamw(ops, lr=np.inf), "lr must be a finite number >= 0, got inf"),
    "adamw weight_decay inf": (lambda ops: adamw(ops, weight_decay=np.inf),
                               "weight_decay must be a finite number >= 0, got inf"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_refused(ops, case):
    make, message = CASES[case]
    with pytest.raises(FastformerError, match=message):
        make(ops)()


@pytest.mark.parametrize("case", CASES)
def test_both_backends_give_the_same_message(case):
    pytest.importorskip("numba")
    make, _ = CASES[case]
    messages = []
    for name in ("numpy", "numba"):
        with pytest.raises(FastformerError) as e:
            make(_resolve(name))()
        messages.append(str(e.value))
    assert messages[0] == messages[1]


def test_a_refused_input_is_still_a_value_error(ops):
    with pytest.raises(ValueError):
        ops.softmax_forward(np.arange(3))


def test_unknown_backend_is_a_fastformer_error():
    with pytest.raises(FastformerError, match="unknown fastformer backend 'cuda': valid values are auto, numpy, numba"):
        _resolve("cuda")


@pytest.mark.parametrize("dtype", [np.float32, np.float64, "float32", np.dtype("<f8"), np.float16, np.int64, bool])
def test_dtype_name_is_numpys_name_of_the_dtype(dtype):
    from fastformer.kernels.checks import dtype_name

    assert dtype_name(dtype) == np.dtype(dtype).name
