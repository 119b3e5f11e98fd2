"""Evaluation, the same numbers for the trainer's validation and `fastformer eval`.

Language model: loss, perplexity, bits per byte and next-token accuracy over fixed windows of a
token stream. Encoder-decoder: teacher-forced loss and token accuracy, and exact match and corpus
BLEU of the decoded (greedy or beam) outputs, over a list of (source, target) text pairs.

Bits per byte divides the total loss by the UTF-8 bytes of the predicted tokens,

    bpb = sum of -ln p(target) / (ln 2 * sum of bytes(target)),

so models with different tokenizers compare on the same footing: a tokenizer with longer tokens
has a higher loss per token but as many bytes to spread it over. `bytes(target)` comes from the
tokenizer's `byte_lengths()` table (special tokens count 0 bytes), which needs no decoding and
works on memory-mapped token files.

Each metric is a ratio of sums over batches, so a data-parallel run splits the batches: every rank
computes the sums of its share (`lm_sums` / `seq2seq_sums` with shard=(rank, ranks)) and rank 0
forms the metrics from all the parts (`lm_metrics` / `seq2seq_metrics`), the one-process numbers
up to the order of the float64 loss sum. One process is the single part of the same functions.
"""

import math

import numpy as np

from fastformer.data.pairs import make_batch, readable
from fastformer.data.text import eval_batches
from fastformer.errors import FastformerError, check_int
from fastformer.generation.search import beam_decode, greedy_decode
from fastformer.kernels import IGNORE_INDEX, get_ops
from fastformer.training.bleu import corpus_bleu, detokenized_bleu


def evaluate_lm(model, ids, batch_size, seq_len, max_batches=None, byte_lengths=None):
    """Metrics of `model` on non-overlapping windows of T + 1 tokens evenly spread over `ids`.

    Args:
        ids: 1-D token stream (any integer dtype, e.g. a np.memmap).
        max_batches: at most this many batches of `batch_size` windows; None covers the whole
            stream (every complete window).
        byte_lengths: (V,) bytes per id; without it, "bits_per_byte" is left out.
    Returns {"loss", "ppl", "acc", "tokens"} and, with byte_lengths, {"bytes", "bits_per_byte"}.
    Deterministic: the same windows every time, no random generator.
    """
    return lm_metrics([lm_sums(model, ids, batch_size, seq_len, max_batches, byte_lengths)])


