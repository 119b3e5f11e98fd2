"""`fastformer bench`: the speed of full training steps of a preset language model.

One step is what training does: forward, backward, and AdamW over the flat parameter buffer. The
preset (fastformer.training.config.preset) gives the model's sizes, the batch size and sequence
length (32 sequences of 128 ids for every preset) and the AdamW settings
(fastformer.training.optim.AdamW); the batch is fixed and synthetic, ids from a 4096-token
vocabulary (a BPE tokenizer's size; the presets' own follows the byte tokenizer's 259). After
warm-up steps (the first one also loads or compiles the Numba kernels) the timed steps give
steps/s and tokens/s (from the median step time), the model FLOPs of a step, the GFLOP/s that
makes, and its fraction of this machine's float32 GEMM peak, measured in the same process with a
large `np.matmul`.

Model FLOPs count the matmuls only, 2 per multiply-add, backward = 2 x forward: per token and
layer 2 (C 3C + C C + C F + F C) for the weights plus 2 (2 T C) for q k^T and p v (the full
T x T scores, as usually counted, although causal attention needs only half), plus 2 C V for
the LM head.

The builders here (`train_setup` and `make_train_step`, `make_generate`, `make_kernel_call`) are
what the asv and pytest-benchmark suites in benchmarks/, benchmarks/compare_torch.py and
benchmarks/profile_step.py time, so that every suite measures the same model, batch and inputs.
"""

import dataclasses
import json
import resource
import time
from typing import NamedTuple

import numpy as np

from fastformer import seeds
from fastformer.errors import FastformerError, check_choice, check_int
from fastformer.kernels import get_backend, get_ops, set_backend, use_backend, use_precision
from fastformer.models.lm import TransformerLM
from fastformer.training.config import MATMUL_PRECISION, preset
from fastformer.training.optim import AdamW

VOCAB = 4096  # the benchmarks' vocabulary: the LM head of a model with a BPE tokenizer
GEN_PROMPT, GEN_NEW = 16, 128  # generation benchmark: batch 1, greedy, new tokens after a prompt


def preset_config(name, vocab_size=VOCAB, seq_len=None):
    """The LMConfig of the preset `name` (fastformer.training.config), with `vocab_size` ids and
    room for `seq_len` positions when that is longer than the preset's."""
    cfg = preset(name).model
    return dataclasses.replace(cfg, vocab_size=vocab_size, max_seq_len=max(cfg.max_seq_len, seq_len or 0))


def batch_shape(name, batch=None, seq_len=None):
    """(B, T) of a training step of the preset `name`: its train.batch_size and train.seq_len,
    or the `batch` and `seq_len` given instead."""
    t = preset(name).train
    return (t.batch_size if batch is None else check_int("batch", batch),
            t.seq_len if seq_len is None else check_int("seq_len", seq_len))


def make_optimizer(model, name):
    """(AdamW over `model`'s flat buffer with the settings of the preset `name`, its learning
    rate): train.beta1, beta2, eps and weight_decay, and the peak rate train.lr."""
    t = preset(name).train
    return AdamW(model.flat, beta1=t.beta1, beta2=t.beta2, eps=t.eps, weight_decay=t.weight_decay), t.lr


def model_flops_per_step(cfg, B, T):
    """Matmul FLOPs of one training step (forward + backward) on a (B, T) batch."""
    C, F, V = cfg.d_model, cfg.d_ff, cfg.vocab_size
    per_token = cfg.n_layers * 2 * (C * 3 * C + C * C + C * F + F * C + 2 * T * C) + 2 * C * V
    return 3 * per_token * B * T


def gemm_peak_gflops(n=2048, repeats=5, precision="fp32"):
    """Best GFLOP/s of an (n, n) @ (n, n) float32 product in this process: NumPy's BLAS, or with
    bf16 the kernel interface's bfloat16 product (its packing included)."""
    rng = seeds.bench_stream()
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = a @ b
    ops = get_ops()
    best = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        ops.matmul(a, b, out=c, precision=MATMUL_PRECISION[precision])
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def gemm_shapes(preset):
    """{name: (M, K, N)} of the matrix products of a preset's training step: the rows of its batch
    (B x T) through the QKV, first FFN and head layers, and the head's weight gradient."""
    cfg = preset_config(preset)
    B, T = batch_shape(preset)
    C, F, N = cfg.d_model, cfg.d_ff, B * T
    return {"qkv": (N, C, 3 * C), "ffn_in": (N, C, F), "ffn_out": (N, F, C), "head": (N, C, VOCAB),
            "head_dweight": (VOCAB, N, C)}


