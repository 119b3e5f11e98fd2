"""Kernel fuzzing: bad and awkward calls of every public kernel, on both backends, in a child process.

A case is a dict {"op": name, "mutation": "target:kind", "seed": int}. `make_call(case, ops)`
builds the call on one backend from the case alone -- the same arrays on each backend, that
backend's own forward for a backward's cache -- with the one mutation applied, and `verdict`
runs it on the NumPy reference and on Numba:

    refused   both raised FastformerError with the same message
    same      both returned results that agree within tolerance (NaN and inf where the other has
              them); a layout-only mutation (read-only, strided, unaligned...) must also give the
              result of the unmutated call. For an edited cache of the right shapes, and for
              values near float overflow, both returning is enough.
    silent    the reference refused and Numba returned: its kernel ran on inputs the reference
              rejects (an out-of-bounds read or write goes unseen this way)
    unclean   both refused, not both with FastformerError
    differ    anything else: other messages or exception types, one refusal, other results
    crash     the child process died (a segfault), set by the parent

Run as a script, it reads cases as JSON lines on stdin and writes "start <i>" before case i and
its verdict as a JSON line after it, so a crash names its case. `--probe` runs every case of
`all_cases()` (in as many children as crashes need) and prints the table by kernel.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings

import numpy as np

MODES = ("same", "refused")  # the verdicts a correct pair of backends gives on every case

# ------------------------------------------------------------------ building calls
F32, F64 = np.float32, np.float64


def _normal(rng, shape, dt, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dt)


def _dims(rng, **ranges):
    return {k: int(rng.integers(lo, hi + 1)) for k, (lo, hi) in ranges.items()}


def _mask(rng, B, S):
    """A key-padding mask (B, S) that leaves at least the last key of every row."""
    m = rng.random((B, S)) < 0.3
    m[:, -1] = False
    return m


def _softmax(ops, rng, dt):
    d = _dims(rng, N=(1, 4), C=(1, 9))
    x = _normal(rng, (d["N"], d["C"]), dt, 3.0)
    return {"x": x}, lambda ops, a: ops.softmax_forward(**a)[0]


def _layernorm(ops, rng, dt):
    d = _dims(rng, N=(1, 4), C=(1, 9))
    C = d["C"]
    return ({"x": _normal(rng, (d["N"], C), dt), "weight": _normal(rng, C, dt), "bias": _normal(rng, C, dt),
             "eps": 1e-5}, lambda ops, a: ops.layernorm_forward(**a)[0])


def _residual(ops, rng, dt):
    a, _ = _layernorm(ops, rng, dt)
    a["branch"] = _normal(rng, a["x"].shape, dt)
    return a, lambda ops, a: ops.residual_layernorm_forward(**a)[0]


def _residual_bwd(ops, rng, dt, pre):
    a = pre(_residual(ops, rng, dt)[0])
    (s, _), cache = ops.residual_layernorm_forward(**a)
    return ({"dy": _normal(rng, s.shape, dt), "ds": _normal(rng, s.shape, dt), "cache": cache},
            lambda ops, a: ops.residual_layernorm_backward(**a))


def _attention(ops, rng, dt):
    d = _dims(rng, B=(1, 2), H=(1, 2), T=(1, 4), extra=(0, 2), hs=(1, 3))
    B, H, T, hs = d["B"], d["H"], d["T"], d["hs"]
    S = T + d["extra"]
    return ({"q": _normal(rng, (B, H, T, hs), dt), "k": _normal(rng, (B, H, S, hs), dt),
             "v": _normal(rng, (B, H, S, hs), dt), "causal": bool(rng.integers(2)),
             "key_padding_mask": _mask(rng, B, S), "scale": None},
            lambda ops, a: ops.attention_forward(**a)[0])


def _qkv(ops, rng, dt):
    d = _dims(rng, B=(1, 2), H=(1, 2), T=(1, 4), hs=(1, 3))
    B, H, T, hs = d["B"], d["H"], d["T"], d["hs"]
    return ({"qkv": _normal(rng, (B, T, 3 * H * hs), dt), "n_heads": H, "causal": bool(rng.integers(2)),
             "key_padding_mask": _mask(rng, B, T), "scale": None},
            lambda ops, a: ops.attention_qkv_forward(**a)[0])


def _cached(ops, rng, dt):
    d = _dims(rng, B=(1, 2), H=(1, 2), Tn=(1, 3), hs=(1, 3), start=(0, 3), spare=(0, 2))
    B, H, Tn, hs, start = d["B"], d["H"], d["Tn"], d["hs"], d["start"]
    Tmax = start + Tn + d["spare"]
    kc, vc = _normal(rng, (B, H, Tmax, hs), dt), _normal(rng, (B, H, Tmax, hs), dt)

    def call(ops, a):
        return ops.attention_cached(**a), a["k_cache"], a["v_cache"]
    return ({"qkv": _normal(rng, (B, Tn, 3 * H * hs), dt), "k_cache": kc, "v_cache": vc, "start": start,
             "n_heads": H, "key_padding_mask": _mask(rng, B, Tmax), "scale": None},
            call)


def _decode(ops, rng, dt):
    from fastformer.kernels.ops.gpt2_decode import PackedGPT2, gpt2_param_shapes

    d = _dims(rng, L=(1, 2), B=(1, 2), H=(1, 2), hs=(1, 3), V=(2, 7), F=(1, 5), start=(0, 3), spare=(1, 2))
    L, B, H, hs, V, Fd, start = d["L"], d["B"], d["H"], d["hs"], d["V"], d["F"], d["start"]
    Tmax = start + d["spare"]
    shapes, sizes = gpt2_param_shapes(L, H * hs, Fd, V, Tmax)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    weights = PackedGPT2(_normal(rng, int(sizes.sum()), dt, 0.3), offsets, V, Fd)
    padding = np.zeros((B, Tmax), bool)
    padding[:, :start] = rng.random((B, start)) < 0.3

    def call(ops, a):
        return ops.gpt2_decode_step(**a), a["k_cache"], a["v_cache"]
    return ({"weights": weights, "ids": rng.integers(0, V, B), "positions": np.full(B, start),
             "k_cache": _normal(rng, (L, B, H, Tmax, hs), dt), "v_cache": _normal(rng, (L, B, H, Tmax, hs), dt),
             "padding": padding, "start": start, "eps": 1e-5}, call)


def _greedy(ops, rng, dt):
    """gpt2_decode_greedy from _decode's inputs: a few steps, an <eos>, a row already done."""
    args, _ = _decode(ops, rng, dt)
    Tmax, B = args["k_cache"].shape[3], args["ids"].shape[0]
    done = np.zeros(B, bool)
    done[0] = rng.random() < 0.5
    args.update(n_steps=int(rng.integers(0, Tmax - args["start"] + 1)), eos_id=int(args["weights"].vocab_size - 1),
                done=done)

    def call(ops, a):
        tokens, nan = ops.gpt2_decode_greedy(**a)
        return tokens, np.array([nan]), a["k_cache"], a["v_cache"], a["done"]
    return args, call


