"""TinyStories end to end: BPE tokenizer, prepared tokens, the recipe
experiments/configs/tinystories_bpe.yaml (the `small` model), evaluation and sample stories, with
the figures a report needs (validation perplexity, bits per byte, training wall time, generation
tokens/s).

    python scripts/tinystories.py DATA_DIR [--out runs/tinystories]
        [--backend auto|numpy|numba] [--max-steps N] [--time-limit 900]

DATA_DIR holds tinystories_train_10k_lines.txt (stories separated by `<|endoftext|>` lines) and
tinystories_valid_sample.txt (stories separated by blank lines). Both are first rewritten to one
convention: stories separated by one blank line, each stripped of surrounding blank lines; the
train file's leading empty line and the cut-off fragment after its last separator are dropped.
(The validation file cannot be split into stories -- its paragraphs are blank-line separated too --
so a blank line is the only separator both files can share; no <eos> is inserted.)

Training runs in a child process stopped after --time-limit seconds; every checkpoint is atomic,
so a stopped run is evaluated at its newest checkpoint. OPENBLAS_NUM_THREADS defaults to 1 (on
two busy cores that is several times faster than one BLAS thread per core).
"""

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SOURCES = ("tinystories_train_10k_lines.txt", "tinystories_valid_sample.txt")
RECIPE = os.path.join(REPO, "experiments", "configs", "tinystories_bpe.yaml")
PROMPTS = ("Once upon a time", "Tom and Lily went to the park.", "One day, a little bird")


def normalise(train_src, valid_src, out_dir):
    """Write out_dir/train.txt and out_dir/valid.txt with stories separated by one blank line."""
    with open(train_src, encoding="utf-8") as f:
        chunks = f.read().split("\n<|endoftext|>\n")
    stories = [c.strip("\n") for c in chunks[:-1]]  # the last chunk is a cut-off fragment
    with open(valid_src, encoding="utf-8") as f:
        valid = f.read().strip("\n")
    paths = (os.path.join(out_dir, "train.txt"), os.path.join(out_dir, "valid.txt"))
    for path, text in zip(paths, ("\n\n".join(s for s in stories if s), valid)):
        with open(path, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return paths, len(stories)


def fastformer(*args, timeout=None):
    """Run one `fastformer` command in a child process; returns (returncode, stdout)."""
    cmd = [sys.executable, "-m", "fastformer.cli", *map(str, args)]
    print("$ fastformer " + " ".join(map(str, args)), flush=True)
    try:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        print(out, end="")
        return None, out
    print(r.stdout, end="", flush=True)
    if r.returncode:
        sys.exit(f"fastformer {args[0]} failed with status {r.returncode}")
    return r.returncode, r.stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data_dir")
    ap.add_argument("--out", default=os.path.join("runs", "tinystories"))
    ap.add_argument("--backend", default="auto", help="kernel backend: auto (default: numba when it imports), "
                                                      "numpy or numba")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--max-steps", type=int, help="optimizer steps (default: the recipe's train.max_steps)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="the training step's matrix products (train --precision)")
    ap.add_argument("--time-limit", type=float, default=900.0, help="seconds of training before it is stopped")
    ap.add_argument("--new-tokens", type=int, default=120)
    args = ap.parse_args()
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ["PYTHONPATH"] = REPO + os.pathsep + os.environ.get("PYTHONPATH", "")
    out = os.path.abspath(args.out)
    sources = [os.path.join(args.data_dir, name) for name in SOURCES]
    missing = [p for p in sources if not os.path.isfile(p)]
    if missing:  # checked before anything is written
        sys.exit(f"tinystories.py: error: {', '.join(missing)} not found: DATA_DIR must hold {' and '.join(SOURCES)}")
    if os.path.exists(os.path.join(out, "run")):
        sys.exit(f"tinystories.py: error: {out}/run already exists: remove it or pass another --out")
    os.makedirs(out, exist_ok=True)

    (train_txt, valid_txt), n_stories = normalise(*sources, out)
    print(f"normalised: {n_stories} training stories -> {train_txt}; validation -> {valid_txt}")
    tok, data, run = (os.path.join(out, d) for d in ("tokenizer", "data", "run"))
    fastformer("tokenizer", "train", "--data", train_txt, "--vocab-size", args.vocab_size, "--out", tok)
    fastformer("prepare", "--data", train_txt, "--val-data", valid_txt, "--tokenizer", tok, "--out", data)

    start = time.perf_counter()
    steps = ["--max-steps", args.max_steps] if args.max_steps else []
    status, _ = fastformer("train", "--config", RECIPE, "--data", data, "--out", run, "--backend", args.backend,
                           "--precision", args.precision, *steps, timeout=args.time_limit)
    train_seconds = time.perf_counter() - start
    if status is None:
        print(f"training stopped by the {args.time_limit:.0f} s limit; evaluating the newest checkpoint")

    _, ev = fastformer("eval", "--checkpoint", run, "--data", data, "--json", "--backend", args.backend)
    metrics = json.loads(ev.strip().splitlines()[-1])

    from fastformer import get_backend, set_backend
    from fastformer.atomic import write_json_atomic
    from fastformer.training.checkpoint import load_model

    set_backend(args.backend)
    backend = get_backend()  # the one `auto` chose
    model, tokenizer, _ = load_model(run)
    new_tokens, gen_seconds, samples = 0, 0.0, []
    for i, prompt in enumerate(PROMPTS):
        ids = tokenizer.encode(prompt)
        t0 = time.perf_counter()
        outp = model.generate(ids, args.new_tokens, temperature=0.8, top_k=40, seed=i, eos_id=tokenizer.eos_id)
        gen_seconds += time.perf_counter() - t0
        new_tokens += len(outp) - len(ids)
        samples.append(tokenizer.decode(outp))
    with open(os.path.join(run, "metrics.jsonl")) as f:
        last_step = [json.loads(line) for line in f][-1]["step"]
    report = {"backend": backend, "steps": last_step, "train_wall_seconds": round(train_seconds, 1),
              "val_loss": metrics["loss"], "val_ppl": metrics["ppl"], "val_bits_per_byte": metrics["bits_per_byte"],
              "val_acc": metrics["acc"], "val_tokens": metrics["tokens"],
              "generate_tokens_per_sec": new_tokens / gen_seconds, "samples": samples}
    write_json_atomic(report, os.path.join(out, "report.json"))
    print("\n".join(f"\n--- sample {i + 1} ---\n{s}" for i, s in enumerate(samples)))
    print(f"\nsteps {last_step} | train wall time {train_seconds:.0f} s | val ppl {metrics['ppl']:.2f} | "
          f"bits/byte {metrics['bits_per_byte']:.4f} | val acc {metrics['acc']:.3f} | generation "
          f"{report['generate_tokens_per_sec']:.1f} tokens/s (batch 1, {backend})")
    print(f"report: {os.path.join(out, 'report.json')}")


if __name__ == "__main__":
    main()