def make_gemm(preset, name, precision="fp32", backend=None, seed=0):
    """A call of one matrix product of `gemm_shapes(preset)` (float32 arrays, out reused) in
    `precision` on `backend` (default: the current one); its packing included in bf16."""
    M, K, N = gemm_shapes(preset)[name]
    rng = seeds.bench_stream(seed)
    a, b = rng.standard_normal((M, K), dtype=np.float32), rng.standard_normal((K, N), dtype=np.float32)
    out = np.empty((M, N), np.float32)
    matmul = MATMUL_PRECISION[check_choice("precision", precision, ("fp32", "bf16"))]
    backend = backend or get_backend()

    def call():
        with use_backend(backend) as ops:
            ops.matmul(a, b, out=out, precision=matmul)

    return call


def make_linear_backward(preset, name, precision="fp32", backend=None, seed=0):
    """A call of ops.linear_backward of the linear layer of `gemm_shapes(preset)[name]` (rows M,
    inputs K, outputs N), with a bias gradient, in `precision` on `backend` (default: the current
    one): the weight's and the input's products, and in bf16 the packing of the output gradient."""
    M, K, N = gemm_shapes(preset)[name]
    rng = seeds.bench_stream(seed)
    x, weight = rng.standard_normal((M, K), dtype=np.float32), rng.standard_normal((K, N), dtype=np.float32)
    dout = rng.standard_normal((M, N), dtype=np.float32)
    dweight, dbias = np.empty((K, N), np.float32), np.empty(N, np.float32)
    matmul = MATMUL_PRECISION[check_choice("precision", precision, ("fp32", "bf16"))]
    backend = backend or get_backend()
    with use_backend(backend) as ops:
        _, cache = ops.linear_forward(x, weight, precision=matmul)

    def call():
        with use_backend(backend) as ops:
            ops.linear_backward(dout, cache, dweight, dbias)

    return call


def synthetic_batch(name, seed=0, batch=None, seq_len=None, vocab_size=VOCAB):
    """A fixed batch of random ids of the preset `name` and its next-token targets, each
    (B, T) int64 (batch_shape), ids below vocab_size."""
    B, T = batch_shape(name, batch, seq_len)
    ids = seeds.bench_stream(seed).integers(0, vocab_size, size=(B, T + 1))
    return ids[:, :-1], ids[:, 1:]


class TrainSetup(NamedTuple):
    """What one training step of a preset runs: model.loss_and_grads(ids, targets), then
    optimizer.step(lr)."""

    model: TransformerLM
    optimizer: AdamW
    lr: float
    ids: np.ndarray  # (B, T)
    targets: np.ndarray  # (B, T)


def train_setup(name, seed=0, batch=None, seq_len=None, vocab_size=VOCAB):
    """The TrainSetup of the preset `name`: its model (preset_config, weights from `seed`), its
    AdamW (make_optimizer) and the synthetic batch (synthetic_batch), of the preset's shape or
    of `batch` rows of `seq_len` tokens, over `vocab_size` ids."""
    model = TransformerLM(preset_config(name, check_int("vocab_size", vocab_size), seq_len), seed=seed)
    optimizer, lr = make_optimizer(model, name)
    return TrainSetup(model, optimizer, lr, *synthetic_batch(name, seed, batch, seq_len, vocab_size))


def make_train_step(preset, backend=None, seed=0, batch=None, seq_len=None, vocab_size=VOCAB, precision="fp32"):
    """(model, step) for one preset: `step()` runs one training step -- forward, backward and
    AdamW -- on a fixed synthetic batch (the preset's shape, or `batch` x `seq_len`, over
    `vocab_size` ids) with `backend` (default: the current one), its matrix products in
    `precision` (fp32 or bf16, train.precision's names), and returns the loss. Nothing is run yet:
    call `step()` once to warm up (load or compile the kernels)."""
    backend, matmul = backend or get_backend(), MATMUL_PRECISION[check_choice("precision", precision, ("fp32", "bf16"))]
    with use_backend(backend):
        s = train_setup(preset, seed, batch, seq_len, vocab_size)

    def step():
        with use_backend(backend), use_precision(matmul):
            loss, _ = s.model.loss_and_grads(s.ids, s.targets)
            s.optimizer.step(s.lr)
        return loss

    return s.model, step


