"""`fastformer plot`: training and validation loss against step for one or more runs, read from
each run's metrics.jsonl, drawn with matplotlib's Agg backend into a PNG (the `plot` extra)."""

import json
import os

from fastformer.errors import FastformerError


def read_metrics(run_dir):
    """The records of RUN/metrics.jsonl as a list of dicts (a line cut by a crash is skipped)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FastformerError(f"no metrics in {run_dir!r}: expected {path} (written by fastformer train)")
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def plot_runs(run_dirs, out):
    """Draw train loss (solid) and validation loss (dashed, markers) vs step for each run into `out`."""
    try:
        import matplotlib
    except ImportError:
        raise FastformerError("fastformer plot needs matplotlib: pip install 'fastformer[plot]' "
                              "(or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for run in run_dirs:
        recs = read_metrics(run)
        name = os.path.basename(os.path.normpath(run))
        line, = ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], label=f"{name} train")
        val = [r for r in recs if "val_loss" in r]
        if val:
            ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "--o", markersize=3,
                    color=line.get_color(), label=f"{name} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
