"""`fastformer plot`: metrics of one or more runs against step, read from each run's
metrics.jsonl, drawn with matplotlib's Agg backend into a PNG (the `plot` extra).

    fastformer plot runs/bytes runs/bpe --metric val_bpb --out bpb.png
    fastformer plot runs/tiny --metric loss val_loss lr --logy --out tiny.png

Each run is one colour in every panel. Metrics in the same unit share a panel (training and
validation loss, nats per token); the others get a panel each, side by side. Bits per byte
(`val_bpb`) is the one that compares runs with different tokenizers: a byte-level and a BPE
model predict different tokens, but the same bytes.
"""

import os

from fastformer.atomic import atomic_open
from fastformer.errors import FastformerError, check_choice, printable

# metric: (legend suffix, the y-axis label: metrics with the same label share a panel)
METRICS = {
    "loss": ("train", "loss (nats per token)"),
    "val_loss": ("val", "loss (nats per token)"),
    "val_bpb": ("val", "bits per byte"),
    "val_ppl": ("val", "perplexity"),
    "lr": ("", "learning rate"),
    "tokens_per_sec": ("", "tokens/s"),
}
DEFAULT_METRICS = ("loss", "val_loss")


def read_metrics(run_dir):
    """The records of RUN/metrics.jsonl as a list of dicts (a line cut by a crash, or any line
    fastformer did not write, is skipped)."""
    from fastformer.training.checkpoint import METRICS_FILE, read_metrics_lines

    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.lexists(path):
        raise FastformerError(f"no metrics in {run_dir!r}: expected {path} (written by fastformer train)")
    return [r for _, r in read_metrics_lines(path) if r is not None]


def series(records, metric):
    """(steps, values) of the records that hold `metric`."""
    rows = [r for r in records if isinstance(r.get(metric), (int, float))]
    return [r["step"] for r in rows], [r[metric] for r in rows]


def panels(metrics):
    """The metrics grouped by y-axis label, in the order first asked: [(label, [metric, ...])]."""
    groups = {}
    for m in metrics:
        check_choice("--metric", m, tuple(METRICS))
        groups.setdefault(METRICS[m][1], []).append(m)
    return list(groups.items())


def plot_data(run_dirs, metrics=DEFAULT_METRICS):
    """What `plot_runs` draws: [(y label, [(run index, line label, metric, steps, values), ...]), ...],
    one entry per panel. A metric no run logged is an error naming the runs (an encoder-decoder
    logs no val_bpb or val_ppl); a run without one of several metrics is left out of that panel."""
    groups = panels(metrics)  # checked before anything is read
    runs = [(os.path.basename(os.path.normpath(run)), read_metrics(run)) for run in run_dirs]
    for m in dict.fromkeys(metrics):
        if not any(series(recs, m)[0] for _, recs in runs):
            raise FastformerError(f"no run logs {m}: {', '.join(run_dirs)} (language models log val_bpb and "
                                  f"val_ppl at each evaluation; encoder-decoders log val_loss, val_acc, val_exact, "
                                  f"val_bleu)")
    data = []
    for label, names in groups:
        lines = []
        for i, (run, recs) in enumerate(runs):
            for m in names:
                steps, values = series(recs, m)
                suffix = METRICS[m][0] if len(names) > 1 else ""
                if steps:
                    lines.append((i, f"{run} {suffix}".strip(), m, steps, values))
        data.append((label, lines))
    return data


def plot_runs(run_dirs, out, metrics=DEFAULT_METRICS, logy=False):
    """Draw each metric of each run against step into the PNG `out` (see plot_data); returns `out`."""
    if not out.lower().endswith(".png"):
        raise FastformerError(f"--out {out!r} must name a .png file: the plot is written as PNG")
    data = plot_data(run_dirs, metrics)
    try:
        import matplotlib
    except ImportError:
        raise FastformerError("fastformer plot needs matplotlib: pip install 'fastformer[plot]' "
                              "(or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(data), figsize=(6 * len(data), 4.5), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (label, lines) in zip(axes[0], data):
        for i, name, metric, steps, values in lines:
            ax.plot(steps, values, "--o" if metric.startswith("val_") else "-", markersize=3,
                    color=colours[i % len(colours)], label=name)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both" if logy else "major")
        ax.legend()
    fig.tight_layout()
    with atomic_open(out, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
    return out


def add_arguments(p):
    """The options of `fastformer plot` on the subparser `p`."""
    p.add_argument("runs", nargs="+", help="run directories (one colour each)")
    p.add_argument("--metric", nargs="+", default=list(DEFAULT_METRICS), choices=list(METRICS),
                   help="what to plot against step; metrics in the same unit share a panel, the others "
                        "stand side by side (default: loss val_loss). val_bpb compares runs whose "
                        "tokenizers differ")
    p.add_argument("--logy", action="store_true", help="logarithmic y axis")
    p.add_argument("--out", required=True, help="PNG file to write")


def main(args):
    print(printable(f"wrote {plot_runs(args.runs, args.out, args.metric, args.logy)}"))
    return 0


def add_parser(sub):
    p = sub.add_parser("plot", help="plot metrics of runs against step (loss, val_bpb, lr, ...)")
    add_arguments(p)
    p.set_defaults(func=main)
