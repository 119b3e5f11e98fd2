"""fastformer against PyTorch on the same model: training steps/s and generation tokens/s.

Training: the same GPT-2-layout model (tied embeddings, pre-LN, GELU(tanh), causal attention) is
built in PyTorch from fastformer's initial weights and trained on the same synthetic batch
(32 x 128 ids, vocabulary 4096) with the same AdamW settings, by fastformer's NumPy and Numba
backends, PyTorch eager, and `torch.compile` (inductor; the loss with its backward compiled, the
optimizer eager). The first losses are checked to agree before anything is timed; a
`torch.compile` that fails is reported in the table, not fatal.

Generation: batch 1, greedy, 128 new tokens after a 16-token prompt, by
`TransformerLM.generate` and by `transformers.GPT2LMHeadModel.generate` (use_cache=True) on the
same weights, moved through `fastformer.models.hf.save_hf` and `from_pretrained`. The prompt's logits
are checked to agree first.

Every contender runs in a process of its own, as it would for a user: fastformer's without
torch, so each library keeps its own thread pools and OpenMP runtime. The processes start, build
their model and warm up (compile) first; then the contenders take turns, one at a time, for
`--rounds` rounds, while the others wait on a pipe. Numba, BLAS and PyTorch are fixed to the
same number of threads (the cores); each figure is the rate of the median time over all of a
contender's timed calls.

    python benchmarks/compare_torch.py                                  # everything (~3 min here)
    python benchmarks/compare_torch.py --presets tiny --rounds 1 --no-compile   # a quick look
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from fastformer.cli import bench
from fastformer.kernels.threads import num_threads

LR, WEIGHT_DECAY = 1e-3, 0.1
TRAIN_CONTENDERS = ("numpy", "numba", "torch eager", "torch.compile")
GEN_CONTENDERS = ("numpy", "numba", "transformers")
PAUSE = 0.2  # seconds between two contenders' turns, so one's idle threads are asleep before the next


class TorchGPT:
    """The fastformer TransformerLM in PyTorch eager ops, weights (in, out) as in GPT-2."""

    def __init__(self, cfg, state, compile=False):
        import torch

        self.cfg = cfg
        self.loss_fn = torch.compile(self.loss) if compile else self.loss
        self.p = {n: torch.nn.Parameter(torch.tensor(np.array(a))) for n, a in state.items()}
        decay = [p for n, p in self.p.items() if p.ndim == 2 and n != "transformer.wpe.weight"]
        rest = [p for n, p in self.p.items() if not (p.ndim == 2 and n != "transformer.wpe.weight")]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                      {"params": rest, "weight_decay": 0.0}], lr=LR)

    def loss(self, ids, targets):
        import torch
        import torch.nn.functional as TF

        P, cfg = self.p, self.cfg
        B, T = ids.shape
        C, H = cfg.d_model, cfg.n_heads

        def ln(x, name):
            return TF.layer_norm(x, (C,), P[name + ".weight"], P[name + ".bias"], eps=1e-5)

        def linear(x, name):
            return torch.addmm(P[name + ".bias"], x.reshape(-1, x.shape[-1]), P[name + ".weight"]).view(B, T, -1)

        x = P["transformer.wte.weight"][ids] + P["transformer.wpe.weight"][:T]
        for i in range(cfg.n_layers):
            p = f"transformer.h.{i}."
            qkv = linear(ln(x, p + "ln_1"), p + "attn.c_attn")
            q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in qkv.split(C, dim=2))
            a = TF.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
            x = x + linear(a, p + "attn.c_proj")
            h = TF.gelu(linear(ln(x, p + "ln_2"), p + "mlp.c_fc"), approximate="tanh")
            x = x + linear(h, p + "mlp.c_proj")
        logits = ln(x, "transformer.ln_f") @ P["transformer.wte.weight"].T
        return TF.cross_entropy(logits.view(-1, cfg.vocab_size), targets.reshape(-1))

    def step(self, ids, targets):
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(ids, targets)
        loss.backward()
        self.opt.step()
        return float(loss.detach())


# --- the worker side: one contender, one preset, in its own process ---

def train_call(contender, preset):
    """(step function, the first step's loss) of a training contender, warmed up."""
    if contender in ("numpy", "numba"):
        _, fn = bench.make_train_step(preset, contender)
        return fn, float(fn())
    import torch

    model, _ = bench.make_train_step(preset, "numpy")
    x, y = (torch.from_numpy(a) for a in bench.synthetic_batch(model.config))
    net = TorchGPT(model.config, model.state_dict(), compile=contender == "torch.compile")
    first = net.step(x, y)  # compiles for torch.compile
    return (lambda: net.step(x, y)), first


def hf_gpt2(model, tmp):
    """transformers.GPT2LMHeadModel with `model`'s weights, via a Hugging Face directory."""
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging

    from fastformer.models.hf import save_hf

    logging.disable_progress_bar()
    save_hf(model, tmp)
    return GPT2LMHeadModel.from_pretrained(tmp).eval()


def generate_call(contender, preset):
    """(generate function, the largest logit difference to fastformer's on the prompt, or 0)."""
    if contender in ("numpy", "numba"):
        _, _, fn = bench.make_generate(preset, contender)
        fn()
        return fn, 0.0
    import torch

    model, prompt, _ = bench.make_generate(preset, "numpy")
    with tempfile.TemporaryDirectory() as tmp:
        hf = hf_gpt2(model, tmp)
    tprompt = torch.from_numpy(prompt)
    with torch.inference_mode():
        diff = float(np.abs(hf(tprompt).logits[0].numpy() - model.forward(prompt[0])).max())

    def fn():
        with torch.inference_mode():
            return hf.generate(tprompt, attention_mask=torch.ones_like(tprompt), max_new_tokens=bench.GEN_NEW,
                               min_new_tokens=bench.GEN_NEW, do_sample=False, use_cache=True, pad_token_id=0)

    fn()
    return fn, diff


def worker(part, contender, preset, threads):
    """Set up one contender, say {"ready": check} (or {"error": text}) on stdout, then for each
    line N on stdin time N calls and answer {"times": [seconds, ...]}, until stdin closes."""
    if contender in ("numpy", "numba"):
        from fastformer.kernels.threads import configure_threads

        configure_threads(threads)
    else:
        import torch

        torch.set_num_threads(threads)
    try:
        fn, check = (train_call if part == "train" else generate_call)(contender, preset)
    except Exception as e:  # reported by the parent: fatal but for torch.compile
        first = str(e).splitlines()[0][:200] if str(e) else ""
        print(json.dumps({"error": f"{type(e).__name__}: {first}"}), flush=True)
        return
    print(json.dumps({"ready": check}), flush=True)
    for line in sys.stdin:
        print(json.dumps({"times": bench.time_calls(fn, int(line))[0]}), flush=True)


# --- the parent side ---

class Contender:
    """A worker process of this script, driven over its stdin and stdout."""

    def __init__(self, part, name, preset, threads):
        self.name = name
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", part, name, preset, str(threads)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def answer(self):
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the {self.name} worker ended without an answer (exit code {self.proc.wait()})")
        return json.loads(line)

    def times(self, n):
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        return self.answer()["times"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def run_contenders(part, names, preset, threads, rounds, calls):
    """({name: 1 / median seconds per call}, {name: ready check}, {name: error text}).
    calls(name) is the number of timed calls a turn."""
    started = [Contender(part, name, preset, threads) for name in names]
    running, checks, failed = [], {}, {}
    try:
        for c in started:  # they set up and warm up (compile) side by side; nothing is timed yet
            ready = c.answer()
            if "error" in ready:
                failed[c.name] = f"failed: {ready['error']}"
            else:
                checks[c.name] = ready["ready"]
                running.append(c)
        times = {c.name: [] for c in running}
        for _ in range(rounds):
            for c in running:
                time.sleep(PAUSE)
                times[c.name] += c.times(calls(c.name))
    finally:
        for c in started:
            c.close()
    return {name: 1.0 / float(np.median(ts)) for name, ts in times.items()}, checks, failed


def compare_training(preset, rounds, steps, numpy_steps, with_compile, threads):
    """{contender: steps/s, or the error text of a torch.compile that failed}."""
    names = [n for n in TRAIN_CONTENDERS if with_compile or n != "torch.compile"]
    rates, first, failed = run_contenders("train", names, preset, threads, rounds,
                                          lambda name: numpy_steps if name == "numpy" else steps)
    for name in failed:
        if name != "torch.compile":
            raise SystemExit(f"{preset}: {name} {failed[name]}")
    if max(first.values()) - min(first.values()) > 1e-3 * abs(first["torch eager"]):
        raise SystemExit(f"{preset}: the first losses disagree: {first}")
    return {**rates, **failed}


def compare_generation(preset, rounds, threads):
    """{contender: tokens/s} of batch-1 greedy generation after the benchmark prompt."""
    rates, diffs, failed = run_contenders("generate", GEN_CONTENDERS, preset, threads, rounds, lambda name: 1)
    if failed:
        raise SystemExit(f"{preset}: {failed}")
    if diffs["transformers"] > 1e-3:
        raise SystemExit(f"{preset}: fastformer and transformers logits differ by {diffs['transformers']:.2e}")
    return {name: bench.GEN_NEW * r for name, r in rates.items()}


def cell(value, width):
    """A rate, or "failed" / "-" for a contender that failed / was not run."""
    if isinstance(value, float):
        return f"{value:{width}.2f}"
    return f"{'failed' if value.startswith('failed') else '-':>{width}s}"


def ratio(a, b):
    return f"{a / b:9.2f}x" if isinstance(b, float) else f"{'-':>10s}"


def main():
    if len(sys.argv) == 6 and sys.argv[1] == "--worker":
        return worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "small", "medium"], choices=list(bench.PRESETS))
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    ap.add_argument("--steps", type=int, default=5, help="timed training steps per round (numba, torch)")
    ap.add_argument("--numpy-steps", type=int, default=1, help="timed training steps per round (numpy backend)")
    ap.add_argument("--gen-rounds", type=int, default=5, help="alternating generation rounds (default 5)")
    ap.add_argument("--no-compile", action="store_true", help="leave out torch.compile")
    ap.add_argument("--parts", nargs="+", default=["train", "generate"], choices=["train", "generate"])
    ap.add_argument("--threads", type=int, default=None,
                    help="threads of every contender (default: FASTFORMER_NUM_THREADS, else the cores)")
    args = ap.parse_args()

    n = args.threads or num_threads()
    torch_version = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"],
                                   capture_output=True, text=True).stdout.strip() or "not installed"
    print(f"threads: {n} (numba, BLAS, torch), one process per contender; torch {torch_version}")
    failures = []
    if "train" in args.parts:
        print(f"\ntraining steps/s, batch {bench.BATCH} x seq {bench.SEQ_LEN}, vocab {bench.VOCAB}, AdamW; "
              f"median over {args.rounds} rounds of {args.steps} steps ({args.numpy_steps} for numpy)")
        print(f"{'preset':8s} {'numpy':>8s} {'numba':>8s} {'eager':>8s} {'compile':>8s}   "
              f"{'numba/numpy':>11s} {'numba/eager':>11s} {'numba/compile':>13s}")
        for preset in args.presets:
            r = compare_training(preset, args.rounds, args.steps, args.numpy_steps, not args.no_compile, n)
            comp = r.get("torch.compile", "not run")
            if isinstance(comp, str) and comp != "not run":
                failures.append(f"{preset}: torch.compile {comp}")
            print(f"{preset:8s} {r['numpy']:8.2f} {r['numba']:8.2f} {r['torch eager']:8.2f} {cell(comp, 8)}   "
                  f"{ratio(r['numba'], r['numpy']):>11s} {ratio(r['numba'], r['torch eager']):>11s} "
                  f"{ratio(r['numba'], comp):>13s}", flush=True)
    if "generate" in args.parts:
        print(f"\ngeneration tokens/s, batch 1, greedy, {bench.GEN_NEW} new tokens after {bench.GEN_PROMPT}; "
              f"median over {args.gen_rounds} rounds; transformers = GPT2LMHeadModel.generate(use_cache=True)")
        print(f"{'preset':8s} {'numpy':>9s} {'numba':>9s} {'transformers':>12s}   "
              f"{'numba/transformers':>18s} {'numpy/transformers':>18s}")
        for preset in args.presets:
            r = compare_generation(preset, args.gen_rounds, n)
            print(f"{preset:8s} {r['numpy']:9.1f} {r['numba']:9.1f} {r['transformers']:12.1f}   "
                  f"{ratio(r['numba'], r['transformers']):>18s} {ratio(r['numpy'], r['transformers']):>18s}",
                  flush=True)
    for line in failures:
        print(line)


if __name__ == "__main__":
    main()
