"""The PyTorch side of compare_torch.py: PyTorch eager, `torch.compile` and transformers, each in a
process of its own that never imports fastformer.

The parent (compare_torch.py) writes what a contender needs into a directory of plain files, and
this side reads them with NumPy: for training, the model's sizes and the AdamW settings of the
preset (spec.json), fastformer's initial weights (weights.npz) and the synthetic batch
(batch.npz); for generation, a Hugging Face GPT-2 directory of fastformer's weights (hf/), the
prompt (prompt.npy), fastformer's logits of it (logits.npy) and the number of new tokens
(spec.json). So neither library's threads, BLAS settings or OpenMP runtime are in the other's
process, in either direction.

`serve` is the loop every contender, fastformer's too, answers the parent with.

A contender named with the suffix " + fastformer's settings" first applies to its own process
what fastformer applies to itself (the glibc allocator policy of
fastformer.kernels.process.keep_freed_memory and the short OpenBLAS spin), so that a comparison
can tell the kernels apart from the process settings.

    python benchmarks/torch_contenders.py PART CONTENDER THREADS INPUTS    # started by compare_torch.py
"""

import json
import os
import re
import resource
import sys
import time

import numpy as np


def time_calls(fn, n):
    """Seconds of each of `n` calls of fn(), as a list."""
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def blas_in_use():
    """The BLAS libraries this process has loaded, with the kernel set each runs, as a string:
    threadpoolctl's view of the shared libraries, and PyTorch's own build (it links its BLAS
    statically) when torch is imported."""
    import threadpoolctl

    parts = [f"{d.get('internal_api')} {d.get('version')} ({d.get('architecture') or '?'} kernels, "
             f"{os.path.basename(d['filepath'])})" for d in threadpoolctl.threadpool_info()
             if d.get("user_api") == "blas"]
    if "torch" in sys.modules:
        import torch

        config = torch.__config__.show()
        blas = re.search(r"BLAS_INFO=(\w+)", config)
        parts.append(f"torch: {blas.group(1) if blas else '?'} BLAS, "
                     f"{torch.backends.cpu.get_cpu_capability()} kernels")
    return "; ".join(parts)


