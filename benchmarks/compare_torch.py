"""fastformer against PyTorch on the same model: training steps/s and generation tokens/s.

Training: the step of `fastformer bench` (fastformer.cli.bench.train_setup: a preset's model,
its batch size, sequence length and AdamW settings, a synthetic batch from a 4096-id
vocabulary), by fastformer's NumPy and Numba backends, and the same GPT-2-layout model built in
PyTorch from fastformer's initial weights and trained on the same batch with the same AdamW
settings, eager and with `torch.compile` (inductor; the loss with its backward compiled, the
optimizer eager). The first losses are checked to agree before anything is timed; a
`torch.compile` that fails is reported in the table, not fatal.

Generation: batch 1, greedy, 128 new tokens after a 16-token prompt, by
`TransformerLM.generate` and by `transformers.GPT2LMHeadModel.generate` (use_cache=True) on the
same weights, moved through `fastformer.models.hf.save_hf` and `from_pretrained`. The prompt's logits
are checked to agree first.

Every contender runs in a process of its own, as it would for a user: fastformer's never imports
torch, and PyTorch's (benchmarks/torch_contenders.py) never import fastformer -- this process
writes their sizes, settings, weights and inputs to files for them -- so each library keeps its
own thread pools, BLAS settings and OpenMP runtime. The processes start, build
their model and warm up (compile) first; then the contenders take turns, one at a time, for
`--rounds` rounds, while the others wait on a pipe. Numba, BLAS and PyTorch are fixed to the
same number of threads (the cores); each figure is the rate of the median time over all of a
contender's timed calls.

    python benchmarks/compare_torch.py                                  # everything (~3 min here)
    python benchmarks/compare_torch.py --presets tiny --rounds 1 --no-compile   # a quick look

With `--baseline DIR` (another checkout of fastformer, e.g. `git worktree add DIR main`), that
checkout's backends take their turns too, as "numba@base" and "numpy@base" (and with --bf16
"numba bf16@base"), each in its own process importing DIR's fastformer, and a last table gives
this checkout's rates over the baseline's: before and after a change, measured side by side.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from torch_contenders import BF16, SETTINGS, Worker, serve

from fastformer.cli import bench
from fastformer.kernels.process import num_threads
from fastformer.training.config import PRESETS

TRAIN_CONTENDERS = ("numpy", "numba", "torch eager", "torch eager" + SETTINGS, "torch.compile",
                    "torch.compile" + SETTINGS)
BF16_CONTENDERS = ("numba" + BF16, "torch eager" + BF16, "torch.compile" + BF16)  # --bf16: train.precision, autocast
BLAS_PINS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")  # variables that choose OpenBLAS's kernels for it
GEN_CONTENDERS = ("numpy", "numba", "transformers")
FASTFORMER = ("numpy", "numba")  # the contenders run by this file; the others by torch_contenders.py
BASE = "@base"  # suffix of the contenders run from the --baseline checkout
BASELINE = {}  # {"dir": the --baseline checkout} when given
HERE = os.path.dirname(os.path.abspath(__file__))
PAUSE = 0.2  # seconds between two contenders' turns, so one's idle threads are asleep before the next


# --- the fastformer side: one backend, one preset, in its own process ---

def train_call(backend, preset, shape):
    """(step function, the first step's loss) of fastformer's `backend`, warmed up; `shape` is
    (batch, seq_len, vocab_size), None for the preset's (the benchmarks' vocabulary)."""
    backend, precision = (backend.removesuffix(BF16), "bf16") if backend.endswith(BF16) else (backend, "fp32")
    _, fn = bench.make_train_step(preset, backend, batch=shape[0], seq_len=shape[1],
                                  vocab_size=shape[2] or bench.VOCAB, precision=precision)
    return fn, float(fn())


def generate_call(backend, preset, shape):
    """(generate function, 0: the reference the others are checked against) of `backend`, warmed
    up; shape[0] is the number of prompts (None: 1, greedy)."""
    _, _, fn = bench.make_generate(preset, backend, rows=shape[0] or 1)
    fn()
    return fn, 0.0


def worker(part, backend, preset, threads, batch, seq_len, vocab_size):
    """One fastformer contender, answering the parent through torch_contenders.serve; batch,
    seq_len and vocab_size 0 for the defaults."""
    from fastformer.kernels.process import apply_process_settings

    apply_process_settings(threads)
    shape = (batch or None, seq_len or None, vocab_size or None)
    serve(lambda: (train_call if part == "train" else generate_call)(backend, preset, shape))


def write_inputs(part, preset, inputs, shape=(None, None, None)):
    """Write into the directory `inputs` what the PyTorch contenders of `part` need for `preset`,
    as plain files (see torch_contenders.py): fastformer's model, inputs and settings; `shape`
    (batch, seq_len, vocab_size) of a training step, None for the defaults."""
    if part == "train":
        s = bench.train_setup(preset, batch=shape[0], seq_len=shape[1], vocab_size=shape[2] or bench.VOCAB)
        cfg, opt, flat = s.model.config, s.optimizer, s.model.flat
        assert cfg.tie_embeddings, "TorchGPT models the tied LM head of the presets"
        spec = dict(d_model=cfg.d_model, n_heads=cfg.n_heads, n_layers=cfg.n_layers, vocab_size=cfg.vocab_size,
                    lr=s.lr, beta1=opt.beta1, beta2=opt.beta2, eps=opt.eps, weight_decay=opt.weight_decay,
                    decay=[n for n, o in flat.offsets.items() if o < flat.n_decay])  # the decayed tensors
        np.savez(os.path.join(inputs, "weights.npz"), **s.model.state_dict())
        np.savez(os.path.join(inputs, "batch.npz"), ids=s.ids, targets=s.targets)
    else:
        from fastformer.models.hf import save_hf

        model, prompt, _ = bench.make_generate(preset, "numpy", rows=shape[0] or 1)
        save_hf(model, os.path.join(inputs, "hf"))
        np.save(os.path.join(inputs, "prompt.npy"), prompt)
        np.save(os.path.join(inputs, "logits.npy"), model.forward(prompt[0]))
        spec = dict(new_tokens=bench.GEN_NEW, top_k=bench.GEN_TOP_K)
    with open(os.path.join(inputs, "spec.json"), "w", encoding="utf-8") as f:
        json.dump(spec, f)


# --- the parent side ---

class Contender(Worker):
    """A worker process -- this script for fastformer, torch_contenders.py for the others --
    driven over its stdin and stdout."""

    def __init__(self, part, name, preset, threads, inputs, env, shape):
        if name.endswith(BASE):  # the same worker, from the baseline checkout and importing its fastformer
            base = BASELINE["dir"]
            cmd = [sys.executable, os.path.join(base, "benchmarks", "compare_torch.py"), "--worker", part,
                   name.removesuffix(BASE), preset, str(threads), *(str(x or 0) for x in shape)]
            env = {**env, "PYTHONPATH": os.pathsep.join(p for p in (base, env.get("PYTHONPATH")) if p)}
        elif name.removesuffix(BF16) in FASTFORMER:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", part, name, preset, str(threads),
                   *(str(x or 0) for x in shape)]
        else:
            cmd = [sys.executable, os.path.join(HERE, "torch_contenders.py"), part, name, str(threads), inputs]
        super().__init__(name, cmd, env)


def run_contenders(part, names, preset, threads, rounds, calls, env, shape=(None, None, None)):
    """({name: 1 / median seconds per call}, {name: ready check}, {name: error text}), and
    records each contender's BLAS in BLAS_SEEN. calls(name) is the number of timed calls a turn;
    env the environment of the contenders' processes; shape (batch, seq_len, vocab_size) of a
    training step. Each contender's peak RSS goes into PEAK_RSS."""
    with tempfile.TemporaryDirectory() as inputs:
        write_inputs(part, preset, inputs, shape)
        started = [Contender(part, name, preset, threads, inputs, env, shape) for name in names]
        running, checks, failed = [], {}, {}
        try:
            for c in started:  # they set up and warm up (compile) side by side; nothing is timed yet
                ready = c.answer()
                if "error" in ready:
                    failed[c.name] = f"failed: {ready['error']}"
                else:
                    checks[c.name] = ready["ready"]
                    BLAS_SEEN.setdefault(ready["blas"], []).append(c.name)
                    running.append(c)
            times = {c.name: [] for c in running}
            for _ in range(rounds):
                for c in running:
                    time.sleep(PAUSE)
                    answer = c.times(calls(c.name))
                    times[c.name] += answer["times"]
                    PEAK_RSS[c.name] = answer["peak_rss_mb"]
        finally:
            for c in started:
                c.close()
    return {name: 1.0 / float(np.median(ts)) for name, ts in times.items()}, checks, failed