def time_calls(fn, n):
    """(seconds of each of `n` calls of fn() as a list, the last call's result)."""
    times, out = [], None
    for _ in range(n):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return times, out


def generation_model(preset, seed=0, context=GEN_PROMPT + GEN_NEW):
    """The preset LM with a context long enough for the generation benchmark (prompt + new), or
    for `context` positions."""
    cfg = preset_config(preset)
    cfg = dataclasses.replace(cfg, max_seq_len=max(cfg.max_seq_len, context))
    return TransformerLM(cfg, seed=seed)


GEN_TOP_K = 50  # sampled generation (rows > 1): temperature 1 and transformers' default top-k


def generation_prompt(cfg, seed=0, rows=1, length=GEN_PROMPT):
    """The generation benchmark's prompts: (rows, length) random ids, int64."""
    return seeds.bench_stream(seed).integers(0, cfg.vocab_size, size=(check_int("rows", rows), length))


def make_generate(preset, backend=None, seed=0, new_tokens=GEN_NEW, rows=1, weights="fp32"):
    """(model, prompt, gen): `gen()` generates `new_tokens` tokens after the benchmark prompt
    with `backend` (default: the current one) and returns the ids: greedily for one row, and for
    `rows` > 1 prompts side by side sampled (temperature 1, top-k GEN_TOP_K). `weights`: the
    model's weight format (model.quantize)."""
    backend = backend or get_backend()
    model = generation_model(preset, seed)
    with use_backend(backend):
        model.quantize(weights)
    prompt = generation_prompt(model.config, seed, rows)
    sampled = dict(temperature=1.0, top_k=GEN_TOP_K, seed=seed) if rows > 1 else dict(temperature=0.0)

    def gen():
        with use_backend(backend):
            return model.generate(prompt, new_tokens, **sampled)

    return model, prompt, gen


