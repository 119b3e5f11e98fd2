"""Batch-1 greedy decoding in each weight format (model.quantize: fp32, bf16, int8), taking turns
in one process: 128 new tokens after a 16-token prompt (cli/bench.make_generate) of a randomly
initialised preset model; prints the median tokens/s of each format and its ratio to fp32.

With --head-split it also times the decoding step's vocabulary head (the widest product) on one
thread and as two column halves on two (one half handed to a pool thread), per format: where two
threads pay is the crossover below which decoding keeps one.

    python benchmarks/decode_weights.py --preset medium --rounds 3
"""

import argparse
import concurrent.futures
import time

import numpy as np

import fastformer
from fastformer.cli import bench
from fastformer.kernels.ops import quantized as Q
from fastformer.training.config import PRESETS


def head_split(fmt, C, V, calls=300):
    """(median us of the head x (1, C) @ W (C, V) on one thread, on two), format `fmt`."""
    ops = fastformer.get_ops()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, C)).astype(np.float32)
    qw = ops.quantize_weight(0.02 * rng.standard_normal((C, V)).astype(np.float32), fmt)
    y, bias, G = np.empty((1, V), np.float32), np.zeros(V, np.float32), Q.groups(V)
    if fmt == "int8":
        kernel = Q._linear_int8.jit()

        def part(g0, g1):
            kernel(x, qw.words, qw.scale, qw.correction, bias, False, y, g0, g1)
    else:
        kernel = Q._linear_bf16.jit()

        def part(g0, g1):
            kernel(x, qw.words, bias, False, y, g0, g1)
    pool = concurrent.futures.ThreadPoolExecutor(1)

    def two():
        other = pool.submit(part, G // 2, G)
        part(0, G // 2)
        other.result()

    out = []
    for call in (lambda: part(0, G), two):
        call()
        times = []
        for _ in range(calls):
            t = time.perf_counter()
            call()
            times.append(time.perf_counter() - t)
        out.append(1e6 * float(np.median(times)))
    pool.shutdown()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="medium", choices=list(PRESETS))
    ap.add_argument("--formats", nargs="+", default=list(Q.FORMATS), choices=list(Q.FORMATS))
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    ap.add_argument("--head-split", action="store_true", help="also time the head on one thread and on two")
    args = ap.parse_args()

    fastformer.set_backend("numba")
    gens = {}
    for fmt in args.formats:
        _, _, gen = bench.make_generate(args.preset, "numba", weights=fmt)
        gen()  # compiles or loads the kernels
        gens[fmt] = gen
    rates = {fmt: [] for fmt in gens}
    for _ in range(args.rounds):
        for fmt, gen in gens.items():
            t = time.perf_counter()
            gen()
            rates[fmt].append(bench.GEN_NEW / (time.perf_counter() - t))
    print(f"{args.preset}: batch-1 greedy, {bench.GEN_NEW} new tokens after {bench.GEN_PROMPT}; tokens/s, median of "
          f"{args.rounds} rounds taking turns")
    base = float(np.median(rates["fp32"])) if "fp32" in rates else None
    for fmt, r in rates.items():
        med = float(np.median(r))
        vs = f"  {med / base:.2f}x fp32" if base else ""
        print(f"  {fmt:5s} {med:8.0f}{vs}   rounds: {', '.join(f'{v:.0f}' for v in r)}")
    if args.head_split:
        cfg = bench.generation_model(args.preset).config
        for fmt in [f for f in args.formats if f != "fp32"]:
            for V in (cfg.vocab_size, 4 * cfg.vocab_size, 16 * cfg.vocab_size):
                one, two = head_split(fmt, cfg.d_model, V)
                print(f"  head {fmt} ({cfg.d_model}, {V}): one thread {one:.1f} us, two {two:.1f} us")


if __name__ == "__main__":
    main()