def _prompt(ops, rng, dt):
    """gpt2_decode_prompt from _decode's inputs: a few positions a row from `start`."""
    args, _ = _decode(ops, rng, dt)
    Tmax, B, start = args["k_cache"].shape[3], args["ids"].shape[0], args["start"]
    T = int(rng.integers(1, Tmax - start + 1))
    V = int(args["weights"].vocab_size)
    args["padding"][:, start:start + T] = rng.random((B, T)) < 0.3  # padded prompt positions too
    positions = np.minimum(rng.integers(0, 2, (B, T)).cumsum(axis=1) + rng.integers(0, start + 1, (B, 1)), Tmax - 1)
    args.update(ids=rng.integers(0, V, (B, T)), positions=positions)

    def call(ops, a):
        return ops.gpt2_decode_prompt(**a), a["k_cache"], a["v_cache"]
    return args, call


def _sample(ops, rng, dt):
    d = _dims(rng, N=(1, 4), V=(1, 9))
    N, V = d["N"], d["V"]
    top_k = None if rng.random() < 0.3 else int(rng.integers(1, V + 2))
    return ({"logits": _normal(rng, (N, V), dt, 2.0), "u": rng.random(N), "temperature": 0.8, "top_k": top_k},
            lambda ops, a: ops.sample_ids(**a))


def _ce(ops, rng, dt, out=False):
    d = _dims(rng, N=(1, 4), V=(1, 7))
    N, V = d["N"], d["V"]
    t = rng.integers(0, V, N)
    t[rng.random(N) < 0.2] = -100
    logits = _normal(rng, (N, V), dt, 2.0)

    def call(ops, a):
        loss, cache = ops.cross_entropy_forward(**a)
        return loss, ops.cross_entropy_backward(1.0, cache)
    return {"logits": logits, "targets": t, "ignore_index": -100, "out": np.empty_like(logits) if out else None}, call