def kernel_shapes(preset, seq_len=None):
    """Shape letters of a preset's training step: B, T, C, H, F, V; with `seq_len`, T is that
    and B keeps the step's tokens (B x T) where it can (at least 1)."""
    cfg, (B, T) = preset_config(preset), batch_shape(preset)
    if seq_len is not None:
        B, T = max(1, B * T // check_int("seq_len", seq_len)), seq_len
    return {"B": B, "T": T, "C": cfg.d_model, "H": cfg.n_heads, "F": cfg.d_ff, "V": cfg.vocab_size}


KERNEL_OPS = ("softmax_forward", "softmax_backward", "layernorm_forward", "layernorm_backward",
              "attention_forward", "attention_backward", "cross_entropy", "lm_head_cross_entropy",
              "gelu_forward", "gelu_backward", "adamw_update", "decode_step")


def make_kernel_call(op, preset, backend=None, seed=0, seq_len=None):
    """A zero-argument callable running one kernel of `backend` (default: the current one) once
    on the inputs a `preset` training step gives it (of `seq_len` tokens a row when given:
    kernel_shapes), built here (float32, random):

        softmax             attention scores (B, H, T, T)
        layernorm           the residual stream (B, T, C)
        attention           causal self-attention from the fused projection qkv (B, T, 3C)
        cross_entropy       forward and backward on the logits (B, T, V)
        lm_head_cross_entropy  the LM head fused with the cross-entropy, loss and gradients of
                            h (B, T, C) and the tied head (V, C): no (B, T, V) logits
        gelu                the MLP hidden layer (B, T, F) with its bias fused
        adamw_update        one step of the preset's AdamW over its model's flat parameter buffer
        decode_step         one generation step (batch 1) of the preset model after a 16-token
                            prompt: gpt2_decode_step over its key/value cache

    Backward calls reuse one forward cache made here.
    """
    if op not in KERNEL_OPS:
        raise FastformerError(f"unknown kernel benchmark {op!r}: valid names are {', '.join(KERNEL_OPS)}")
    backend = backend or get_backend()
    with use_backend(backend) as ops:
        S = kernel_shapes(preset, seq_len)
        B, T, C, H, F, V = (S[k] for k in "BTCHFV")
        rng = seeds.bench_stream(seed)

        def randn(*shape):
            return rng.standard_normal(shape, dtype=np.float32)

        kind = op.removesuffix("_forward").removesuffix("_backward")
        if kind == "softmax":
            scores = np.where(np.tri(T, dtype=bool), randn(B, H, T, T), -np.inf)  # (B, H, T, T), causal
            y, cache = ops.softmax_forward(scores)
            calls = {"softmax_forward": lambda: ops.softmax_forward(scores),
                     "softmax_backward": lambda: ops.softmax_backward(y, cache)}
        elif kind == "layernorm":
            x, w, b = randn(B, T, C), 1 + 0.1 * randn(C), 0.1 * randn(C)
            y, cache = ops.layernorm_forward(x, w, b)
            calls = {"layernorm_forward": lambda: ops.layernorm_forward(x, w, b),
                     "layernorm_backward": lambda: ops.layernorm_backward(y, cache)}
        elif kind == "attention":
            qkv = randn(B, T, 3 * C)  # (B, T, 3C)
            _, cache = ops.attention_qkv_forward(qkv, H, causal=True)
            dout = randn(B, T, C)
            calls = {"attention_forward": lambda: ops.attention_qkv_forward(qkv, H, causal=True),
                     "attention_backward": lambda: ops.attention_qkv_backward(dout, cache)}
        elif kind == "cross_entropy":
            logits = randn(B, T, V)  # (B, T, V)
            targets = rng.integers(0, V, size=(B, T))

            def cross_entropy():
                _, cache = ops.cross_entropy_forward(logits, targets)
                return ops.cross_entropy_backward(1.0, cache)

            calls = {"cross_entropy": cross_entropy}
        elif kind == "lm_head_cross_entropy":
            h, w = randn(B, T, C), 0.02 * randn(V, C)  # (B, T, C), (V, C)
            targets, dw = rng.integers(0, V, size=(B, T)), np.empty((V, C), np.float32)
            calls = {"lm_head_cross_entropy": lambda: ops.linear_cross_entropy_forward(h, w, targets, grad=True,
                                                                                        dweight=dw)}
        elif kind == "gelu":
            x, b = randn(B, T, F), 0.1 * randn(F)  # (B, T, F)
            y, cache = ops.gelu_forward(x, b, approximate="tanh")
            calls = {"gelu_forward": lambda: ops.gelu_forward(x, b, approximate="tanh"),
                     "gelu_backward": lambda: ops.gelu_backward(y, cache)}
        elif kind == "decode_step":
            model = generation_model(preset, seed)
            cache = model.init_state(1)
            model.step(generation_prompt(model.config, seed), cache)
            weights, ids, pos = model.packed_weights(), np.array([1]), np.array([GEN_PROMPT])
            calls = {"decode_step": lambda: ops.gpt2_decode_step(weights, ids, pos, cache.k, cache.v, cache.padding,
                                                                 GEN_PROMPT)}
        else:
            model = TransformerLM(preset_config(preset), seed=seed)
            model.flat.grad[...] = 1e-3 * randn(model.flat.grad.size)
            opt, lr = make_optimizer(model, preset)
            calls = {"adamw_update": lambda: opt.step(lr)}
    fn = calls[op]

    def call():
        with use_backend(backend):
            return fn()

    return call


def run(preset, backend=None, steps=10, warmup=2, seed=0, batch=None, seq_len=None, precision="fp32"):
    """Time `steps` training steps of `preset` (on `batch` rows of `seq_len` tokens when given);
    returns a dict of the figures."""
    check_int("steps", steps)
    check_int("warmup", warmup)
    t_start = time.perf_counter()
    if backend is not None:
        set_backend(backend)
    ops = get_ops()
    model, step = make_train_step(preset, seed=seed, batch=batch, seq_len=seq_len, precision=precision)
    cfg, (B, T) = model.config, batch_shape(preset, batch, seq_len)

    step()
    first_step_s = time.perf_counter() - t_start  # backend load (or compile) + model + one step
    for _ in range(warmup - 1):
        step()
    times, loss = time_calls(step, steps)
    step_s = float(np.median(times))
    flops = model_flops_per_step(cfg, B, T)
    peak = gemm_peak_gflops(precision=precision)
    from fastformer.kernels.process import process_info

    return {
        "preset": preset, "backend": ops.name, "precision": precision, "config": dataclasses.asdict(cfg),
        "batch": B, "seq_len": T,
        "steps": steps, "step_s_median": step_s, "step_s_min": float(min(times)),
        "steps_per_s": 1.0 / step_s, "tokens_per_s": B * T / step_s,
        "model_flops_per_step": flops, "gflops_per_s": flops / step_s / 1e9,
        "gemm_peak_gflops_per_s": peak, "fraction_of_gemm_peak": flops / step_s / 1e9 / peak,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "first_step_s": first_step_s, "final_loss": float(loss), "threads": process_info(),
    }


def format_report(r):
    return "\n".join([
        f"fastformer bench: preset {r['preset']} ({r['config']['d_model']}d, {r['config']['n_heads']} heads, "
        f"d_ff {r['config']['d_ff']}, {r['config']['n_layers']} layers, vocab {r['config']['vocab_size']}), "
        f"batch {r['batch']} x seq {r['seq_len']}, backend {r['backend']}, precision {r['precision']}",
        f"  steps/s           {r['steps_per_s']:.2f}   "
        f"(median of {r['steps']} steps: {r['step_s_median'] * 1e3:.1f} ms)",
        f"  tokens/s          {r['tokens_per_s']:,.0f}",
        f"  model FLOPs/step  {r['model_flops_per_step'] / 1e9:.2f} GFLOP",
        f"  achieved          {r['gflops_per_s']:.1f} GFLOP/s = {100 * r['fraction_of_gemm_peak']:.1f}% of the "
        f"measured {'bfloat16' if r['precision'] == 'bf16' else 'float32'} GEMM peak "
        f"({r['gemm_peak_gflops_per_s']:.1f} GFLOP/s)",
        f"  peak RSS          {r['peak_rss_mb']:.0f} MB",
        f"  first step        {r['first_step_s']:.2f} s after start (backend load/compile + model + step)",
        f"  threads           {numba_line(r['threads'])}",
        *(f"  BLAS              {line}" for line in r["threads"]["blas"]),
        f"  CPU               {cpu_line(r['threads'])}",
    ])


def numba_line(info):
    """Numba's thread count and threading layer, when its backend has started them."""
    if not isinstance(info.get("numba_threads"), int):
        return "numba not started (numpy backend)" if info.get("numba_version") else "Numba not installed"
    return f"numba {info['numba_threads']} ({info['numba_threading_layer']})"


def cpu_line(info):
    """The CPU's vector extension, and a BLAS kernel set pinned in the environment: on an
    AVX-512 CPU, OpenBLAS pinned to Haswell's kernels (AVX2) runs GEMMs at about half the rate."""
    pinned = info.get("OPENBLAS_CORETYPE")
    return (f"{info.get('cpu_vector_isa') or 'vector extensions unknown'}"
            f"{f'; OpenBLAS kernels pinned by OPENBLAS_CORETYPE={pinned}' if pinned else ''}")


def main(args):
    r = run(args.preset, backend=args.backend, steps=args.steps, batch=args.batch, seq_len=args.seq_len,
            precision=args.precision)
    print(json.dumps(r) if args.json else format_report(r))


def add_parser(sub):
    from fastformer.training.config import PRESETS

    p = sub.add_parser("bench", help="time full training steps of a preset model")
    p.add_argument("--preset", required=True, choices=list(PRESETS))
    p.add_argument("--backend", choices=["auto", "numpy", "numba"], default=None)
    p.add_argument("--steps", type=int, default=10, help="timed steps after warm-up (default 10)")
    p.add_argument("--batch", type=int, default=None, help="rows per step (default: the preset's batch size)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per row (default: the preset's; longer ones get positions of their own)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="the step's matrix products: fp32, or bf16 (bfloat16 products; default fp32)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=main)