BLAS_SEEN = {}  # {BLAS description: [contenders that reported it]}, filled by run_contenders
PEAK_RSS = {}  # {contender: peak RSS in MB of its process}, filled by run_contenders


def compare_training(preset, rounds, steps, numpy_steps, with_compile, threads, env, shape, with_numpy=True,
                     bf16=False):
    """{contender: steps/s, or the error text of a torch.compile that failed}."""
    names = [n for n in TRAIN_CONTENDERS + (BF16_CONTENDERS if bf16 else ())
             if (with_compile or not n.startswith("torch.compile")) and (with_numpy or n != "numpy")]
    names += [n + BASE for n in FASTFORMER + ("numba" + BF16,) if BASELINE and n in names]
    rates, first, failed = run_contenders("train", names, preset, threads, rounds,
                                          lambda name: numpy_steps if name.startswith("numpy") else steps, env,
                                          shape)
    for name in failed:
        if not name.startswith("torch.compile"):
            raise SystemExit(f"{preset}: {name} {failed[name]}")
    for tol, group in ((1e-3, [n for n in first if not n.removesuffix(BASE).endswith(BF16)]), (1e-2, list(first))):
        losses = [first[n] for n in group]  # bfloat16 products: the first losses agree to 1%, not 0.1%
        if max(losses) - min(losses) > tol * abs(first["torch eager"]):
            raise SystemExit(f"{preset}: the first losses disagree: {first}")
    return {**rates, **failed}


