"""Fine-tuning GPT-2 small: `fastformer train --init-from` against PyTorch on the same model, text
and batch -- training steps/s and peak resident memory of each.

This process builds a randomly initialised `transformers.GPT2LMHeadModel` of GPT-2 small's shape
(12 layers, 12 heads, width 768, context 1024, V = 50,257: 124M parameters) and saves it with
`save_pretrained` (safetensors), beside a tokenizer.json of V ids: byte-level BPE without merges
(the 256 byte tokens), placeholder tokens up to V - 1 that no text produces, and GPT-2's
<|endoftext|> as id V - 1. (GPT-2's own merges cannot be downloaded here; a step costs the same
whichever ids the text becomes.) Then each side runs in a process of its own, one after the other:

    fastformer  `python -m fastformer.cli train --init-from DIR --data TEXT ...`: the model, its
                tokenizer and weights from DIR, a fresh AdamW; the step times come from the run's
                metrics.jsonl (one line per step)
    PyTorch     this file with --torch-worker: GPT2LMHeadModel.from_pretrained(DIR), the same text
                through the same tokenizer.json (`tokenizers`), torch.optim.AdamW with fastformer's
                settings and decay groups, gradient clipping at 1.0; it never imports fastformer

Both train `--steps` steps on random windows of batch `--batch-size` x `--seq-len`, dropout 0,
a constant learning rate, evaluate one batch and end by writing the weights and the optimizer
state as safetensors (fastformer's final checkpoint; PyTorch: save_pretrained and the AdamW
moments), so both peaks hold the same things. steps/s is the rate of the median step after the
first (the first pays for warm-up: JIT, allocator); peak RSS is the process's maximum resident
set (os.wait4), loading the weights included. Threads: `--threads` (default the cores) for
fastformer (FASTFORMER_NUM_THREADS) and PyTorch (torch.set_num_threads).

    python benchmarks/finetune_gpt2.py                      # GPT-2 small (minutes, ~6 GB)
    python benchmarks/finetune_gpt2.py --layers 2 --heads 2 --width 64 --context 64 --vocab 512 \\
        --batch-size 2 --seq-len 32 --steps 3               # a tiny shape: does it run?
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LR, BETAS, EPS, WEIGHT_DECAY, CLIP = 1e-4, (0.9, 0.99), 1e-8, 0.1, 1.0  # fastformer's AdamW defaults


# ------------------------------------------------------------------ the model and its files
def write_tokenizer(path, vocab_size):
    """tokenizer.json: byte-level BPE of `vocab_size` ids, <|endoftext|> the last (see the docstring)."""
    import tokenizers as tk

    from fastformer.data.bpe import GPT2_SPECIAL, byte_level_chars

    vocab = {c: i for i, c in enumerate(byte_level_chars())}
    vocab.update({f"<|unused{i}|>": i for i in range(256, vocab_size - 1)})
    tok = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = tk.decoders.ByteLevel()
    tok.add_special_tokens([GPT2_SPECIAL])
    assert tok.get_vocab_size() == vocab_size and tok.token_to_id(GPT2_SPECIAL) == vocab_size - 1
    tok.save(os.path.join(path, "tokenizer.json"))


def write_model(path, args):
    """A randomly initialised GPT2LMHeadModel of the shape in `args`, saved to `path`; returns its
    parameter count."""
    import torch
    import transformers

    cfg = transformers.GPT2Config(vocab_size=args.vocab, n_positions=args.context, n_embd=args.width,
                                  n_layer=args.layers, n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0, bos_token_id=args.vocab - 1, eos_token_id=args.vocab - 1)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    model.save_pretrained(path, safe_serialization=True)
    write_tokenizer(path, args.vocab)
    return sum(p.numel() for p in model.parameters())


def write_text(path):
    """The text to fine-tune on: fastformer's embedded corpus (Python's standard-library docs)."""
    from fastformer.data.text import default_corpus

    with open(path, "w", encoding="utf-8") as f:
        f.write(default_corpus())


# ------------------------------------------------------------------------ the two sides
def run_measured(cmd, env, log):
    """Run `cmd` to the end; (exit status, peak RSS in bytes, wall seconds). Output goes to `log`."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss * 1024, time.perf_counter() - start  # ru_maxrss: KiB on Linux


