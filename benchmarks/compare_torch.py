"""Training-step speed of fastformer (NumPy and Numba backends) against PyTorch eager.

The same GPT-2-layout model (tied embeddings, pre-LN, GELU(tanh), causal attention) is built in
PyTorch from fastformer's initial weights, and trained on the same synthetic batch (32 x 128
ids, vocabulary 4096) with the same AdamW settings. The contenders run in rounds, alternating
in one process, with NumPy/Numba/BLAS and PyTorch all fixed to the same number of threads (the
cores); each prints the median step time over all its timed steps. The first losses are
checked to agree before anything is timed. This is the only fastformer file that imports torch.

    python benchmarks/compare_torch.py --presets tiny small medium --rounds 3
"""

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as TF

import fastformer
from fastformer import bench
from fastformer.threads import configure_threads, num_threads

LR, WEIGHT_DECAY = 1e-3, 0.1


class TorchGPT:
    """The fastformer TransformerLM in PyTorch eager ops, weights (in, out) as in GPT-2."""

    def __init__(self, cfg, state):
        self.cfg = cfg
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
        loss = self.loss(ids, targets)
        loss.backward()
        self.opt.step()
        return float(loss.detach())


class FastformerContender:
    def __init__(self, cfg, backend, seed=0):
        self.backend = backend
        with fastformer.use_backend(backend):
            self.model = fastformer.TransformerLM(cfg, seed=seed)
            self.opt = bench.AdamW(self.model, lr=LR, weight_decay=WEIGHT_DECAY)

    def step(self, ids, targets):
        with fastformer.use_backend(self.backend):
            loss, _ = self.model.loss_and_grads(ids, targets)
            self.opt.step()
        return loss


def compare(preset, rounds, steps, numpy_steps):
    cfg = bench.preset_config(preset)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(bench.BATCH, bench.SEQ_LEN + 1))
    x, y = ids[:, :-1], ids[:, 1:]
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    nb = FastformerContender(cfg, "numba")
    contenders = {"numpy": (FastformerContender(cfg, "numpy"), lambda c: c.step(x, y), numpy_steps),
                  "numba": (nb, lambda c: c.step(x, y), steps),
                  "torch": (TorchGPT(cfg, nb.model.state_dict()), lambda c: c.step(tx, ty), steps)}
    first = {name: run(c) for name, (c, run, _) in contenders.items()}  # warm-up, and a check
    if max(first.values()) - min(first.values()) > 1e-3 * abs(first["torch"]):
        raise SystemExit(f"{preset}: the first losses disagree: {first}")
    times = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, (c, run, n) in contenders.items():
            for _ in range(n):
                t = time.perf_counter()
                run(c)
                times[name].append(time.perf_counter() - t)
    return {name: 1.0 / float(np.median(ts)) for name, ts in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "small", "medium"], choices=list(bench.PRESETS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round (numba, torch)")
    ap.add_argument("--numpy-steps", type=int, default=1, help="timed steps per round (numpy backend)")
    args = ap.parse_args()

    n = configure_threads(num_threads())
    torch.set_num_threads(n)
    print(f"threads: {n} (numba, BLAS, torch); batch {bench.BATCH} x seq {bench.SEQ_LEN}, "
          f"vocab {bench.VOCAB}; torch {torch.__version__}; median step time over {args.rounds} rounds")
    print(f"{'preset':8s} {'numpy':>9s} {'numba':>9s} {'torch':>9s}   {'numba/numpy':>11s} {'numba/torch':>11s}  (steps/s)")
    for preset in args.presets:
        r = compare(preset, args.rounds, args.steps, args.numpy_steps)
        print(f"{preset:8s} {r['numpy']:9.2f} {r['numba']:9.2f} {r['torch']:9.2f}   "
              f"{r['numba'] / r['numpy']:10.2f}x {r['numba'] / r['torch']:10.2f}x", flush=True)


if __name__ == "__main__":
    main()
