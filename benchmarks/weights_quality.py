"""What the inference weight formats (model.quantize: fp32, bf16, int8) cost in quality, for one
trained run directory.

Language model: `fastformer eval --weights F --json` on the run's own validation data (or the
recipe's `--data`), its loss and perplexity per format and the perplexity's relative change
against fp32; then 100 greedy continuations of 128 tokens after 16-token prompts taken from the
validation tokens at evenly spread offsets, batch 1, decoded in each format: the fraction
identical to fp32's, and the mean number of leading new tokens that agree with fp32's.

Encoder-decoder: `fastformer eval --weights F --json` greedy and with the recipe's beam, the BLEU
of each format and its difference to fp32's.

The gates (docs/generation.md): perplexity within 1% of fp32's for int8 and 0.2% for bf16; BLEU
within 0.5 of fp32's for int8. Every figure is deterministic (the kernels sum in a fixed order),
so one run is the measurement.

    python benchmarks/weights_quality.py RUN [--data PREPARED_DIR]
    python benchmarks/weights_quality.py ENFR_RUN --beam 4 --length-penalty 0.6 [--examples 2000]
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORMATS = ("fp32", "bf16", "int8")
PPL_GATES = {"bf16": 0.002, "int8": 0.01}  # largest relative perplexity change against fp32
BLEU_GATES = {"int8": 0.5}  # largest BLEU drop against fp32


def run_eval(run, fmt, *options):
    """The JSON report of `fastformer eval --checkpoint run --weights fmt *options`, in a child process."""
    cmd = [sys.executable, "-m", "fastformer.cli", "eval", "--checkpoint", run, "--weights", fmt, "--json",
           *options]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        sys.exit(f"weights_quality: {' '.join(cmd[2:])} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def prompts_from(ids, n, prompt_len):
    """n prompts (n, prompt_len) of consecutive validation ids at evenly spread offsets."""
    starts = np.linspace(0, len(ids) - prompt_len, n).astype(np.int64)
    return np.stack([np.asarray(ids[s:s + prompt_len], dtype=np.int64) for s in starts])


def continuations(model, prompts, new_tokens):
    """(n, new_tokens) greedy new ids of each prompt, decoded alone (batch 1)."""
    return np.stack([model.generate(p, new_tokens, temperature=0)[len(p):] for p in prompts])


def agreement(ref, other):
    """(fraction of rows identical, mean number of leading ids equal) of two (n, T) id arrays."""
    same = ref == other
    leading = np.where(same.all(axis=1), same.shape[1], np.argmin(same, axis=1))
    return float(same.all(axis=1).mean()), float(leading.mean())


def lm_quality(args, formats):
    import fastformer
    from fastformer.training.checkpoint import load_checkpoint
    from fastformer.training.eval_data import lm_eval_tokens

    options = ["--data", args.data] if args.data else []
    reports = {fmt: run_eval(args.run, fmt, *options) for fmt in formats}
    fastformer.set_backend("numba")
    ckpt = load_checkpoint(args.run)
    model = ckpt.new_model()
    ids = lm_eval_tokens(ckpt.config, ckpt.tokenizer, ckpt, model.config.max_seq_len, args.data).ids
    prompts = prompts_from(ids, args.prompts, args.prompt_len)
    tokens = {fmt: continuations(model.quantize(fmt), prompts, args.new_tokens) for fmt in formats}

    base = reports["fp32"]
    print(f"{args.run}: {base['data']}, {base['tokens']:,} tokens scored")
    print(f"greedy: {args.prompts} prompts of {args.prompt_len} validation tokens, {args.new_tokens} new tokens each, "
          f"batch 1")
    print(f"{'weights':8s} {'loss':>8s} {'ppl':>9s} {'ppl vs fp32':>12s} {'gate':>6s} {'same as fp32':>13s} "
          f"{'leading agree':>14s}")
    result = {}
    for fmt in formats:
        r = reports[fmt]
        change = r["ppl"] / base["ppl"] - 1
        same, leading = agreement(tokens["fp32"], tokens[fmt])
        gate = PPL_GATES.get(fmt)
        verdict = "" if gate is None else ("met" if abs(change) <= gate else "MISSED")
        print(f"{fmt:8s} {r['loss']:8.4f} {r['ppl']:9.3f} {100 * change:+11.3f}% {verdict:>6s} {100 * same:12.0f}% "
              f"{leading:10.1f}/{args.new_tokens}")
        result[fmt] = dict(loss=r["loss"], ppl=r["ppl"], ppl_change=change, identical=same, leading=leading)
    return result


def seq2seq_quality(args, formats):
    decodings = [("greedy", [])]
    if args.beam and args.beam > 1:
        decodings.append((f"beam {args.beam}", ["--beam", str(args.beam), "--length-penalty",
                                                str(args.length_penalty)]))
    options = (["--data", args.data] if args.data else []) + \
        (["--examples", str(args.examples)] if args.examples else [])
    result = {}
    for name, extra in decodings:
        reports = {fmt: run_eval(args.run, fmt, *options, *extra) for fmt in formats}
        base = reports["fp32"]
        print(f"{args.run} ({name}): {base['examples']:,} examples of {base['data']}")
        print(f"{'weights':8s} {'loss':>8s} {'BLEU':>7s} {'vs fp32':>8s} {'gate':>6s} {'sacreBLEU':>10s} "
              f"{'exact':>7s}")
        for fmt in formats:
            r = reports[fmt]
            delta = r["bleu"] - base["bleu"]
            gate = BLEU_GATES.get(fmt)
            verdict = "" if gate is None else ("met" if delta >= -gate else "MISSED")
            sacre = "-" if r["sacrebleu"] is None else f"{r['sacrebleu']:.2f}"
            print(f"{fmt:8s} {r['loss']:8.4f} {r['bleu']:7.2f} {delta:+8.2f} {verdict:>6s} {sacre:>10s} "
                  f"{r['exact_match']:7.4f}")
            result[(name, fmt)] = dict(loss=r["loss"], bleu=r["bleu"], bleu_change=delta)
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a trained run directory (its newest checkpoint) or checkpoint directory")
    ap.add_argument("--data", help="the data the recipe evaluates on (eval --data); default the run's own "
                                   "validation split")
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS,
                    help="weight formats to compare with fp32 (default all)")
    ap.add_argument("--prompts", type=int, default=100, help="language model: greedy prompts (default 100)")
    ap.add_argument("--prompt-len", type=int, default=16, help="language model: tokens per prompt (default 16)")
    ap.add_argument("--new-tokens", type=int, default=128, help="language model: new tokens (default 128)")
    ap.add_argument("--beam", type=int, help="encoder-decoder: also score this beam size")
    ap.add_argument("--length-penalty", type=float, default=1.0, help="encoder-decoder: beam length penalty")
    ap.add_argument("--examples", type=int, help="encoder-decoder: pairs to score (eval --examples; default the "
                                                 "trainer's validation set)")
    args = ap.parse_args(argv)
    from fastformer.training.checkpoint import checkpoint_kind

    formats = ["fp32"] + [f for f in args.formats if f != "fp32"]
    if checkpoint_kind(args.run) == "lm":
        return lm_quality(args, formats)
    return seq2seq_quality(args, formats)


if __name__ == "__main__":
    main()