def fastformer_side(args, model_dir, text, work, env, precision="fp32"):
    run = os.path.join(work, f"fastformer-run-{precision}")
    sets = {"train.batch_size": args.batch_size, "train.seq_len": args.seq_len, "train.lr": LR,
            "train.schedule": "constant", "train.warmup_steps": 0, "train.log_interval": 1,
            "train.eval_interval": args.steps, "train.eval_batches": 1, "train.checkpoint_interval": args.steps,
            "train.keep_checkpoints": 1, "model.dropout": 0.0}
    cmd = [sys.executable, "-m", "fastformer.cli", "train", "--init-from", model_dir, "--data", text, "--out", run,
           "--max-steps", str(args.steps), "--precision", precision]
    if args.backend:
        cmd += ["--backend", args.backend]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    code, rss, wall = run_measured(cmd, env, os.path.join(work, f"fastformer-{precision}.log"))
    if code:
        with open(os.path.join(work, f"fastformer-{precision}.log")) as f:
            raise SystemExit(f"the fastformer run failed (status {code}):\n{f.read()}")
    with open(os.path.join(run, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    tokens = args.batch_size * args.seq_len
    times = [tokens / r["tokens_per_sec"] for r in records if "tokens_per_sec" in r]
    return {"step_seconds": times, "peak_rss": rss, "wall_seconds": wall}


def torch_side(args, model_dir, text, work, env):
    cmd = [sys.executable, os.path.abspath(__file__), "--torch-worker", model_dir, text,
           os.path.join(work, "torch-result.json"), os.path.join(work, "torch-out"),
           str(args.batch_size), str(args.seq_len), str(args.steps), str(args.threads)]
    code, rss, wall = run_measured(cmd, env, os.path.join(work, "torch.log"))
    if code:
        with open(os.path.join(work, "torch.log")) as f:
            raise SystemExit(f"the PyTorch run failed (status {code}):\n{f.read()}")
    with open(os.path.join(work, "torch-result.json")) as f:
        result = json.load(f)
    return {"step_seconds": result["step_seconds"], "peak_rss": rss, "wall_seconds": wall}


def torch_worker(model_dir, text, result, out_dir, batch_size, seq_len, steps, threads):
    """The PyTorch side, in its own process: no fastformer import anywhere below."""
    import tokenizers
    import torch
    import transformers
    from safetensors.torch import save_file

    assert "fastformer" not in sys.modules
    torch.set_num_threads(threads)
    model = transformers.GPT2LMHeadModel.from_pretrained(model_dir, local_files_only=True)
    model.train()
    tok = tokenizers.Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    with open(text, encoding="utf-8") as f:
        ids = np.array(tok.encode(f.read(), add_special_tokens=False).ids, dtype=np.int64)
    split = int(len(ids) * 0.9)  # fastformer's data.val_fraction 0.1: the last tenth validates
    train_ids, val_ids = ids[:split], ids[split:]
    # fastformer's decay rule: 2-D weights but the position rows; its AdamW settings
    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and "wpe" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() == 2 and "wpe" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": rest, "weight_decay": 0.0}],
                            lr=LR, betas=BETAS, eps=EPS)
    rng = np.random.default_rng(0)

    def window(stream):
        starts = rng.integers(0, len(stream) - seq_len - 1, size=batch_size)
        x = np.stack([stream[s:s + seq_len + 1] for s in starts])
        return torch.from_numpy(x[:, :-1]), torch.from_numpy(x[:, 1:])

    times = []
    for _ in range(steps):
        x, y = window(train_ids)
        t = time.perf_counter()
        logits = model(x).logits
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        times.append(time.perf_counter() - t)
    with torch.no_grad():  # one validation batch, as the fastformer run's last step
        x, y = window(val_ids)
        model(x)
    model.save_pretrained(out_dir, safe_serialization=True)
    moments = {f"{k}.{i}": v for i, p in enumerate(model.parameters()) for k, v in opt.state[p].items()
               if torch.is_tensor(v) and v.dim()}
    save_file(moments, os.path.join(out_dir, "optimizer.safetensors"))
    with open(result, "w") as f:
        json.dump({"step_seconds": times, "loss": loss.item()}, f)


# ------------------------------------------------------------------------------ report
def summary(name, r):
    timed = r["step_seconds"][1:] or r["step_seconds"]  # the first step warms up
    median = statistics.median(timed)
    return {"contender": name, "steps_per_s": 1.0 / median, "seconds_per_step": median,
            "peak_rss_gb": r["peak_rss"] / 1e9, "wall_seconds": r["wall_seconds"], "timed_steps": len(timed)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="training steps of each side (the first is not timed)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--backend", help="fastformer's kernel backend (default: auto)")
    parser.add_argument("--data", help="text file to fine-tune on (default: fastformer's embedded corpus)")
    parser.add_argument("--keep", help="directory to keep the model, runs and logs in (default: a temporary one)")
    parser.add_argument("--bf16", action="store_true", help="also fastformer with train.precision=bf16")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if args.vocab < 257 or args.steps < 1 or args.seq_len > args.context:
        parser.error("--vocab must be >= 257 (256 bytes + <|endoftext|>), --steps >= 1, --seq-len <= --context")

    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or tmp
        os.makedirs(work, exist_ok=True)
        model_dir = os.path.join(work, "gpt2")
        n_params = write_model(model_dir, args)
        text = args.data or os.path.join(work, "text.txt")
        if not args.data:
            write_text(text)
        env = {**os.environ, "FASTFORMER_NUM_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads),
               "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
        rows = [summary("fastformer", fastformer_side(args, model_dir, text, work, env))]
        if args.bf16:
            rows.append(summary("ff bf16", fastformer_side(args, model_dir, text, work, env, "bf16")))
        rows.append(summary("PyTorch", torch_side(args, model_dir, text, work, env)))
    shape = {"parameters": n_params, "layers": args.layers, "heads": args.heads, "width": args.width,
             "context": args.context, "vocab": args.vocab, "batch_size": args.batch_size, "seq_len": args.seq_len,
             "steps": args.steps, "threads": args.threads}
    if args.json:
        print(json.dumps({**shape, "results": rows}))
        return
    print(f"fine-tuning a GPT-2 of {n_params:,} parameters ({args.layers} layers, {args.heads} heads, width "
          f"{args.width}, V {args.vocab:,}), batch {args.batch_size} x {args.seq_len}, {args.threads} threads")
    print(f"{'':<12}{'steps/s':>10}{'s/step':>10}{'peak RSS':>12}{'wall':>9}")
    for r in rows:
        print(f"{r['contender']:<12}{r['steps_per_s']:>10.3f}{r['seconds_per_step']:>10.3f}"
              f"{r['peak_rss_gb']:>9.2f} GB{r['wall_seconds']:>8.1f}s")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--torch-worker":
        model_dir, text, result, out_dir, *numbers = sys.argv[2:]
        torch_worker(model_dir, text, result, out_dir, *map(int, numbers))
    else:
        main()
