"""fastformer against PyTorch on the same model: training steps/s and generation tokens/s.

Training: the same GPT-2-layout model (tied embeddings, pre-LN, GELU(tanh), causal attention) is
built in PyTorch from fastformer's initial weights and trained on the same synthetic batch
(32 x 128 ids, vocabulary 4096) with the same AdamW settings, by fastformer's NumPy and Numba
backends, PyTorch eager, and `torch.compile` (inductor; the loss with its backward compiled, the
optimizer eager). The first losses are checked to agree before anything is timed; a
`torch.compile` that fails is reported in the table, not fatal.

Generation: batch 1, greedy, 128 new tokens after a 16-token prompt, by
`TransformerLM.generate` and by `transformers.GPT2LMHeadModel.generate` (use_cache=True) on the
same weights, moved through `fastformer.hf.save_hf` and `from_pretrained`. The prompt's logits
are checked to agree first.

All contenders run in rounds, alternating in one process, with Numba, BLAS and PyTorch fixed to
the same number of threads (the cores); each figure is the rate of the median time over all its
timed calls. Only the benchmarks import torch and transformers. torch is imported first: it
brings its own OpenMP runtime (named libgomp.so.1, like the system's, so a process holds one),
and fastformer's numba backend then takes Numba's workqueue layer rather than run on torch's
runtime -- torch keeps its own settings, and fastformer runs slower here than in a process of
its own (`fastformer bench`).

    python benchmarks/compare_torch.py                                  # everything (~2 min here)
    python benchmarks/compare_torch.py --presets tiny --rounds 1 --no-compile   # a quick look
"""

import argparse
import tempfile

import numpy as np
import torch  # before fastformer: see the docstring
import torch.nn.functional as TF

from fastformer import bench
from fastformer.hf import save_hf
from fastformer.threads import configure_threads, num_threads

LR, WEIGHT_DECAY = 1e-3, 0.1


class TorchGPT:
    """The fastformer TransformerLM in PyTorch eager ops, weights (in, out) as in GPT-2."""

    def __init__(self, cfg, state, compile=False):
        self.cfg = cfg
        self.loss_fn = torch.compile(self.loss) if compile else self.loss
        self.p = {n: torch.nn.Parameter(torch.tensor(np.array(a))) for n, a in state.items()}
        decay = [p for n, p in self.p.items() if p.ndim == 2 and n != "transformer.wpe.weight"]
        rest = [p for n, p in self.p.items() if not (p.ndim == 2 and n != "transformer.wpe.weight")]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                      {"params": rest, "weight_decay": 0.0}], lr=LR)

    def loss(self, ids, targets):
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


def median_rates(contenders, rounds):
    """{name: 1 / median seconds per call}: contenders {name: (fn, calls per round)} run in
    `rounds` rounds, one after another within each round."""
    times = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, (fn, n) in contenders.items():
            times[name] += bench.time_calls(fn, n)[0]
    return {name: 1.0 / float(np.median(ts)) for name, ts in times.items()}


