"""fastformer's bfloat16 GEMM against NumPy's float32 matmul and PyTorch's bfloat16 matmul, at
the matrix products of each preset's training step (fastformer.cli.bench.gemm_shapes), on one and
on two threads.

Every contender runs in a process of its own (this file again, with --worker): fastformer's never
imports torch and PyTorch's never imports fastformer. fastformer's bf16 figure includes rounding
and packing both float32 inputs on every call; PyTorch's is `torch.matmul` on bfloat16 tensors
made beforehand (what autocast runs once its casts are done), so the comparison does not flatter
fastformer. "ff packed" is fastformer's GEMM on operands packed beforehand (ops.pack for the right
one, gemm_bf16.pack_a for the left), the like-for-like figure beside PyTorch's. Each figure is the
GFLOP/s of the median of --repeats calls (after WARMUP_SECONDS of untimed ones), and of --rounds
such processes taking turns.

    python benchmarks/compare_gemm.py                        # every preset, 1 and 2 threads
    python benchmarks/compare_gemm.py --presets medium --threads 2 --rounds 5
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.abspath(__file__)


WARMUP_SECONDS = 0.2  # of untimed calls before a shape's timed ones, in every contender's process


def median_seconds(fn, repeats):
    """The median time of `repeats` calls of fn, after WARMUP_SECONDS of untimed ones: a process's
    first shape, timed after one call, ran about 10% slower than when timed after others (its
    threads and the machine's caches still waking), and every contender's first is the same one."""
    end = time.perf_counter() + WARMUP_SECONDS
    fn()
    while time.perf_counter() < end:
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def worker(contender, shapes, repeats):
    """{shape name: GFLOP/s} of one contender in this process (its threads set by the parent)."""
    rng = np.random.default_rng(0)
    rates = {}
    if contender == "torch bf16":
        import torch

        for name, (M, K, N) in shapes.items():
            a = torch.from_numpy(rng.standard_normal((M, K), dtype=np.float32)).bfloat16()
            b = torch.from_numpy(rng.standard_normal((K, N), dtype=np.float32)).bfloat16()
            rates[name] = 2 * M * K * N / median_seconds(lambda: torch.matmul(a, b), repeats) / 1e9
        return rates
    import fastformer
    from fastformer.kernels.process import apply_process_settings

    apply_process_settings(int(os.environ["GEMM_THREADS"]))
    fastformer.set_backend("numba")
    ops = fastformer.get_ops()
    precision = "float32" if contender == "numpy f32" else "bfloat16"
    for name, (M, K, N) in shapes.items():
        a, b = rng.standard_normal((M, K), dtype=np.float32), rng.standard_normal((K, N), dtype=np.float32)
        out = np.empty((M, N), np.float32)
        if contender == "ff packed":  # the operands' rounding and packing done once, outside the timing
            from fastformer.kernels.ops.gemm_bf16 import pack_a

            a, b = pack_a(a), ops.pack(b, precision=precision)
        rates[name] = 2 * M * K * N / median_seconds(lambda: ops.matmul(a, b, out=out, precision=precision),
                                                     repeats) / 1e9
    return rates


def run(contender, shapes, threads, repeats):
    env = dict(os.environ, GEMM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    if contender == "torch bf16":
        env["TORCH_THREADS"] = str(threads)
    proc = subprocess.run([sys.executable, HERE, "--worker", contender, json.dumps(shapes), str(repeats)],
                          env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"{contender}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def main():
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        if sys.argv[2] == "torch bf16":
            import torch

            torch.set_num_threads(int(os.environ["TORCH_THREADS"]))
        print(json.dumps(worker(sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]))))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "small", "medium"])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds in which the contenders' processes take turns; each figure is the median of "
                         "its rounds (a shared machine's load moves between processes)")
    args = ap.parse_args()
    from fastformer.cli import bench

    print(f"GFLOP/s, median of {args.rounds} rounds taking turns, each the median of {args.repeats} calls; "
          "fastformer bf16 includes rounding and packing both inputs")
    print(f"{'preset':7s} {'gemm':13s} {'M x K x N':>18s} {'thr':>3s} {'numpy f32':>9s} {'ff bf16':>8s} "
          f"{'ff packed':>9s} {'torch bf16':>10s}  {'ff/numpy':>8s} {'ff/torch':>8s} {'packed/torch':>12s}")
    contenders = ("numpy f32", "fastformer bf16", "ff packed", "torch bf16")
    for preset in args.presets:
        shapes = bench.gemm_shapes(preset)
        for threads in args.threads:
            rounds = [{c: run(c, shapes, threads, args.repeats) for c in contenders} for _ in range(args.rounds)]
            r = {c: {name: float(np.median([got[c][name] for got in rounds])) for name in shapes} for c in contenders}
            for name, (M, K, N) in shapes.items():
                f32, mine, packed, torch = (r[c][name] for c in contenders)
                print(f"{preset:7s} {name:13s} {f'{M} x {K} x {N}':>18s} {threads:3d} {f32:9.1f} {mine:8.1f} "
                      f"{packed:9.1f} {torch:10.1f}  {mine / f32:7.2f}x {mine / torch:7.2f}x {packed / torch:11.2f}x",
                      flush=True)


if __name__ == "__main__":
    main()
