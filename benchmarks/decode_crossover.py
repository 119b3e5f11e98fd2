"""Where batched decoding should leave the fused single-threaded decode kernel
(ops.gpt2_decode_step) for the composed forward, whose matrix products run on every BLAS thread:
one new token for each of R rows after a 16-token prompt, by both paths, taking turns in one
process; prints the median microseconds of a step of each and the faster.

The crossover it finds is models.lm.FUSED_DECODE_MAX_ROWS. With --prompt it times a prompt of
T tokens in each of R rows instead, its last logits by the fused ops.gpt2_decode_prompt and by the
composed forward, per weight format: models.lm.FUSED_PROMPT_MAX_TOKENS.

    python benchmarks/decode_crossover.py --preset medium --rows 1 2 4 8 16
    python benchmarks/decode_crossover.py --preset medium --prompt --rows 1 16 --tokens 16 64 128
"""

import argparse
import time

import numpy as np

import fastformer
from fastformer.cli import bench
from fastformer.models import lm
from fastformer.training.config import PRESETS


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="medium", choices=list(PRESETS))
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--steps", type=int, default=20, help="timed steps a turn (default 20)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    ap.add_argument("--prompt", action="store_true", help="time prompts (--tokens, --weights) instead of steps")
    ap.add_argument("--tokens", type=int, nargs="+", default=[16, 64, 128], help="prompt lengths (with --prompt)")
    ap.add_argument("--weights", nargs="+", default=["fp32", "int8", "bf16"], help="formats (with --prompt)")
    args = ap.parse_args()

    fastformer.set_backend("numba")
    if args.prompt:
        return prompts(args)
    model = bench.generation_model(args.preset)
    print(f"{args.preset}: one decoding step of R rows after a {bench.GEN_PROMPT}-token prompt; "
          f"median us per step over {args.rounds} rounds of {args.steps}")
    print(f"{'R':>4s} {'fused':>10s} {'composed':>10s}   faster")
    for R in args.rows:
        prompt = bench.generation_prompt(model.config, rows=R)
        token = prompt[:, -1:]

        def run(fused):
            saved = lm.FUSED_DECODE_MAX_ROWS
            lm.FUSED_DECODE_MAX_ROWS = R if fused else 0
            try:
                state = model.init_state(R)
                model.step(prompt, state)
                times = []
                for _ in range(args.steps):
                    t = time.perf_counter()
                    model.step(token, state)
                    times.append(time.perf_counter() - t)
                return times
            finally:
                lm.FUSED_DECODE_MAX_ROWS = saved

        us = {k: 1e6 * v for k, v in alternate(run, args.rounds).items()}
        print(f"{R:4d} {us[True]:10.0f} {us[False]:10.0f}   {'fused' if us[True] <= us[False] else 'composed'}",
              flush=True)


def alternate(run, rounds):
    """{fused: median seconds} of run(fused) (a list of times) for both paths, after a warm-up
    call of each, taking turns for `rounds` rounds."""
    run(True), run(False)  # compile, warm up
    times = {True: [], False: []}
    for _ in range(rounds):
        for fused in (True, False):
            times[fused] += run(fused)
    return {k: float(np.median(v)) for k, v in times.items()}


def prompts(args):
    """--prompt: R x T prompt tokens, the last logits by gpt2_decode_prompt and by the composed forward."""
    print(f"{args.preset}: a prompt of T tokens in each of R rows, its last logits; median ms over "
          f"{args.rounds} rounds of {args.steps}")
    print(f"{'weights':>7s} {'R':>4s} {'T':>5s} {'fused':>9s} {'composed':>9s}   faster")
    saved = dict(lm.FUSED_PROMPT_MAX_TOKENS)
    for fmt in args.weights:
        model = bench.generation_model(args.preset, context=max(args.tokens))
        model.quantize(fmt)
        for R in args.rows:
            for T in args.tokens:
                ids = bench.generation_prompt(model.config, rows=R, length=T)

                def run(fused):
                    lm.FUSED_PROMPT_MAX_TOKENS[fmt] = R * T if fused else 0
                    try:
                        times = []
                        for _ in range(args.steps):
                            state = model.init_state(R)
                            t = time.perf_counter()
                            model.step(ids, state, last=True)
                            times.append(time.perf_counter() - t)
                        return times
                    finally:
                        lm.FUSED_PROMPT_MAX_TOKENS.update(saved)

                ms = {k: 1e3 * v for k, v in alternate(run, args.rounds).items()}
                print(f"{fmt:>7s} {R:4d} {T:5d} {ms[True]:9.2f} {ms[False]:9.2f}   "
                      f"{'fused' if ms[True] <= ms[False] else 'composed'}", flush=True)


if __name__ == "__main__":
    main()