def compare_generation(preset, rounds, threads, env, rows=1):
    """{contender: tokens/s} of generation after the benchmark prompt: batch-1 greedy, or `rows`
    prompts side by side, sampled (tokens of all rows counted)."""
    names = list(GEN_CONTENDERS) + [n + BASE for n in FASTFORMER if BASELINE]
    rates, diffs, failed = run_contenders("generate", names, preset, threads, rounds, lambda name: 1, env,
                                          (rows, None, None))
    if failed:
        raise SystemExit(f"{preset}: {failed}")
    if diffs["transformers"] > 1e-3:
        raise SystemExit(f"{preset}: fastformer and transformers logits differ by {diffs['transformers']:.2e}")
    return {name: rows * bench.GEN_NEW * r for name, r in rates.items()}


def cell(value, width):
    """A rate, or "failed" / "-" for a contender that failed / was not run."""
    if isinstance(value, float):
        return f"{value:{width}.2f}"
    return f"{'failed' if value.startswith('failed') else '-':>{width}s}"


def ratio(a, b, width=9):
    """a / b as "1.23x" in width + 1 columns, or "-" when b is not a rate."""
    return f"{a / b:{width}.2f}x" if isinstance(b, float) else f"{'-':>{width + 1}s}"


def main():
    if len(sys.argv) == 9 and sys.argv[1] == "--worker":
        return worker(sys.argv[2], sys.argv[3], sys.argv[4], *map(int, sys.argv[5:]))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "small", "medium"], choices=list(PRESETS))
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    ap.add_argument("--steps", type=int, default=5, help="timed training steps per round (numba, torch)")
    ap.add_argument("--numpy-steps", type=int, default=1, help="timed training steps per round (numpy backend)")
    ap.add_argument("--gen-rounds", type=int, default=5, help="alternating generation rounds (default 5)")
    ap.add_argument("--gen-batch", type=int, default=1,
                    help="prompts generated side by side; more than 1 samples (default 1: greedy)")
    ap.add_argument("--no-compile", action="store_true", help="leave out torch.compile")
    ap.add_argument("--parts", nargs="+", default=["train", "generate"], choices=["train", "generate"])
    ap.add_argument("--batch", type=int, default=None, help="rows of a training step (default: the preset's)")
    ap.add_argument("--seq-len", type=int, nargs="+", default=[None],
                    help="tokens per row of a training step, one table row each (default: the preset's)")
    ap.add_argument("--vocab", type=int, default=None,
                    help=f"vocabulary of a training step (default {bench.VOCAB}; 50257 is GPT-2's)")
    ap.add_argument("--no-numpy", action="store_true", help="leave out the NumPy backend (slow at long T)")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads of every contender (default: FASTFORMER_NUM_THREADS, else the cores)")
    ap.add_argument("--bf16", action="store_true",
                    help="also train in bfloat16: fastformer's train.precision=bf16, torch under autocast")
    ap.add_argument("--baseline", metavar="DIR", default=None,
                    help="another fastformer checkout whose backends take their turns too (numba@base, numpy@base)")
    args = ap.parse_args()
    if args.baseline:
        if not os.path.isfile(os.path.join(args.baseline, "benchmarks", "compare_torch.py")):
            raise SystemExit(f"--baseline {args.baseline!r}: not a fastformer checkout "
                             f"(no benchmarks/compare_torch.py)")
        BASELINE["dir"] = os.path.abspath(args.baseline)

    n = args.threads or num_threads()
    torch_version = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"],
                                   capture_output=True, text=True).stdout.strip() or "not installed"
    print(f"threads: {n} (numba, BLAS, torch), one process per contender; torch {torch_version}")
    pins = {k: os.environ[k] for k in BLAS_PINS if k in os.environ}
    envs = [("the environment as set", dict(os.environ))]
    if pins:  # a user's machine has no pin: report that too
        envs.append((f"{' and '.join(pins)} unset", {k: v for k, v in os.environ.items() if k not in pins}))
    failures = []
    for title, env in envs:
        BLAS_SEEN.clear()
        pinned = ", ".join(f"{k}={env[k]}" for k in BLAS_PINS if k in env) or "no OpenBLAS pin"
        print(f"\n=== {title} ({pinned}) ===")
        if "train" in args.parts:
            failures += print_training(args, n, env)
        if "generate" in args.parts:
            print_generation(args, n, env)
        print("BLAS in each contender's process:")
        for blas, names in BLAS_SEEN.items():
            print(f"  {', '.join(sorted(set(names)))}: {blas}")
    for line in failures:
        print(line)
    if BASELINE:
        print_against_baseline()