def lm_sums(model, ids, batch_size, seq_len, max_batches=None, byte_lengths=None, shard=(0, 1)):
    """The sums behind evaluate_lm's metrics over every `shard[1]`-th batch from batch shard[0]:
    {"loss_sum", "correct", "tokens", "bytes" (None without byte_lengths)}."""
    check_int("batch_size", batch_size)
    check_int("seq_len", seq_len)
    if max_batches is not None:
        check_int("max_batches", max_batches)
    n_windows = (len(ids) - 1) // seq_len
    if n_windows < 1:
        raise FastformerError(f"the evaluation text has {len(ids)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    if max_batches is None:
        max_batches = -(-n_windows // batch_size)
    ops, (rank, ranks) = get_ops(), shard
    total_loss, correct, n, n_bytes = 0.0, 0, 0, 0
    for i, (x, y) in enumerate(eval_batches(ids, batch_size, seq_len, max_batches)):
        if i % ranks != rank:
            continue
        logits = model.forward(x)  # (b, T, V), inference mode
        loss, _ = ops.cross_entropy_forward(logits, y)
        total_loss += float(loss) * y.size
        correct += int((logits.argmax(axis=-1) == y).sum())
        n += y.size
        if byte_lengths is not None:
            n_bytes += int(byte_lengths[y].sum())
    return {"loss_sum": total_loss, "correct": correct, "tokens": n,
            "bytes": n_bytes if byte_lengths is not None else None}


def lm_metrics(parts):
    """evaluate_lm's dict from the lm_sums of every shard (a list, rank order)."""
    total_loss = parts[0]["loss_sum"]
    for p in parts[1:]:
        total_loss += p["loss_sum"]
    correct, n = sum(p["correct"] for p in parts), sum(p["tokens"] for p in parts)
    loss = total_loss / n
    out = {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "acc": correct / n, "tokens": n}
    if parts[0]["bytes"] is not None:
        n_bytes = sum(p["bytes"] for p in parts)
        out["bytes"] = n_bytes
        out["bits_per_byte"] = total_loss / (math.log(2) * n_bytes) if n_bytes else float("nan")
    return out


def evaluate_seq2seq(model, pairs, src_tok, tgt_tok, batch_size=64, beam_size=1, length_penalty=1.0, lang="en"):
    """Metrics of a Seq2SeqTransformer on (source, target) text pairs, each short enough for the
    model (see seq2seq_data.fit_pairs).

    Returns {"loss", "token_acc"} (teacher forcing: mean cross-entropy and argmax accuracy over
    the target tokens and <eos>), {"exact_match"} (the fraction of decoded outputs whose ids
    equal the target's), {"bleu", "bleu_impl"} (corpus BLEU of the decoded text against the
    targets as the tokenizer writes them; "sacrebleu" or "fastformer"), {"sacrebleu"} (the
    standard BLEU: the outputs detokenized as `lang` writes them, data.pairs.readable, against the
    targets as written, sacrebleu's 13a tokenization; None without sacrebleu) and {"examples"}.
    Decoding is greedy when beam_size is 1. Deterministic: no random generator.
    """
    return seq2seq_metrics([seq2seq_sums(model, pairs, src_tok, tgt_tok, batch_size, beam_size, length_penalty,
                                         lang=lang)])


def seq2seq_sums(model, pairs, src_tok, tgt_tok, batch_size=64, beam_size=1, length_penalty=1.0, shard=(0, 1),
                 lang="en"):
    """The sums behind evaluate_seq2seq's metrics over shard[0]'s contiguous share of the batches
    of `pairs` (of shard[1] shares): {"loss_sum", "correct", "tokens", "exact", "examples",
    "hyps", "refs"} (the decoded and reference texts in tokens, for BLEU) and {"text_hyps",
    "text_refs"} (detokenized outputs and the targets as written, for the standard BLEU)."""
    if not pairs:
        raise FastformerError("no (source, target) pairs to evaluate on")
    check_int("batch_size", batch_size)
    check_int("beam_size", beam_size)
    ops, (rank, ranks) = get_ops(), shard
    bos, eos = tgt_tok.bos_id, tgt_tok.eos_id
    normalize = getattr(tgt_tok, "normalize", lambda text: text)  # words: the spacing decode writes
    total_loss, correct, n_tokens, exact = 0.0, 0, 0, 0
    hyps, refs, text_hyps, text_refs = [], [], [], []
    starts = range(0, len(pairs), batch_size)
    nb = len(starts)
    for i in starts[rank * nb // ranks:(rank + 1) * nb // ranks]:
        chunk = pairs[i:i + batch_size]
        tgt_seqs = [tgt_tok.encode(t) for _, t in chunk]
        b = make_batch([src_tok.encode(s) for s, _ in chunk], tgt_seqs, tgt_tok.pad_id, bos, eos)
        logits = model.forward(b["src_ids"], b["src_mask"], b["tgt_in"], b["tgt_mask"])  # (B, T, V)
        loss, _ = ops.cross_entropy_forward(logits, b["targets"])
        counted = b["targets"] != IGNORE_INDEX  # (B, T)
        total_loss += loss * int(counted.sum())
        correct += int(((logits.argmax(axis=-1) == b["targets"]) & counted).sum())
        n_tokens += int(counted.sum())
        if beam_size == 1:
            out, _ = greedy_decode(model, b["src_ids"], b["src_mask"], bos, eos)
        else:
            out, _ = beam_decode(model, b["src_ids"], b["src_mask"], beam_size, length_penalty, bos, eos)
        for o, t_ids, (_, t_text) in zip(out, tgt_seqs, chunk):
            exact += np.array_equal(o, t_ids)
            hyps.append(tgt_tok.decode(o))
            refs.append(normalize(t_text))
            text_hyps.append(readable(tgt_tok, o, lang))
            text_refs.append(t_text)
    return {"loss_sum": total_loss, "correct": correct, "tokens": n_tokens, "exact": exact,
            "examples": len(hyps), "hyps": hyps, "refs": refs, "text_hyps": text_hyps, "text_refs": text_refs}


def seq2seq_metrics(parts):
    """evaluate_seq2seq's dict from the seq2seq_sums of every shard (a list, rank order)."""
    total_loss = parts[0]["loss_sum"]
    for p in parts[1:]:
        total_loss += p["loss_sum"]
    correct, n_tokens = sum(p["correct"] for p in parts), sum(p["tokens"] for p in parts)
    exact, examples = sum(p["exact"] for p in parts), sum(p["examples"] for p in parts)
    bleu, impl = corpus_bleu([h for p in parts for h in p["hyps"]], [r for p in parts for r in p["refs"]])
    standard = detokenized_bleu([h for p in parts for h in p["text_hyps"]], [r for p in parts for r in p["text_refs"]])
    return {"loss": total_loss / n_tokens, "token_acc": correct / n_tokens, "exact_match": exact / examples,
            "bleu": bleu, "bleu_impl": impl, "sacrebleu": standard, "examples": examples}