def _ce_out(ops, rng, dt):
    return _ce(ops, rng, dt, out=True)


def _ce_bwd(ops, rng, dt, pre, tuple_cache=False):
    a = pre(_ce(ops, rng, dt, out=not tuple_cache)[0])
    if tuple_cache:  # the reference forward's cache, on both backends (the backward is the shared one)
        from fastformer.kernels import _resolve
        ops = _resolve("numpy")
    _, cache = ops.cross_entropy_forward(**a)
    return {"dloss": 0.5, "cache": cache}, lambda ops, a: ops.cross_entropy_backward(**a)


def _ce_bwd_tuple(ops, rng, dt, pre):
    return _ce_bwd(ops, rng, dt, pre, tuple_cache=True)


def _activation(name, ops, rng, dt):
    d = _dims(rng, N=(1, 4), C=(1, 9))
    a = {"x": _normal(rng, (d["N"], d["C"]), dt, 2.0), "bias": _normal(rng, d["C"], dt)}
    if name == "gelu":
        a["approximate"] = ["tanh", "none"][int(rng.integers(2))]
    return a, lambda ops, a: getattr(ops, f"{name}_forward")(**a)[0]


def _embedding(ops, rng, dt):
    d = _dims(rng, V=(1, 7), C=(1, 5), B=(1, 3), T=(1, 3))
    return ({"weight": _normal(rng, (d["V"], d["C"]), dt), "ids": rng.integers(0, d["V"], (d["B"], d["T"]))},
            lambda ops, a: ops.embedding_forward(**a)[0])


def _embedding_bwd(ops, rng, dt, pre, into=False):
    a = pre(_embedding(ops, rng, dt)[0])
    out, cache = ops.embedding_forward(**a)
    args = {"dout": _normal(rng, out.shape, dt), "cache": cache, "dweight": None}
    if into:
        args["dweight"] = _normal(rng, a["weight"].shape, dt)
    return args, lambda ops, a: ops.embedding_backward(**a)


def _embedding_bwd_into(ops, rng, dt, pre):
    return _embedding_bwd(ops, rng, dt, pre, into=True)