def keep_freed_memory():
    """The allocator policy fastformer sets in its own process (fastformer.kernels.process'
    function of the same name, which this process cannot import): glibc serves large arrays from
    its heap and keeps freed memory. For the "+ fastformer's settings" torch contenders only."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


def serve(setup):
    """Make the contender -- setup() returns (function to time, check) -- and say
    {"ready": check, "blas": the BLAS in use} (or {"error": text}) on stdout; then, for each line
    N on stdin, time N calls and answer {"times": [seconds, ...], "peak_rss_mb": the process's
    peak resident memory}, until stdin closes."""
    try:
        fn, check = setup()
    except Exception as e:  # reported by the parent: fatal but for torch.compile
        first = str(e).splitlines()[0][:200] if str(e) else ""
        print(json.dumps({"error": f"{type(e).__name__}: {first}"}), flush=True)
        return
    print(json.dumps({"ready": check, "blas": blas_in_use()}), flush=True)
    for line in sys.stdin:
        times = time_calls(fn, int(line))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
        print(json.dumps({"times": times, "peak_rss_mb": peak}), flush=True)


class Worker:
    """The parent's side of `serve`: a contender's process driven over its stdin and stdout."""

    def __init__(self, name, cmd, env=None):
        import subprocess

        self.name = name
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def answer(self):
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the {self.name} worker ended without an answer (exit code {self.proc.wait()})")
        return json.loads(line)

    def times(self, n):
        """{"times": seconds of n calls, "peak_rss_mb": the process's peak resident memory}."""
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        return self.answer()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def read_spec(inputs):
    with open(os.path.join(inputs, "spec.json"), encoding="utf-8") as f:
        return json.load(f)


class TorchGPT:
    """fastformer's TransformerLM (tied embeddings, pre-LN, GELU(tanh), causal attention) in
    PyTorch eager ops, weights (in, out) as in GPT-2, with torch.optim.AdamW over the same decay
    and no-decay groups as fastformer's optimizer."""

    def __init__(self, spec, state, compile=False, autocast=False):
        import torch

        self.spec, self.autocast = spec, autocast
        self.loss_fn = torch.compile(self.loss) if compile else self.loss
        self.p = {n: torch.nn.Parameter(torch.tensor(a)) for n, a in state.items()}
        decay = set(spec["decay"])
        groups = [{"params": [p for n, p in self.p.items() if n in decay], "weight_decay": spec["weight_decay"]},
                  {"params": [p for n, p in self.p.items() if n not in decay], "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW(groups, lr=spec["lr"], betas=(spec["beta1"], spec["beta2"]), eps=spec["eps"])

    def loss(self, ids, targets):
        import torch
        import torch.nn.functional as TF

        P, s = self.p, self.spec
        B, T = ids.shape
        C, H = s["d_model"], s["n_heads"]

        def ln(x, name):
            return TF.layer_norm(x, (C,), P[name + ".weight"], P[name + ".bias"], eps=1e-5)

        def linear(x, name):
            return torch.addmm(P[name + ".bias"], x.reshape(-1, x.shape[-1]), P[name + ".weight"]).view(B, T, -1)

        x = P["transformer.wte.weight"][ids] + P["transformer.wpe.weight"][:T]
        for i in range(s["n_layers"]):
            p = f"transformer.h.{i}."
            qkv = linear(ln(x, p + "ln_1"), p + "attn.c_attn")
            q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in qkv.split(C, dim=2))
            a = TF.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
            x = x + linear(a, p + "attn.c_proj")
            h = TF.gelu(linear(ln(x, p + "ln_2"), p + "mlp.c_fc"), approximate="tanh")
            x = x + linear(h, p + "mlp.c_proj")
        logits = ln(x, "transformer.ln_f") @ P["transformer.wte.weight"].T
        return TF.cross_entropy(logits.view(-1, s["vocab_size"]), targets.reshape(-1))

    def step(self, ids, targets):
        import torch

        self.opt.zero_grad(set_to_none=True)
        # PyTorch's documented CPU mixed precision: the forward under autocast, the backward outside it
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.loss_fn(ids, targets)
        loss.backward()
        self.opt.step()
        return float(loss.detach())


def train_call(contender, inputs):
    """(step function, the first step's loss) of "torch eager" or "torch.compile", warmed up; with
    the suffix BF16, under torch.autocast to bfloat16."""
    import torch

    with np.load(os.path.join(inputs, "weights.npz")) as w:
        state = dict(w)
    with np.load(os.path.join(inputs, "batch.npz")) as b:
        x, y = torch.from_numpy(b["ids"]), torch.from_numpy(b["targets"])
    net = TorchGPT(read_spec(inputs), state, compile=contender.startswith("torch.compile"),
                   autocast=contender.endswith(BF16))
    first = net.step(x, y)  # compiles for torch.compile
    return (lambda: net.step(x, y)), first


def generate_call(contender, inputs):
    """(generate function, the largest difference of its prompt logits to fastformer's) of
    "transformers": GPT2LMHeadModel.generate with the key/value cache, greedy for one prompt,
    sampled (temperature 1, the spec's top-k) for several."""
    import torch
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging

    logging.disable_progress_bar()
    hf = GPT2LMHeadModel.from_pretrained(os.path.join(inputs, "hf"), local_files_only=True).eval()
    spec = read_spec(inputs)
    new_tokens = spec["new_tokens"]
    prompt = torch.from_numpy(np.load(os.path.join(inputs, "prompt.npy")))  # (rows, P)
    sampled = dict(do_sample=True, temperature=1.0, top_k=spec["top_k"]) if len(prompt) > 1 else dict(do_sample=False)
    with torch.inference_mode():
        diff = float(np.abs(hf(prompt).logits[0].numpy() - np.load(os.path.join(inputs, "logits.npy"))).max())

    def fn():
        with torch.inference_mode():
            return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, use_cache=True, pad_token_id=0, **sampled)

    fn()
    return fn, diff


SETTINGS = " + fastformer's settings"  # the suffix of a contender run with fastformer's process settings
BF16 = " bf16"  # the suffix of a training contender in bfloat16: fastformer's train.precision, torch's autocast


def main():
    part, contender, threads, inputs = sys.argv[1:]
    if contender.endswith(SETTINGS):  # what fastformer.kernels.process.apply_process_settings does to its process
        contender = contender[:-len(SETTINGS)]
        os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "18")  # before any BLAS loads
        keep_freed_memory()
    import torch

    torch.set_num_threads(int(threads))
    serve(lambda: (train_call if part == "train" else generate_call)(contender, inputs))


if __name__ == "__main__":
    main()
