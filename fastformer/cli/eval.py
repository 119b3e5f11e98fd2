"""`fastformer eval`: score a checkpoint -- a language model's loss, perplexity, bits per byte and
accuracy; an encoder-decoder's loss, token accuracy, exact match and BLEU. What it scores is
chosen in training/eval_data.py."""

import json

from fastformer.cli.options import (
    CHECKPOINT_HELP,
    add_backend,
    add_weights,
    apply_backend,
    apply_weights,
    check_finite_loss,
    check_finite_weights,
    option_int,
    refuse_options,
    warn,
)
from fastformer.errors import FastformerError


def add_parser(sub):
    p = sub.add_parser("eval", help="language model: loss, perplexity, bits per byte, accuracy; encoder-decoder: "
                                    "loss, token accuracy, exact match, BLEU")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--data", help="UTF-8 text file or prepared directory (language model), source<TAB>target "
                                  "file (encoder-decoder); default: the run's own validation data, the windows "
                                  "or pairs the trainer scores")
    p.add_argument("--beam", type=int, help="encoder-decoder: beam size (default 1: greedy)")
    p.add_argument("--length-penalty", type=float, help="encoder-decoder: beam length penalty (default 1.0)")
    p.add_argument("--lang", default="en", help="encoder-decoder: target language of the detokenizer for the "
                                                "standard BLEU (default en)")
    p.add_argument("--examples", type=int, help="encoder-decoder: held-out strings of a synthetic task, or at "
                                                "most this many pairs (default: the trainer's validation set "
                                                "without --data, else all)")
    p.add_argument("--split", choices=("val", "train", "all"),
                   help="val (default), train or all: a text or pairs file is split as training splits it; a "
                        "prepared directory has train and val")
    p.add_argument("--max-batches", type=int, help="language model: at most this many batches (default: the "
                                                   "trainer's train.eval_batches without --data, else all)")
    p.add_argument("--batch-size", type=int, help="windows per batch (default: the run's train.batch_size)")
    p.add_argument("--seq-len", type=int, help="tokens per window (default: the run's train.seq_len)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_backend(p)
    add_weights(p)
    p.set_defaults(func=main)


def main(args):
    from fastformer.training.checkpoint import checkpoint_kind

    apply_backend(args)
    return EVALS[checkpoint_kind(args.checkpoint)](args)


def eval_lm(args):
    """Loss, perplexity, bits per byte and accuracy of a language model (a checkpoint or a
    Hugging Face directory) on the tokens of eval_data.lm_eval_tokens."""
    from fastformer.models.hf import is_hf_dir
    from fastformer.training.checkpoint import load_checkpoint, load_model
    from fastformer.training.eval_data import lm_eval_tokens
    from fastformer.training.evaluate import evaluate_lm

    if args.examples is not None:
        raise FastformerError("--examples applies to an encoder-decoder; a language model's share is --max-batches")
    refuse_options(args, ("beam", "length_penalty"), "an encoder-decoder")
    if is_hf_dir(args.checkpoint):
        (model, tokenizer, config), ckpt = load_model(args.checkpoint), None
    else:
        ckpt = load_checkpoint(args.checkpoint)  # a language model: checkpoint_kind said so
        model, tokenizer, config = ckpt.new_model(), ckpt.tokenizer, ckpt.config
    check_finite_weights(model, args.checkpoint)
    apply_weights(args, model)
    batch_size = option_int(args, "batch_size", config.train.batch_size)
    seq_len = option_int(args, "seq_len", min(config.train.seq_len, model.config.max_seq_len), model.config.max_seq_len)
    ids, what, default_batches, warning = lm_eval_tokens(config, tokenizer, ckpt, seq_len, args.data, args.split,
                                                         args.checkpoint)
    if warning:
        warn("eval", warning)
    max_batches = option_int(args, "max_batches", default_batches)
    m = evaluate_lm(model, ids, batch_size, seq_len, max_batches, tokenizer.byte_lengths())
    check_finite_loss(m, what)
    windows = m["tokens"] // seq_len
    share = (f"the trainer's {max_batches} batches of {batch_size}; --max-batches N for more"
             if default_batches and args.max_batches is None else "evenly spread")
    m.update(data=what, split=args.split or "val", checkpoint=args.checkpoint, seq_len=seq_len, windows=windows,
             split_tokens=len(ids), weights=args.weights)
    if args.json:
        print(json.dumps(m))
    else:
        print(f"scored {what}:\n  {windows:,} windows of {seq_len} tokens = {m['tokens']:,} of its {len(ids):,} "
              f"({share})")
        print(f"loss {m['loss']:.4f} | ppl {m['ppl']:.3f} | bits/byte {m['bits_per_byte']:.4f} | "
              f"acc {m['acc']:.4f} | {m['bytes']:,} bytes | weights {args.weights}")
    return 0


def eval_seq2seq(args):
    """Loss, token accuracy, exact match and BLEU of an encoder-decoder checkpoint on the pairs of
    eval_data.seq2seq_eval_pairs."""
    from fastformer.training.checkpoint import load_checkpoint
    from fastformer.training.eval_data import seq2seq_eval_pairs
    from fastformer.training.evaluate import evaluate_seq2seq

    if args.max_batches is not None or args.seq_len is not None:
        raise FastformerError("--max-batches and --seq-len apply to a language model; an encoder-decoder scores "
                              "--examples N pairs")
    option_int(args, "examples", None)
    beam = option_int(args, "beam", 1)
    if beam == 1:
        refuse_options(args, ("length_penalty",), "beam search (--beam N > 1), not to greedy decoding")
    ckpt = load_checkpoint(args.checkpoint, "seq2seq")
    model = ckpt.new_model()
    check_finite_weights(model, args.checkpoint)
    apply_weights(args, model)
    config, (src_tok, tgt_tok) = ckpt.config, ckpt.tokenizers.values()
    batch_size = option_int(args, "batch_size", config.train.batch_size)
    pairs, what, skipped, warning = seq2seq_eval_pairs(ckpt, model, args.data, args.split, args.examples)
    if warning:
        warn("eval", warning)
    skipped = {k: v for k, v in skipped.items() if v}
    if not pairs:
        raise FastformerError(f"no pair of {what} fits the model (skipped: {skipped or 'none'})")
    m = evaluate_seq2seq(model, pairs, src_tok, tgt_tok, batch_size, beam_size=beam,
                         length_penalty=1.0 if args.length_penalty is None else args.length_penalty, lang=args.lang)
    check_finite_loss(m, what)
    decoding = "greedy" if beam == 1 else f"beam {beam}"
    m.update(data=what, split=args.split or "val", checkpoint=args.checkpoint, decoding=decoding, skipped=skipped,
             weights=args.weights)
    if args.json:
        print(json.dumps(m))
    else:
        print(f"scored {m['examples']:,} examples: {what}"
              + (f"; skipped {', '.join(f'{n:,} {why}' for why, n in skipped.items())}" if skipped else ""))
        standard = ("pip install sacrebleu for it" if m["sacrebleu"] is None else f"{m['sacrebleu']:.2f}")
        print(f"loss {m['loss']:.4f} | token acc {m['token_acc']:.4f} | exact match {m['exact_match']:.4f} "
              f"({decoding}, weights {args.weights})")
        print(f"BLEU {m['bleu']:.2f} on tokens ({m['bleu_impl']}, as val_bleu) | sacreBLEU {standard} on "
              f"detokenized text (13a)")
    return 0


# what `eval` runs for each model kind (training/tasks.KINDS): the options and the report differ
EVALS = {"lm": eval_lm, "seq2seq": eval_seq2seq}