def print_training(args, n, env):
    """The training table of every preset; returns the torch.compile failures."""
    failures, rss = [], []
    bf16_rows = []  # (label, rates) for the bfloat16 table
    shapes = ", ".join(sorted({"{} x {}".format(*bench.batch_shape(p, args.batch, T)) for p in args.presets
                               for T in args.seq_len}))
    print(f"training steps/s, batch x seq {shapes}, vocab {args.vocab or bench.VOCAB}, the presets' AdamW; "
          f"median over {args.rounds} rounds of {args.steps} steps ({args.numpy_steps} for numpy)")
    print("torch as users run it (its own process, its defaults), and '+s' with fastformer's process "
          "settings (allocator policy, OpenBLAS spin)")
    print(f"{'preset':8s} {'numpy':>7s} {'numba':>7s} {'eager':>7s} {'eager+s':>7s} {'compile':>7s} "
          f"{'comp+s':>7s}  {'/numpy':>7s} {'/eager':>7s} {'/eager+s':>8s} {'/compile':>8s} {'/comp+s':>8s}")
    for preset, T in [(p, T) for p in args.presets for T in args.seq_len]:
        PEAK_RSS.clear()
        r = compare_training(preset, args.rounds, args.steps, args.numpy_steps, not args.no_compile, n, env,
                             (args.batch, T, args.vocab), not args.no_numpy, args.bf16)
        label = preset if T is None and args.batch is None else \
            "{}@{}x{}".format(preset, *bench.batch_shape(preset, args.batch, T))
        comp = [r.get(name, "not run") for name in ("torch.compile", "torch.compile" + SETTINGS)]
        failures += [f"{label}: torch.compile {c}" for c in comp if isinstance(c, str) and c != "not run"]
        eager, eager_s = r["torch eager"], r["torch eager" + SETTINGS]
        print(f"{label:8s} {cell(r.get('numpy', 'not run'), 7)} {r['numba']:7.2f} {eager:7.2f} {eager_s:7.2f} "
              f"{cell(comp[0], 7)} {cell(comp[1], 7)}  {ratio(r['numba'], r.get('numpy'), 7)} "
              f"{ratio(r['numba'], eager, 7)} {ratio(r['numba'], eager_s, 8)} {ratio(r['numba'], comp[0], 8)} "
              f"{ratio(r['numba'], comp[1], 8)}", flush=True)
        AGAINST_BASE.append((f"train {label}", r))
        if args.bf16:
            bf16_rows.append((label, r))
        rss.append(f"{label:8s} " + ", ".join(f"{name} {mb:,.0f}" for name, mb in PEAK_RSS.items())
                   + f"; numba/torch eager {PEAK_RSS['numba'] / PEAK_RSS['torch eager']:.2f}x")
    if bf16_rows:
        print_bf16(bf16_rows)
    print("peak RSS (MB) of each contender's process:")
    for line in rss:
        print("  " + line)
    return failures