def _adamw(ops, rng, dt):
    n = int(rng.integers(1, 12))
    a = {name: _normal(rng, n, dt) for name in ("param", "grad", "m")}
    a["v"] = np.abs(_normal(rng, n, dt))

    def call(ops, a):
        ops.adamw_update(**a)
        return a["param"], a["m"], a["v"]
    return {**a, "lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1, "step": 3}, call


def _head(ops, rng, dt):
    """The LM head fused with the cross-entropy: loss and both gradients, in chunks of 1 to 3 rows."""
    d = _dims(rng, N=(1, 5), C=(1, 3), V=(1, 6), chunk=(1, 3))
    t = rng.integers(0, d["V"], d["N"])
    t[rng.random(d["N"]) < 0.2] = -100

    def call(ops, a):
        loss, cache = ops.linear_cross_entropy_forward(**a)
        return (loss, *ops.linear_cross_entropy_backward(1.0, cache))
    return ({"h": _normal(rng, (d["N"], d["C"]), dt), "weight": _normal(rng, (d["V"], d["C"]), dt), "targets": t,
             "ignore_index": -100, "grad": True, "dweight": None, "chunk_rows": d["chunk"]}, call)


def _on_tiles(builder):
    """`builder`'s case with a backend's attention on BLAS tiles from the first query row, in
    blocks of 2, forward and backward (the reference keeps its plain form)."""
    def build(ops, rng, dt):
        args, _ = builder(ops, rng, dt)
        forward = "attention_forward" if "q" in args else "attention_qkv_forward"

        def call(ops, a):
            from fastformer.kernels.ops import attention, attention_tiled

            saved = attention_tiled.ATTENTION_BLOCK, attention.ATTENTION_TILED_FROM
            attention_tiled.ATTENTION_BLOCK, attention.ATTENTION_TILED_FROM = 2, 1
            try:
                out, cache = getattr(ops, forward)(**a)
                backward = getattr(ops, forward.replace("forward", "backward"))
                grads = backward(np.ones_like(out), cache)
                return (out, *(grads if isinstance(grads, tuple) else (grads,)))
            finally:
                attention_tiled.ATTENTION_BLOCK, attention.ATTENTION_TILED_FROM = saved
        return args, call
    return build


def _quantized(fmt):
    """ops.linear_quantized with a weight of `fmt` (float32 only: a float64 call is refused)."""
    def build(ops, rng, dt):
        d = _dims(rng, M=(1, 4), K=(1, 9), N=(1, 20))
        M, K, N = d["M"], d["K"], d["N"]
        from fastformer.kernels.ops.quantized import format_runs_natively

        if not format_runs_natively(fmt):  # the Numba backend would refuse every case: test the reference's packing
            ops = _resolve_numpy()
        qw = ops.quantize_weight(_normal(rng, (K, N), F32), fmt)
        return ({"x": _normal(rng, (M, K), dt), "qw": qw, "bias": _normal(rng, N, dt)},
                lambda ops, a: ops.linear_quantized(**a))
    return build


def _resolve_numpy():
    from fastformer.kernels import _resolve

    return _resolve("numpy")


FORWARDS = {  # kernel -> builder(ops, rng, dt) -> (args, call(ops, args))
    "softmax_forward": _softmax, "layernorm_forward": _layernorm, "residual_layernorm_forward": _residual,
    "attention_forward": _attention, "attention_qkv_forward": _qkv, "attention_cached": _cached,
    "gpt2_decode_step": _decode, "gpt2_decode_greedy": _greedy, "gpt2_decode_prompt": _prompt,
    "sample_ids": _sample,
    "cross_entropy_forward": _ce, "cross_entropy_forward(out)": _ce_out,
    "gelu_forward": lambda *a: _activation("gelu", *a), "relu_forward": lambda *a: _activation("relu", *a),
    "embedding_forward": _embedding, "adamw_update": _adamw, "linear_cross_entropy_forward": _head,
    "attention_forward(tiles)": _on_tiles(_attention), "attention_qkv_forward(tiles)": _on_tiles(_qkv),
    "linear_quantized(int8)": _quantized("int8"), "linear_quantized(bf16)": _quantized("bf16"),
    "linear_quantized(fp32)": _quantized("fp32"),
}


def _backward(stem, grad):
    """(builder, forward's builder) of a call of `stem`_backward: the cache of `stem`_forward, on
    the backend at hand and inputs that `pre` may edit, and a gradient `grad` of its output's shape."""
    forward_builder = FORWARDS[f"{stem}_forward"]

    def build(ops, rng, dt, pre):
        a = pre(forward_builder(ops, rng, dt)[0])
        out, cache = getattr(ops, f"{stem}_forward")(**a)
        return {grad: _normal(rng, out.shape, dt), "cache": cache}, lambda ops, a: getattr(ops, f"{stem}_backward")(**a)
    return build, forward_builder


BACKWARDS = {  # kernel -> (builder(ops, rng, dt, pre), its forward's builder); `pre` edits the forward's inputs
    **{f"{stem}_backward": _backward(stem, grad) for stem, grad in [
        ("softmax", "dy"), ("layernorm", "dy"), ("attention", "dout"), ("attention_qkv", "dout"), ("gelu", "dy"),
        ("relu", "dy")]},
    "residual_layernorm_backward": (_residual_bwd, _residual), "cross_entropy_backward": (_ce_bwd, _ce_out),
    "cross_entropy_backward(tuple cache)": (_ce_bwd_tuple, _ce), "embedding_backward": (_embedding_bwd, _embedding),
    "embedding_backward(dweight)": (_embedding_bwd_into, _embedding),
}
OPS = [*FORWARDS, *BACKWARDS]
# Kernels whose non-finite inputs may give NaN in more places on the reference (a zero
# probability times a non-finite value in a matrix product) than on Numba; see kernels/ops/__init__.py.
LOOSE_NONFINITE = {"attention_forward", "attention_backward", "attention_qkv_forward", "attention_qkv_backward",
                   "attention_cached", "gpt2_decode_step", "attention_forward(tiles)", "attention_qkv_forward(tiles)"}

# ------------------------------------------------------------------ mutations
_TMP = []  # the directory of the memory-mapped inputs


def _memmap(a):
    if not _TMP:
        _TMP.append(tempfile.mkdtemp(prefix="kernel-fuzz-"))
    path = os.path.join(_TMP[0], f"{len(os.listdir(_TMP[0]))}.bin")
    np.ascontiguousarray(a).tofile(path)
    return np.memmap(path, dtype=a.dtype, mode="r", shape=a.shape)


def _unaligned(a):
    buf = np.zeros(a.nbytes + a.itemsize, np.uint8)[1:1 + a.nbytes]
    out = buf.view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def _frozen(a):
    a = np.array(a)
    a.flags.writeable = False
    return a


def _strided(a):
    big = np.repeat(a[..., None], 2, axis=-1)  # every value twice: a[..., ::2] is a strided view
    return big[..., 0] if a.ndim else a


def _poke(a, value, rng):
    a = np.array(a)
    if a.size:
        a.reshape(-1)[int(rng.integers(a.size))] = value
    return a


def _resize(a, axis, delta):
    """`a` with axis `axis` made `delta` longer (repeating its first entry) or shorter."""
    if a.ndim == 0:
        return a
    if delta < 0:
        return a[(slice(None),) * (axis % a.ndim) + (slice(0, max(a.shape[axis] + delta, 0)),)]
    first = np.take(a, [0] * delta, axis=axis) if a.shape[axis] else np.zeros(
        a.shape[:axis % a.ndim] + (delta,) + a.shape[axis % a.ndim + 1:], a.dtype)
    return np.concatenate([a, first], axis=axis)


ARRAY = {  # kind -> f(array, rng)
    "int64": lambda a, r: np.asarray(a).astype(np.int64),
    "float16": lambda a, r: np.asarray(a).astype(np.float16),
    "other-float": lambda a, r: np.asarray(a).astype(F64 if np.asarray(a).dtype == F32 else F32),
    "bool": lambda a, r: np.asarray(a) != 0,
    "big-endian": lambda a, r: np.asarray(a).astype(np.asarray(a).dtype.newbyteorder(">")),
    "complex": lambda a, r: np.asarray(a).astype(np.complex64),
    "object": lambda a, r: np.asarray(a).astype(object),
    "first+1": lambda a, r: _resize(np.asarray(a), 0, 1),
    "first-1": lambda a, r: _resize(np.asarray(a), 0, -1),
    "last+1": lambda a, r: _resize(np.asarray(a), -1, 1),
    "last-1": lambda a, r: _resize(np.asarray(a), -1, -1),
    "last+1000": lambda a, r: _resize(np.asarray(a), -1, 1000),
    "empty": lambda a, r: np.asarray(a)[:0],
    "ndim+1": lambda a, r: np.asarray(a)[None],
    "ndim-1": lambda a, r: np.asarray(a)[0] if np.asarray(a).ndim else np.asarray(a),
    "flat": lambda a, r: np.asarray(a).reshape(-1),
    "0-d": lambda a, r: np.asarray(a).reshape(-1)[:1].reshape(()) if np.asarray(a).size else np.asarray(a),
    "list": lambda a, r: np.asarray(a).tolist(),
    "none": lambda a, r: None,
    "string": lambda a, r: "abc",
}
LAYOUT = {  # same values, another memory layout: must give the unmutated call's result
    "read-only": lambda a, r: _frozen(a),
    "frombuffer": lambda a, r: np.frombuffer(np.ascontiguousarray(a).tobytes(), a.dtype).reshape(a.shape),
    "memmap": lambda a, r: _memmap(a),
    "strided": lambda a, r: _strided(a),
    "unaligned": lambda a, r: _unaligned(a),
    "fortran": lambda a, r: np.asfortranarray(a),
}
VALUES = {
    "nan": lambda a, r: _poke(a, np.nan, r),
    "inf": lambda a, r: _poke(a, np.inf, r),
    "-inf": lambda a, r: _poke(a, -np.inf, r),
    "huge": lambda a, r: _poke(a, 3e38, r),
}
IDS = {
    "id=bound": lambda a, r, V: _poke(a, V, r),
    "id=huge": lambda a, r, V: _poke(a, 1_000_000, r),
    "id=-1": lambda a, r, V: _poke(a, -1, r),
    "id=min": lambda a, r, V: _poke(a, np.iinfo(np.int64).min, r),
    "id=uint64": lambda a, r, V: _poke(np.asarray(a).astype(np.uint64), 2 ** 63 + 1, r),
    "id=int8": lambda a, r, V: np.asarray(a).astype(np.int8),
    "id=float": lambda a, r, V: np.asarray(a).astype(F64),
}
SCALARS = {
    "nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "-1": -1, "0": 0, "1.5": 1.5,
    "2**70": 2 ** 70, "True": True, "'1'": "1", "None": None, "array": np.ones(2),
}


def _id_bound(op, target, args):
    """The exclusive bound an id array of `op` is checked against (for "id=bound")."""
    if op.startswith("embedding_forward"):
        return args["weight"].shape[0]
    if op.startswith("embedding_backward"):
        return args["cache"][1][0]
    if op.startswith("gpt2"):
        return args["weights"].vocab_size if target == "ids" else args["k_cache"].shape[3]
    if op.startswith("cross_entropy_backward"):
        return args["cache"][0].shape[-1]
    if op.startswith("linear_cross_entropy"):
        return args["weight"].shape[0]
    if op.startswith("linear_quantized"):  # the packed words and int8's corrections: values, not ids
        return 1 << 20
    return args["logits"].shape[-1]


def _kinds(value):
    """The mutation kinds that apply to a value of this type."""
    if isinstance(value, np.ndarray):
        kinds = list(ARRAY) + list(LAYOUT)
        if value.dtype.kind == "f":
            kinds += list(VALUES)
        if value.dtype.kind in "iu":
            kinds += list(IDS)
            if value.dtype.kind == "u":  # ids that an unsigned array cannot hold
                kinds = [k for k in kinds if k not in ("id=-1", "id=min")]
            elif value.dtype.itemsize < 8:
                kinds = [k for k in kinds if k != "id=min"]
        if value.size == 0:  # no first entry to take, no bytes to map
            kinds = [k for k in kinds if k not in ("ndim-1", "memmap")]
        return kinds
    if isinstance(value, tuple):
        return ["none", "list", "short", "long"]
    if value is None:
        return ["string", "array"]
    return list(SCALARS)


def mutations(op):
    """Every mutation name of `op`: "arg:kind", "cache.i:kind" for each field i of a tuple cache,
    "weights.field:kind", "cache:splice.i" (field i from a forward of other sizes)."""
    from fastformer.kernels import _resolve

    args, _ = _build(op, _resolve("numpy"), np.random.default_rng(0), F32)
    names = []
    if op in BACKWARDS:  # a NaN or inf in the forward's input, so in a cache that fits it
        inputs, _ = BACKWARDS[op][1](_resolve("numpy"), np.random.default_rng(0), F32)
        names += [f"input.{n}:{k}" for n, a in inputs.items() if isinstance(a, np.ndarray) and a.dtype.kind == "f"
                  for k in VALUES]
    for name, value in args.items():
        names += [f"{name}:{k}" for k in _kinds(value)]
        if isinstance(value, tuple):  # a cache, or the packed weights
            for i, field in enumerate(value):
                label = value._fields[i] if hasattr(value, "_fields") and name == "weights" else i
                names += [f"{name}.{label}:{k}" for k in _kinds(field) if k not in ("array",)]
                if name == "cache":
                    names.append(f"cache:splice.{i}")
    return ["none:none"] + names  # "none:none" is the call as built


def _mutate_value(value, kind, rng, bound):
    if kind in IDS:
        return IDS[kind](value, rng, bound)
    for table in (ARRAY, LAYOUT, VALUES):
        if kind in table and isinstance(value, np.ndarray):
            return table[kind](value, rng)
    if kind == "short":
        return value[:-1]
    if kind == "long":
        return (*value, None)
    if kind == "list":
        return list(value) if isinstance(value, tuple) else np.asarray(value).tolist()
    if kind == "none":
        return None
    if kind == "string":
        return "abc"
    if kind == "array":
        return np.ones(2)
    return SCALARS[kind]


def _build(op, ops, rng, dt, pre=lambda a: a):
    if op in FORWARDS:
        return FORWARDS[op](ops, rng, dt)
    return BACKWARDS[op][0](ops, rng, dt, pre)


def _dtype(case):
    return F64 if case["seed"] % 3 == 0 else F32


def make_call(case, ops):
    """(call, args) of `case` on backend `ops`: call(ops, args) runs it."""
    op, mutation, seed = case["op"], case["mutation"], case["seed"]
    dt = _dtype(case)
    target, kind = mutation.split(":")
    rng = np.random.default_rng(seed + 1)
    if target.startswith("input."):
        def pre(a):
            name = target.split(".")[1]
            a[name] = _mutate_value(a[name], kind, rng, None)
            return a
        return _build(op, ops, np.random.default_rng(seed), dt, pre)[::-1]
    args, call = _build(op, ops, np.random.default_rng(seed), dt)
    if target == "none":
        return call, args
    if kind.startswith("splice."):
        i = int(kind.split(".")[1])
        other, _ = _build(op, ops, np.random.default_rng(seed + 7919), dt)
        cache = args["cache"]
        args["cache"] = type(cache)(*[other["cache"][i] if j == i else f for j, f in enumerate(cache)]) \
            if hasattr(cache, "_fields") else tuple(other["cache"][i] if j == i else f for j, f in enumerate(cache))
        return call, args
    name, _, field = target.partition(".")
    if not field:
        args[name] = _mutate_value(args[name], kind, rng, _id_bound(op, name, args) if kind in IDS else None)
        return call, args
    whole = args[name]
    fields = list(whole)
    i = whole._fields.index(field) if not field.isdigit() else int(field)
    bound = (_id_bound(op, field, args) if kind in IDS else None)
    fields[i] = _mutate_value(fields[i], kind, rng, bound)
    args[name] = type(whole)(*fields) if hasattr(whole, "_fields") else tuple(fields)
    return call, args


# ------------------------------------------------------------------ running and judging
def _run(case, ops):
    """("ok", outputs) or ("raise", exception)."""
    try:
        call, args = make_call(case, ops)
    except Exception as e:  # the case cannot be built: say so rather than blame a backend
        return "build", e
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            return "ok", call(ops, args)
    except Exception as e:
        return "raise", e


def _flatten(out):
    if isinstance(out, (tuple, list)):
        return [y for x in out for y in _flatten(x)]
    return [out]


def compare(a, b, dtype, loose=False):
    """None when outputs `a` (reference) and `b` of a call in `dtype` agree, else what differs."""
    a, b = _flatten(a), _flatten(b)
    if len(a) != len(b):
        return f"{len(a)} outputs against {len(b)}"
    # float32 precision for a float32 call, or one whose arrays became float32 (a loss from them too)
    single = dtype == F32 or any(getattr(x, "dtype", None) == F32 for x in a)
    for i, (x, y) in enumerate(zip(a, b)):
        if x is None or y is None:
            if x is not y:
                return f"output {i}: {type(x).__name__} against {type(y).__name__}"
            continue
        x, y = np.asarray(x), np.asarray(y)
        if x.shape != y.shape or x.dtype != y.dtype:
            return f"output {i}: {x.dtype} {x.shape} against {y.dtype} {y.shape}"
        if x.dtype.kind not in "fc":
            if not np.array_equal(x, y):
                return f"output {i} differs"
            continue
        tol = dict(rtol=2e-4, atol=2e-5) if single else dict(rtol=1e-9, atol=1e-10)
        fx, fy = np.isfinite(x), np.isfinite(y)
        if loose:  # Numba may be finite where the reference is not, never the other way
            if (~fy & fx).any():
                return f"output {i}: non-finite on Numba where the reference is finite"
            both = fx & fy
            if not np.allclose(x[both], y[both], **tol):
                return f"output {i}: values differ"
            continue
        if not (np.array_equal(fx, fy) and np.array_equal(np.isnan(x), np.isnan(y))
                and np.array_equal(x[~fx & ~np.isnan(x)], y[~fy & ~np.isnan(y)])):
            return f"output {i}: NaN or inf in other places"
        if not np.allclose(x[fx], y[fy], **tol):
            return f"output {i}: values differ by up to {np.max(np.abs(x[fx] - y[fy]))}"
    return None


def _describe(kind, value):
    if kind == "ok":
        return "returned"
    return f"{type(value).__name__}: {str(value).splitlines()[0][:200] if str(value) else ''}"


def verdict(case):
    """{"verdict", "detail"} of one case on both backends."""
    from fastformer.errors import FastformerError
    from fastformer.kernels import _resolve

    ref, fast = _resolve("numpy"), _resolve("numba")
    (rk, rv), (fk, fv) = _run(case, ref), _run(case, fast)
    detail = f"numpy {_describe(rk, rv)} | numba {_describe(fk, fv)}"
    if "build" in (rk, fk):
        return {"verdict": "differ", "detail": "the case cannot be built: " + detail}
    if rk == "raise" and fk == "raise":
        if isinstance(rv, FastformerError) and isinstance(fv, FastformerError):
            return {"verdict": "refused" if str(rv) == str(fv) else "differ", "detail": detail}
        if type(rv) is type(fv) and str(rv) == str(fv):
            return {"verdict": "unclean", "detail": detail}
        return {"verdict": "differ", "detail": detail}
    if rk == "raise":
        return {"verdict": "silent", "detail": detail}
    if fk == "raise":
        return {"verdict": "differ", "detail": detail}
    target, kind = case["mutation"].split(":")
    if (target.startswith("cache") and kind not in LAYOUT) or kind == "huge":
        # a cache of the right shapes whose values are not its forward's, or values near the end
        # of the float range, which overflow in one backend's order of operations and not in
        # the other's: nothing to agree on but that both accept the call
        return {"verdict": "same", "detail": "both accept it"}
    loose = case["op"] in LOOSE_NONFINITE and kind in VALUES
    why = compare(rv, fv, _dtype(case), loose)
    if why is None and kind in LAYOUT:  # a layout is no reason for another result
        base = _run({**case, "mutation": "none:none"}, ref)
        why = f"the unmutated call gave {_describe(*base)}" if base[0] != "ok" else \
            (None if compare(base[1], rv, _dtype(case)) is None else "the layout changed the result")
    return {"verdict": "same" if why is None else "differ", "detail": why or detail}


def all_cases(seeds=(1, 3)):
    """Every mutation of every kernel, once per seed (seed % 3 == 0 is float64)."""
    return [{"op": op, "mutation": m, "seed": s} for op in OPS for m in mutations(op) for s in seeds]


def run_child(cases, timeout=600):
    """Run `cases` in one child process; returns (results by index, the index of the case the
    child died in or None -- len(cases) when it died after the last one -- and its stderr)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([p for p in sys.path if p]))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], input="\n".join(map(json.dumps, cases)),
                          capture_output=True, text=True, timeout=timeout, env=env)
    results, started = {}, None
    for line in proc.stdout.splitlines():
        if line.startswith("start "):
            started = int(line.split()[1])
        elif line.startswith("{"):
            r = json.loads(line)
            results[r["i"]] = r
    crashed = started if proc.returncode != 0 and started not in results else None
    if proc.returncode != 0 and crashed is None:
        crashed = len(results)
    return results, crashed, proc.stderr[-2000:]


def probe(cases):
    """The result of every case; a crash is recorded and the rest run in a new child."""
    out, i = [], 0
    while i < len(cases):
        results, crashed, _ = run_child(cases[i:])
        n = len(results) if crashed is None else crashed
        out += [results[j] for j in range(n)]
        if crashed is None:
            break
        if i + n == len(cases):  # after its last case: memory that an earlier case corrupted
            out[-1] = {**out[-1], "verdict": "crash", "detail": "the child process died at exit"}
            break
        out.append({**cases[i + n], "verdict": "crash", "detail": "the child process died"})
        i += n + 1
    return out


def _child():
    from fastformer.kernels import _resolve

    _resolve("numba")
    try:
        for i, line in enumerate(sys.stdin):
            case = json.loads(line)
            print(f"start {i}", flush=True)
            print(json.dumps({"i": i, **case, **verdict(case)}), flush=True)
    finally:
        if _TMP:
            shutil.rmtree(_TMP[0], ignore_errors=True)


def _table(results):
    cols = ["refused", "same", "crash", "silent", "differ", "unclean"]
    rows = {}
    for r in results:
        rows.setdefault(r["op"], dict.fromkeys(cols, 0))[r["verdict"]] += 1
    total = {k: sum(r[k] for r in rows.values()) for k in cols}
    head = f"{'kernel':38} {'tried':>6} " + " ".join(f"{c:>8}" for c in cols)
    lines = [head]
    for op, r in list(rows.items()) + [("total", total)]:
        lines.append(f"{op:38} {sum(r.values()):6d} " + " ".join(f"{r[c]:8d}" for c in cols))
    return "\n".join(lines)


if __name__ == "__main__":
    if "--probe" in sys.argv:
        results = probe(all_cases())
        print(_table(results))
        if "--list" in sys.argv:
            for r in results:
                if r["verdict"] not in MODES:
                    print(r["verdict"], r["op"], r["mutation"], r["seed"], "--", r["detail"])
    else:
        _child()
