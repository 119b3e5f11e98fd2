"""Quick check that the encoder-decoder learns the synthetic reverse task: a plain AdamW loop on
`model.flat` (no trainer), greedy exact match on held-out strings from a separate generator.

    FASTFORMER_BACKEND=numpy python scripts/train_reverse_quick.py --steps 3000 --eval-every 500
"""

import argparse
import math
import time

import numpy as np

from fastformer import get_ops
from fastformer.decode import greedy_decode
from fastformer.seq2seq import Seq2SeqConfig, Seq2SeqTransformer
from fastformer.seq2seq_data import SyntheticTask


def exact_match(model, task, pairs, batch_size=250):
    """Fraction of sources whose greedy decoding equals the target exactly, and token accuracy
    of the decoded prefix (position by position, against the target)."""
    tok = task.tokenizer
    hits = tok_hits = tok_total = 0
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        b = task.batch_of(chunk)
        seqs, _ = greedy_decode(model, b["src_ids"], b["src_mask"], tok.bos_id, tok.eos_id,
                                max_len=model.config.max_tgt_len)
        for seq, (_, tgt) in zip(seqs, chunk):
            out = tok.decode(seq)
            hits += out == tgt
            tok_hits += sum(a == c for a, c in zip(out, tgt))
            tok_total += len(tgt)
    return hits / len(pairs), tok_hits / tok_total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="reverse")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--min-len", type=int, default=1)
    ap.add_argument("--max-len", type=int, default=16)
    ap.add_argument("--alphabet", default="letters+digits+punctuation")
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--activation", default="gelu", help="relu is much faster while exact GELU runs in NumPy")
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--eval-n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    task = SyntheticTask(args.task, args.min_len, args.max_len, args.alphabet, args.batch_size,
                         rng=np.random.default_rng(args.seed))
    heldout = task.sample(args.eval_n, rng=np.random.default_rng(10_000 + args.seed))
    V = task.tokenizer.vocab_size
    cfg = Seq2SeqConfig(src_vocab_size=V, tgt_vocab_size=V, max_src_len=args.max_len, max_tgt_len=args.max_len + 1,
                        d_model=args.d_model, n_heads=4, d_ff=4 * args.d_model, n_encoder_layers=args.layers,
                        n_decoder_layers=args.layers, activation=args.activation)
    model = Seq2SeqTransformer(cfg, seed=args.seed)
    ops, flat = get_ops(), model.flat
    m, v = np.zeros_like(flat.data), np.zeros_like(flat.data)
    nd = flat.n_decay
    print(f"{model.num_parameters():,} parameters, vocab {V}, backend {ops.name}")
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        # forward/backward
        loss, _ = model.loss_and_grads(**task.next_batch())
        # clip the global gradient norm to 1
        norm = float(np.sqrt((flat.grad.astype(np.float64) ** 2).sum()))
        if norm > 1.0:
            flat.grad *= np.float32(1.0 / norm)
        # update: linear warmup, cosine decay to 10%
        frac = min(step / args.warmup, 1.0) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        lr = args.lr * frac
        ops.adamw_update(flat.data[:nd], flat.grad[:nd], m[:nd], v[:nd], lr=lr, beta2=0.98, weight_decay=0.01,
                         step=step)
        ops.adamw_update(flat.data[nd:], flat.grad[nd:], m[nd:], v[nd:], lr=lr, beta2=0.98, step=step)
        # log / evaluate
        if step % 100 == 0:
            elapsed = time.perf_counter() - t0
            print(f"step {step:5d}  loss {loss:.4f}  |g| {norm:.2f}  lr {lr:.2e}  {elapsed:6.1f}s", flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            em, ta = exact_match(model, task, heldout)
            print(f"step {step:5d}  held-out exact match {em:.3f}  char accuracy {ta:.3f}  "
                  f"({time.perf_counter() - t0:.1f}s)", flush=True)


if __name__ == "__main__":
    main()
