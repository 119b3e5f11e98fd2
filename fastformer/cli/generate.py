"""`fastformer generate`: continue a prompt with a language model, streamed as it is sampled."""

import sys

import numpy as np

from fastformer.cli.options import (
    CHECKPOINT_HELP,
    add_backend,
    add_weights,
    apply_backend,
    apply_weights,
    check_finite_weights,
    refuse_options,
)
from fastformer.errors import FastformerError, check_int

SAMPLE_SEPARATOR = "-" * 40  # between the samples of generate --num-samples


def add_parser(sub):
    p = sub.add_parser("generate", help="sample text from a checkpoint")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="text to continue")
    g.add_argument("--prompt-file", metavar="FILE", help="continue the text of this UTF-8 file, as it is "
                                                         "(\"-\": standard input)")
    p.add_argument("--num-samples", type=int, default=1, metavar="N",
                   help=f"sample N continuations of the prompt, separated by a line of {len(SAMPLE_SEPARATOR)} "
                        f"dashes")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens, ties kept (default: all)")
    p.add_argument("--top-p", type=float, help="sample among the smallest set of tokens with mass >= p "
                                               "(default: all)")
    p.add_argument("--seed", type=int, help="seed of the sampling generator (default: fresh each run)")
    p.add_argument("--repetition-penalty", type=float, help="> 1 discourages tokens already in the text "
                                                            "(default: off)")
    p.add_argument("--stop", action="append", help="stop before this string (repeatable; default: <eos> only, "
                                                   "which always stops)")
    p.add_argument("--beam", type=int, default=1, help="beam search with this many beams (default 1: sampling, "
                                                       "or greedy at temperature 0)")
    p.add_argument("--length-penalty", type=float,
                   help="beam search ranks hypotheses by score / length ** A (default 1.0)")
    add_backend(p)
    add_weights(p)
    p.set_defaults(func=main)


def stream_text(tokenizer, id_steps, out, stop=()):
    """Write the text of ids arriving one step at a time to `out` as it forms; returns the whole
    text. Stops at the first stop string (not written). Characters that may still change -- an
    incomplete UTF-8 sequence, or the start of a stop string -- are held back until settled."""
    hold = max((len(s) for s in stop), default=1) - 1
    ids, written, text = [], 0, ""
    for nxt in id_steps:
        ids.append(int(nxt))
        text = tokenizer.decode(ids)
        cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
        if cut >= 0:
            text = text[:cut]
            break
        settled = len(text) - hold - (1 if text.endswith("\ufffd") else 0)
        if settled > written:
            out.write(text[written:settled])
            out.flush()
            written = settled
    out.write(text[written:])
    out.flush()
    return text


def read_prompt(args):
    """The prompt text of --prompt or --prompt-file (the whole file as it is; "-": standard input)."""
    if args.prompt_file is None:
        if not args.prompt:
            raise FastformerError("--prompt is empty: give at least one character to continue")
        return args.prompt
    from fastformer.data.text import load_text

    if args.prompt_file != "-":
        return load_text(args.prompt_file, what="--prompt-file", hint="")
    text = sys.stdin.read()
    if not text:
        raise FastformerError("--prompt-file - (standard input) is empty: give at least one character to continue")
    return text


def main(args):
    from fastformer.generation.sampling import cut_at_eos, generate_tokens
    from fastformer.training.checkpoint import load_model

    n = check_int("--num-samples", args.num_samples)
    if n > 1 and (args.beam != 1 or args.temperature == 0):
        raise FastformerError(f"--num-samples {n} needs sampling (--temperature > 0, --beam 1): "
                              f"{'beam search' if args.beam != 1 else 'greedy decoding'} gives the same "
                              f"continuation every time")
    text = read_prompt(args)
    apply_backend(args)
    model, tokenizer, _ = load_model(args.checkpoint)
    check_finite_weights(model, args.checkpoint)
    apply_weights(args, model)
    if "" in (args.stop or ()):
        raise FastformerError("--stop '' would stop before the first token: give a non-empty stop string")
    prompt = tokenizer.encode(text)
    if prompt.size == 0:
        raise FastformerError("the prompt is empty: give at least one character to continue")
    stop = args.stop or ()
    if args.beam != 1:  # beam search: the whole continuation at once, then cut at a stop string
        refuse_options(args, ("repetition_penalty", "top_k", "top_p", "seed"), "sampling, not to --beam")
        out = model.generate(prompt, args.max_new_tokens, beam_size=args.beam, eos_id=tokenizer.eos_id,
                             length_penalty=1.0 if args.length_penalty is None else args.length_penalty,
                             id_limit=tokenizer.vocab_size)
        samples = [out[prompt.size:].tolist()]
    else:
        refuse_options(args, ("length_penalty",), "beam search (--beam N > 1), not to sampling")
        # the samples are the rows of one batch: one prompt, n rows, one sampling stream
        steps = generate_tokens(model, np.tile(prompt, (n, 1)), args.max_new_tokens, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, seed=args.seed, eos_id=tokenizer.eos_id,
                                repetition_penalty=args.repetition_penalty, id_limit=tokenizer.vocab_size)
        if n == 1:
            samples = [(nxt[0] for nxt in steps)]  # streamed, as each token comes
        else:
            rows = np.stack(list(steps), axis=1) if args.max_new_tokens else np.zeros((n, 0), np.int64)
            samples = [cut_at_eos(row, tokenizer.eos_id) for row in rows]
    for i, ids in enumerate(samples):
        if i:
            sys.stdout.write(SAMPLE_SEPARATOR + "\n")
        sys.stdout.write(text)
        stream_text(tokenizer, ids, sys.stdout, stop=stop)
        sys.stdout.write("\n")
    return 0
