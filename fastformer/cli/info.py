"""`fastformer info`: the backend, versions and threads; a config's exact parameter count; the
model shapes within a parameter budget (`--params LOW-HIGH`, models/sizes.py)."""

import math
import os
import platform
import re

import numpy as np

from fastformer.errors import FastformerError, format_bytes

_COUNT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmg]?)\s*$", re.IGNORECASE)


def add_parser(sub):
    p = sub.add_parser("info", help="show the backend, versions, threads and a config's exact parameter count")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", help="tiny, small or medium")
    g.add_argument("--config", help="YAML run config")
    p.add_argument("--data", help="data.path: the vocabulary sizes are taken from it as training does")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable); with --params a model key set here stays fixed")
    p.add_argument("--params", metavar="LOW-HIGH", help="list model shapes (width, depth, heads, d_ff) whose "
                                                        "parameter count lies in this range, e.g. 2M-3M")
    p.set_defaults(func=main)


def parse_budget(text):
    """(low, high) parameter counts of "2M-3M" (suffixes k, M, G; plain or 2e6 numbers too)."""
    parts = text.split("-")
    counts = [_COUNT.match(p) for p in parts]
    if len(parts) != 2 or not all(counts):
        raise FastformerError(f"--params {text!r} must be a range LOW-HIGH such as 2M-3M or 500k-1.5M "
                              f"(suffixes k, M, G)")
    values = [float(m[1]) * 1000 ** " kmg".index(m[2].lower() or " ") for m in counts]
    if not all(math.isfinite(v) and v < 1e15 for v in values):  # 1e400 is inf: no model has that many
        raise FastformerError(f"--params {text!r}: LOW and HIGH must be below 1e15 parameters")
    low, high = (round(v) for v in values)
    if not 0 < low <= high:
        raise FastformerError(f"--params {text!r} needs 0 < LOW <= HIGH, got {low:,} and {high:,}")
    return low, high


def info_config(args):
    """The RunConfig `info` sizes (preset or config file, --data, --set, vocabularies as training
    would make them) and a note on where its vocabulary sizes come from."""
    from fastformer.training.config import apply_overrides, load_config, preset
    from fastformer.training.tasks import sized_config

    config = preset("tiny" if args.preset is None else args.preset)
    if args.config is not None:
        config = load_config(args.config, base=config)
    config = apply_overrides(config, ([f"data.path={args.data}"] if args.data is not None else []) + list(args.set))
    return sized_config(config, data_given=bool(args.data))


def main(args):
    from fastformer import __version__, get_backend
    from fastformer.models.config import count_parameters
    from fastformer.training.distributed import get_comm

    comm = get_comm()  # first: under mpiexec it sets the ranks' share of the cores before the kernels load
    if comm.rank:
        return 0
    sizing = any(v is not None for v in (args.preset, args.config, args.data, args.params)) or args.set
    budget = parse_budget(args.params) if args.params else None
    config, vocab_note = info_config(args) if sizing else (None, None)  # bad input fails before any output
    print(f"fastformer {__version__}  python {platform.python_version()}  numpy {np.__version__}")
    if comm.size > 1:
        print(f"mpi: {comm.size} ranks, {comm.local_size} on this node (rank 0's)")
    print(f"backend: {get_backend()}  (FASTFORMER_BACKEND={os.environ.get('FASTFORMER_BACKEND', 'unset')})")
    from fastformer.kernels.process import process_info

    for key, value in process_info().items():
        print(f"{key}: {value}")
    if config is None:
        return 0
    m, name = config.model_config(), args.config or args.preset or "tiny"
    if budget is None:
        n = count_parameters(m)
        print(f"config {name} ({config.kind}): {m.describe()}")
        print(f"{n:,} parameters: {format_bytes(4 * n)} of float32 weights, {format_bytes(16 * n)} to train "
              f"(weights, gradients, two AdamW moments; activations extra); {vocab_note}")
        return 0
    from fastformer.models.sizes import configs_in_budget

    names = [item.split("=", 1)[0].strip().split(".", 1) for item in args.set]  # valid: apply_overrides took them
    found = configs_in_budget(m, *budget, {key for section, key in names if section == config.model_section})
    print(f"configs of {budget[0]:,}-{budget[1]:,} parameters like {name} ({config.kind}; {vocab_note}):")
    if not found:
        print("  none: widen the range or change the fixed keys")
        return 0
    print(f"  {'d_model':>7} {m.depth_label:>7} {'heads':>5} {'d_ff':>6} {'parameters':>12}")
    for n, c in found:
        print(f"  {c.d_model:>7} {c.depth():>7} {c.n_heads:>5} {c.d_ff:>6} {n:>12,}")
    section = config.model_section
    print(f"  train one with --set {section}.d_model=C --set {section}.{m.size_keys[1]}=L "
          f"--set {section}.n_heads=H --set {section}.d_ff=F")
    return 0
