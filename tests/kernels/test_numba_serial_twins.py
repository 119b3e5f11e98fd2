"""Kernels with a serial twin (used on small inputs) give the same results through both paths."""

import numpy as np

from fastformer.kernels import _jit as K
from fastformer.kernels import use_precision
from fastformer.kernels.ops import activations, attention, embedding, layernorm
from fastformer.kernels.process import cpu_has_bf16

SIZED_CALLERS = (activations, attention, embedding, layernorm)  # the op modules that call K.sized


def test_every_twin_matches_its_parallel_kernel(monkeypatch):
    from fastformer.kernels import _resolve

    ops = _resolve("numba")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 9, 32)).astype(np.float32)  # 1152 elements: the serial path
    w, b = rng.normal(size=32).astype(np.float32), rng.normal(size=32).astype(np.float32)
    q = rng.normal(size=(2, 3, 5, 4)).astype(np.float32)
    q32 = rng.normal(size=(2, 3, 5, 32)).astype(np.float32)  # heads of 32 channels: the register tiles
    kpm = np.zeros((2, 5), bool)
    kpm[1, 0] = True
    ids = rng.integers(0, 7, size=(3, 4))
    emb = rng.normal(size=(7, 32)).astype(np.float32)

    def run():
        outs = [ops.layernorm_forward(x, w, b)[0], ops.residual_layernorm_forward(x, x, w, b)[0][1],
                ops.gelu_forward(x, b)[0], ops.gelu_forward(x, b, approximate="none")[0],
                ops.attention_forward(q, q, q, True, kpm)[0], ops.attention_forward(q32, q32, q32, True, kpm)[0],
                ops.embedding_forward(emb, ids)[0],
                ops.relu_forward(x, b)[0]]
        if cpu_has_bf16():  # the register tiles in bfloat16, at 5 rows too
            monkeypatch.setattr(attention, "ATTENTION_BF16_FROM", 1)
            with use_precision("bfloat16"):
                outs.append(ops.attention_forward(q32, q32, q32, True, kpm)[0])
        return outs

    assert set(K._SERIAL) == {"_layernorm_fwd", "_residual_layernorm_fwd", "_gelu_fwd", "_embedding_fwd",
                              "_attention_fwd", "_attention_fwd_tiles", "_attention_fwd_bf16", "_relu_fwd",
                              "_cross_entropy_fwd_inplace", "_gemm", "_gemm_rows", "_gemm_gelu", "_pack_rows",
                              "_pack_cols", "_pack_a_rows", "_pack_both", "_sample_rows"}
    # not among the float32 calls below: the fused LM head's threads call K.serial themselves; the bf16
    # GEMM and its packers pick through K.sized with their own threshold; sampling has its own test;
    # the bfloat16 attention is not compiled on a CPU without the instructions
    direct = {"_cross_entropy_fwd_inplace", "_gemm", "_gemm_rows", "_gemm_gelu", "_pack_rows", "_pack_cols",
              "_pack_a_rows", "_pack_both", "_sample_rows"} | (set() if cpu_has_bf16() else {"_attention_fwd_bf16"})
    picked = []  # the kernel of each call: the two runs must really take different paths
    sized = K.sized
    for module in SIZED_CALLERS:
        monkeypatch.setattr(module, "sized", lambda kernel, work: picked.append(sized(kernel, work)) or picked[-1])
    serial = run()
    assert picked and all(k is K._SERIAL[k.__name__.removesuffix("_serial")] for k in picked), picked
    assert {k.__name__.removesuffix("_serial") for k in picked} == set(K._SERIAL) - direct
    picked.clear()
    monkeypatch.setattr(K, "SMALL_WORK", 0)  # every call takes the parallel kernel
    parallel = run()
    assert picked and not any(k in K._SERIAL.values() for k in picked)
    for a, p in zip(serial, parallel):
        np.testing.assert_allclose(a, p, rtol=1e-6, atol=1e-6)


def test_kernels_compile_at_their_first_call_and_float64_at_the_first_float64_array():
    """A fresh process compiles nothing at import and a kernel at its first call, for float32
    only; the first float64 array -- here one that reaches AdamW, which takes no other wrapper's
    path -- brings the float64 signature of every kernel made so far and of every later one, and
    no other type is ever accepted."""
    import os
    import subprocess
    import sys

    code = """
import numpy as np, fastformer
from fastformer.kernels import _jit as K
from fastformer.kernels.ops.softmax import _softmax_fwd
ops = fastformer.get_ops()
assert all(k.dispatcher is None for k in K._KERNELS)
ops.softmax_forward(np.ones((3, 4), np.float32))
made = [k for k in K._KERNELS if k.dispatcher is not None]
assert [k.__name__ for k in made] == ["_softmax_fwd"] and not K._float64_ready
assert [len(k.dispatcher.signatures) for k in made] == [1]
p, g, m, v = (np.full(5, 0.5) for _ in range(4))
ops.adamw_update(p, g, m, v, lr=0.1, step=1)
made = [k for k in K._KERNELS if k.dispatcher is not None]
assert K._float64_ready and sorted(k.__name__ for k in made) == ["_adamw", "_softmax_fwd"]
assert [len(k.dispatcher.signatures) for k in made] == [2, 2]
ops.gelu_forward(np.ones((3, 4), np.float32), np.ones(4, np.float32))  # made after: both at once
assert len(K._SERIAL["_gelu_fwd"].dispatcher.signatures) == 2  # a small input: the serial twin
try:
    _softmax_fwd(np.ones((2, 2), np.int64), np.ones((2, 2), np.int64))
except TypeError:
    print("ok")
"""
    env = dict(os.environ, FASTFORMER_BACKEND="numba")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
