"""Where the Numba backend's attention should switch from its row kernels to BLAS tiles
(kernels/ops/attention_tiled.py): forward + backward of causal self-attention from a fused QKV
(`attention_qkv_forward` / `attention_qkv_backward`) at a fixed number of tokens per call,
B x T = --tokens, for each T, by the row kernels and by the tiled form at each block size,
taking turns in one process; prints the median milliseconds of each and the fastest.

The crossover it finds is kernels/ops/attention.py's ATTENTION_TILED_FROM.

    python benchmarks/attention_crossover.py                       # small's width: H 4, hs 32
    python benchmarks/attention_crossover.py --heads 8 --head-size 32 --seq 256 1024
"""

import argparse

import numpy as np

import fastformer
from fastformer.cli import bench
from fastformer.kernels.ops import attention, attention_tiled


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096, help="B x T per call (default 4096)")
    ap.add_argument("--seq", type=int, nargs="+", default=[128, 256, 512, 1024, 2048, 4096])
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-size", type=int, default=32)
    ap.add_argument("--blocks", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    args = ap.parse_args()

    fastformer.set_backend("numba")
    ops = fastformer.get_ops()
    H, hs = args.heads, args.head_size
    rng = np.random.default_rng(0)
    print(f"causal self-attention forward + backward, {args.tokens} tokens per call, H {H}, hs {hs}, float32; "
          f"median ms over {args.rounds} alternating rounds")
    names = ["rows"] + [f"tiles {b}" for b in args.blocks]
    print(f"{'B x T':>12s} " + " ".join(f"{n:>10s}" for n in names) + "   fastest")
    for T in args.seq:
        B = max(1, args.tokens // T)
        qkv = rng.standard_normal((B, T, 3 * H * hs)).astype(np.float32)
        dout = rng.standard_normal((B, T, H * hs)).astype(np.float32)

        def run(block):
            def fn():
                saved = attention.ATTENTION_TILED_FROM, attention_tiled.ATTENTION_BLOCK
                attention.ATTENTION_TILED_FROM = T + 1 if block is None else 1
                attention_tiled.ATTENTION_BLOCK = block or saved[1]
                try:
                    _, cache = ops.attention_qkv_forward(qkv, H)
                    ops.attention_qkv_backward(dout, cache)
                finally:
                    attention.ATTENTION_TILED_FROM, attention_tiled.ATTENTION_BLOCK = saved
            return fn

        fns = [run(None)] + [run(b) for b in args.blocks]
        for fn in fns:
            fn()  # compile, warm up
        times = [[] for _ in fns]
        for _ in range(args.rounds):
            for i, fn in enumerate(fns):
                times[i] += bench.time_calls(fn, 1)[0]
        ms = [1e3 * float(np.median(t)) for t in times]
        print(f"{B:4d} x {T:5d} " + " ".join(f"{m:10.1f}" for m in ms) + f"   {names[int(np.argmin(ms))]}",
              flush=True)


if __name__ == "__main__":
    main()