def compare_training(preset, rounds, steps, numpy_steps, with_compile):
    """{contender: steps/s, or the error text of a torch.compile that failed}."""
    models, steps_fns = {}, {}
    for backend in ("numpy", "numba"):
        models[backend], steps_fns[backend] = bench.make_train_step(preset, backend)
    cfg, state = models["numba"].config, models["numba"].state_dict()
    x, y = (torch.from_numpy(a) for a in bench.synthetic_batch(cfg))
    eager = TorchGPT(cfg, state)
    steps_fns["torch eager"] = lambda: eager.step(x, y)
    failed = {}
    if with_compile:
        compiled = TorchGPT(cfg, state, compile=True)
        steps_fns["torch.compile"] = lambda: compiled.step(x, y)
    first = {}
    for name, fn in list(steps_fns.items()):  # warm-up (compiles), and the check
        try:
            first[name] = fn()
        except Exception as e:  # a compiler error of any kind goes in the table
            if name != "torch.compile":
                raise
            failed[name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            del steps_fns[name]
    if max(first.values()) - min(first.values()) > 1e-3 * abs(first["torch eager"]):
        raise SystemExit(f"{preset}: the first losses disagree: {first}")
    rates = median_rates({name: (fn, numpy_steps if name == "numpy" else steps)
                          for name, fn in steps_fns.items()}, rounds)
    return {**rates, **failed}


def hf_gpt2(model, tmp):
    """transformers.GPT2LMHeadModel with `model`'s weights, via a Hugging Face directory."""
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging

    logging.disable_progress_bar()
    save_hf(model, tmp)
    return GPT2LMHeadModel.from_pretrained(tmp).eval()


def compare_generation(preset, rounds):
    """{contender: tokens/s} of batch-1 greedy generation after the benchmark prompt."""
    gens = {}
    for backend in ("numpy", "numba"):
        model, prompt, gens[backend] = bench.make_generate(preset, backend)
    with tempfile.TemporaryDirectory() as tmp:
        hf = hf_gpt2(model, tmp)
    tprompt = torch.from_numpy(prompt)
    with torch.inference_mode():
        hf_logits = hf(tprompt).logits[0].numpy()
    diff = float(np.abs(hf_logits - model.forward(prompt[0])).max())
    if diff > 1e-3:
        raise SystemExit(f"{preset}: fastformer and transformers logits differ by {diff:.2e}")

    def hf_generate():
        with torch.inference_mode():
            return hf.generate(tprompt, attention_mask=torch.ones_like(tprompt), max_new_tokens=bench.GEN_NEW,
                               min_new_tokens=bench.GEN_NEW, do_sample=False, use_cache=True, pad_token_id=0)

    gens["transformers"] = hf_generate
    for fn in gens.values():
        fn()  # warm-up
    rates = median_rates({name: (fn, 1) for name, fn in gens.items()}, rounds)
    return {name: bench.GEN_NEW * r for name, r in rates.items()}


def cell(value, width):
    """A rate, or "failed" / "-" for a contender that failed / was not run."""
    if isinstance(value, float):
        return f"{value:{width}.2f}"
    return f"{'failed' if value.startswith('failed') else '-':>{width}s}"


def ratio(a, b):
    return f"{a / b:9.2f}x" if isinstance(b, float) else f"{'-':>10s}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "small", "medium"], choices=list(bench.PRESETS))
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    ap.add_argument("--steps", type=int, default=5, help="timed training steps per round (numba, torch)")
    ap.add_argument("--numpy-steps", type=int, default=1, help="timed training steps per round (numpy backend)")
    ap.add_argument("--gen-rounds", type=int, default=5, help="alternating generation rounds (default 5)")
    ap.add_argument("--no-compile", action="store_true", help="leave out torch.compile")
    ap.add_argument("--parts", nargs="+", default=["train", "generate"], choices=["train", "generate"])
    args = ap.parse_args()

    n = configure_threads(num_threads())
    torch.set_num_threads(n)
    print(f"threads: {n} (numba, BLAS, torch); torch {torch.__version__}")
    failures = []
    if "train" in args.parts:
        print(f"\ntraining steps/s, batch {bench.BATCH} x seq {bench.SEQ_LEN}, vocab {bench.VOCAB}, AdamW; "
              f"median over {args.rounds} rounds of {args.steps} steps ({args.numpy_steps} for numpy)")
        print(f"{'preset':8s} {'numpy':>8s} {'numba':>8s} {'eager':>8s} {'compile':>8s}   "
              f"{'numba/numpy':>11s} {'numba/eager':>11s} {'numba/compile':>13s}")
        for preset in args.presets:
            r = compare_training(preset, args.rounds, args.steps, args.numpy_steps, not args.no_compile)
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
            r = compare_generation(preset, args.gen_rounds)
            print(f"{preset:8s} {r['numpy']:9.1f} {r['numba']:9.1f} {r['transformers']:12.1f}   "
                  f"{ratio(r['numba'], r['transformers']):>18s} {ratio(r['numpy'], r['transformers']):>18s}",
                  flush=True)
    for line in failures:
        print(line)


if __name__ == "__main__":
    main()