def print_bf16(rows):
    """The bfloat16 table: fastformer's train.precision=bf16 against PyTorch's CPU autocast, and
    against the float32 contenders of the same rounds."""
    print("bfloat16 training steps/s: fastformer train.precision=bf16, torch under torch.autocast('cpu', "
          "torch.bfloat16) (eager and compiled), same rounds")
    print(f"{'preset':8s} {'numba':>7s} {'eager':>7s} {'compile':>7s}  {'/eager':>8s} {'/compile':>9s} "
          f"{'/numba fp32':>11s} {'/comp fp32':>10s}")
    for label, r in rows:
        mine, eager, comp = r["numba" + BF16], r["torch eager" + BF16], r.get("torch.compile" + BF16, "not run")
        print(f"{label:8s} {mine:7.2f} {eager:7.2f} {cell(comp, 7)}  {ratio(mine, eager, 7)} {ratio(mine, comp, 8)} "
              f"{ratio(mine, r['numba'], 10)} {ratio(mine, r.get('torch.compile', 'not run'), 9)}", flush=True)


def print_generation(args, n, env):
    how = "batch 1, greedy" if args.gen_batch == 1 else \
        f"{args.gen_batch} prompts side by side, sampled (temperature 1, top-k {bench.GEN_TOP_K}), all rows' tokens"
    print(f"generation tokens/s, {how}, {bench.GEN_NEW} new tokens after {bench.GEN_PROMPT}; "
          f"median over {args.gen_rounds} rounds; transformers = GPT2LMHeadModel.generate(use_cache=True)")
    print(f"{'preset':8s} {'numpy':>9s} {'numba':>9s} {'transformers':>12s}   "
          f"{'numba/transformers':>18s} {'numpy/transformers':>18s}")
    for preset in args.presets:
        r = compare_generation(preset, args.gen_rounds, n, env, args.gen_batch)
        AGAINST_BASE.append((f"generate {preset}", r))
        print(f"{preset:8s} {r['numpy']:9.1f} {r['numba']:9.1f} {r['transformers']:12.1f}   "
              f"{ratio(r['numba'], r['transformers'], 17)} {ratio(r['numpy'], r['transformers'], 17)}",
              flush=True)

AGAINST_BASE = []  # (row label, {contender: rate}) of every table, for print_against_baseline


def print_against_baseline():
    """This checkout's rates over the --baseline checkout's, from the rounds above."""
    print(f"\nthis checkout against --baseline {BASELINE['dir']} (rates of the same rounds; >1 is faster)")
    names = ("numba", "numba" + BF16, "numpy")
    print(f"{'':20s} " + "   ".join(f"{n:>10s} {n + BASE:>15s} {'ratio':>7s}" for n in names))
    for label, r in AGAINST_BASE:
        cells = []
        for name in names:
            mine, base = r.get(name), r.get(name + BASE)
            if isinstance(mine, float) and isinstance(base, float):
                cells.append(f"{mine:10.2f} {base:15.2f} {mine / base:6.3f}x")
            else:
                cells.append(f"{'-':>10s} {'-':>15s} {'-':>7s}")
        print(f"{label:20s} " + "   ".join(cells))


if __name__ == "__main__":
    main()
