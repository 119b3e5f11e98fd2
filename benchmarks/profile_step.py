"""Where a training step's time goes, by kernel: wraps every kernel method of the selected
backend (the linear layers' included) with timers, runs a few steps of a bench preset (the step of
`fastformer bench`: bench.train_setup), and prints milliseconds per step for each, with the
remainder (Python, reshapes, NumPy glue) last, and then the time of every BLAS matrix product of
the step together (they lie inside the rows above): those of the main thread, and apart those that
a backend runs on threads of its own, side by side (the fused LM head's chunk groups, the tiled
attention's heads), whose times add up to more than the wall time they take.

A kernel that calls another one (the linear layers and the fused LM head call ops.matmul) is one row:
only the outermost timed call counts, so no time is in two rows
and the rows with "other" add up to the step.

    python benchmarks/profile_step.py --preset tiny --backend numba
"""

import argparse
import collections
import threading
import time

import fastformer
from fastformer.cli import bench
from fastformer.training.config import MATMUL_PRECISION, PRESETS


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=list(PRESETS))
    ap.add_argument("--backend", default="numba", choices=["numpy", "numba"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=None, help="rows per step (default: the preset's)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per row (default: the preset's)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="the step's matrix products")
    args = ap.parse_args()

    fastformer.set_backend(args.backend)
    ops = fastformer.get_ops()
    spent = collections.defaultdict(float)
    running = []  # the row of `spent` being timed now, if any

    def timed(name, fn, into=spent):
        """fn, adding its time to into[name]; a row of `spent` called inside another is that one's."""
        def wrapper(*a, **kw):
            if into is spent:
                if running:
                    return fn(*a, **kw)
                running.append(name)
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                into[name] += time.perf_counter() - t
                if into is spent:
                    running.pop()
        return wrapper

    for name in dir(ops):
        if name.endswith(("_forward", "_backward", "_update")) and not name.startswith("_"):
            setattr(ops, name, timed(name, getattr(ops, name)))
    gemms = collections.defaultdict(float)  # every ops.matmul: the layers, the fused LM head, tiled attention
    main_thread = threading.get_ident()
    on_main, on_tasks = timed("main", ops.matmul, into=gemms), timed("tasks", ops.matmul, into=gemms)

    def gemm(*a, **kw):
        """ops.matmul, timed apart on the main thread and on the threads of the task pool (the
        fused LM head's chunk groups and the tiled attention's heads run side by side)."""
        return (on_main if threading.get_ident() == main_thread else on_tasks)(*a, **kw)

    ops.matmul = gemm

    setup = bench.train_setup(args.preset, batch=args.batch, seq_len=args.seq_len)

    def step():
        with fastformer.kernels.use_precision(MATMUL_PRECISION[args.precision]):
            setup.model.loss_and_grads(setup.ids, setup.targets)
        setup.optimizer.step(setup.lr)

    step()
    spent.clear()
    gemms.clear()
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    total = (time.perf_counter() - t) / args.steps
    print(f"{args.preset} / {args.backend} / {args.precision}: {total * 1e3:.1f} ms per step")
    for name, s in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"  {name:28s} {s / args.steps * 1e3:8.1f} ms  {100 * s / args.steps / total:5.1f}%")
    rest = total - sum(spent.values()) / args.steps
    print(f"  {'other':28s} {rest * 1e3:8.1f} ms  {100 * rest / total:5.1f}%")
    g, g_tasks = gemms["main"] / args.steps, gemms["tasks"] / args.steps
    print(f"BLAS GEMMs of the main thread (inside the rows above): {g * 1e3:.1f} ms  {100 * g / total:.1f}%; "
          f"of the task threads, side by side, their times added: {g_tasks * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
