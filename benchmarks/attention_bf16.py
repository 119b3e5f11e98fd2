"""Attention's register tiles in float32 against bfloat16 products: forward and backward of causal
self-attention from a fused QKV (`attention_qkv_forward` / `attention_qkv_backward`) on the Numba
backend, the two precisions taking turns call by call in one process (so that load from elsewhere
hits both alike); prints the median milliseconds of each and the bf16 speed-up.

    python benchmarks/attention_bf16.py                     # medium's shape and small's at 2 x 4096
    python benchmarks/attention_bf16.py --shapes 32x8x128x32 --rounds 31
    NUMBA_NUM_THREADS=1 python benchmarks/attention_bf16.py  # one core's figures
"""

import argparse
import time

import numpy as np

import fastformer
from fastformer.kernels import use_precision
from fastformer.kernels.process import cpu_has_bf16


def _shape(text):
    B, H, T, hs = (int(x) for x in text.split("x"))
    return B, H, T, hs


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", type=_shape, nargs="+", default=[(32, 8, 128, 32), (2, 4, 4096, 32)],
                    help="B x H x T x hs (default: 32x8x128x32, medium's; 2x4x4096x32, small's at 2 x 4096)")
    ap.add_argument("--rounds", type=int, default=None, help="timed calls of each (default: 21, 5 from T = 1024)")
    args = ap.parse_args()
    if not cpu_has_bf16():
        raise SystemExit("this CPU has no AVX-512 BF16: nothing to compare")

    fastformer.set_backend("numba")
    ops = fastformer.get_ops()
    rng = np.random.default_rng(0)
    print("causal self-attention from a fused QKV, register tiles; median ms of alternating calls")
    print(f"{'B x H x T x hs':>18s} {'precision':>9s} {'forward':>8s} {'backward':>9s} {'total':>8s}")
    for B, H, T, hs in args.shapes:
        rounds = args.rounds or (5 if T >= 1024 else 21)
        qkv = rng.standard_normal((B, T, 3 * H * hs)).astype(np.float32)
        dout = rng.standard_normal((B, T, H * hs)).astype(np.float32)
        times = {p: ([], []) for p in ("float32", "bfloat16")}
        for r in range(rounds + 1):  # the first round warms up (and compiles)
            for precision, (fwd, bwd) in times.items():
                with use_precision(precision):
                    t0 = time.perf_counter()
                    _, cache = ops.attention_qkv_forward(qkv, H, True)
                    t1 = time.perf_counter()
                    ops.attention_qkv_backward(dout, cache)
                    t2 = time.perf_counter()
                if r:
                    fwd.append(t1 - t0)
                    bwd.append(t2 - t1)
        med = {p: (np.median(f) * 1e3, np.median(b) * 1e3) for p, (f, b) in times.items()}
        for precision, (f, b) in med.items():
            print(f"{f'{B}x{H}x{T}x{hs}':>18s} {precision:>9s} {f:8.2f} {b:9.2f} {f + b:8.2f}")
        (f32f, f32b), (f16f, f16b) = med["float32"], med["bfloat16"]
        print(f"{'bf16 speed-up':>28s} {f32f / f16f:7.2f}x {f32b / f16b:8.2f}x {(f32f + f32b) / (f16f + f16b):7.2f}x")


if __name__ == "__main__":
    main()
