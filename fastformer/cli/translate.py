"""`fastformer translate`: decode source lines with an encoder-decoder, one output line each."""

import os
import sys

from fastformer.cli.options import (
    CHECKPOINT_HELP,
    add_backend,
    add_weights,
    apply_backend,
    apply_weights,
    check_finite_weights,
    warn,
)
from fastformer.errors import FastformerError, check_int


def add_parser(sub):
    p = sub.add_parser("translate", help="decode source texts with an encoder-decoder checkpoint")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--text", action="append", help="source text (repeatable: one output line each)")
    p.add_argument("--input", help="file of source lines, or - for stdin: one output line per line, written as each "
                                   "batch is done")
    p.add_argument("--batch-size", type=int, default=32, help="sources decoded together (default 32)")
    p.add_argument("--lang", default="en", help="target language of the Moses detokenizer rules (default en; "
                                                "e.g. fr, de)")
    p.add_argument("--beam", type=int, default=1, help="beam size (default 1: greedy)")
    p.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam search ranks hypotheses by score / length ** A (default 1.0)")
    p.add_argument("--truncate", action="store_true", help="translate a source longer than the model's max_src_len "
                                                           "from its first tokens instead of skipping it")
    p.add_argument("--temperature", type=float, default=0.0, help="sample at this temperature (default 0: greedy "
                                                                  "or beam search)")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens (ties kept)")
    p.add_argument("--top-p", type=float, help="sample among the smallest set of tokens with mass >= p")
    p.add_argument("--seed", type=int, help="seed of the sampling generator")
    add_backend(p)
    add_weights(p)
    p.set_defaults(func=main)


def source_lines(args):
    """(1-based line number, text) of every source: the --text values, or the lines of --input
    (a file, or - for stdin), read as they come."""
    if (args.text is None) == (args.input is None):
        raise FastformerError("translate needs either --text TEXT (repeatable) or --input FILE (- for stdin)")
    if args.text is not None:
        yield from enumerate(args.text, 1)
        return
    if args.input == "-":
        f = getattr(sys.stdin, "buffer", sys.stdin)  # bytes, decoded line by line
    elif not os.path.isfile(args.input):
        raise FastformerError(f"--input file {args.input!r} does not exist")
    else:
        f = open(args.input, "rb")
    try:
        for n, line in enumerate(f, 1):
            if isinstance(line, bytes):
                try:
                    line = line.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise FastformerError(f"--input {args.input}: line {n} is not UTF-8 text ({e})") from None
            yield n, line.rstrip("\r\n")
    finally:
        if args.input != "-":
            f.close()


def batched(items, size):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def recase(output, source):
    """`output` with its first letter upper-cased when the source's first letter is (for a run that
    lower-cased its data: the model writes lower case only)."""
    first = next((c for c in source if c.isalpha()), "")
    i = next((i for i, c in enumerate(output) if c.isalpha()), None)
    return output if i is None or not first.isupper() else output[:i] + output[i].upper() + output[i + 1:]


def format_unknown(unknown, what):
    """One warning of the unknown pieces of a batch: {piece: [line numbers]}."""
    shown = [f"{p!r} (line{'s' if len(ns) > 1 else ''} {', '.join(map(str, ns[:5]))}{', ...' if len(ns) > 5 else ''})"
             for p, ns in list(unknown.items())[:20]]
    more = f" and {len(unknown) - 20} more" if len(unknown) > 20 else ""
    return f"{what} outside the source vocabulary, read as <unk>: {', '.join(shown)}{more}"


def main(args):
    from fastformer.data.pairs import readable, unknown_pieces
    from fastformer.generation.search import translate
    from fastformer.training.checkpoint import load_checkpoint

    apply_backend(args)
    check_int("--batch-size", args.batch_size)
    ckpt = load_checkpoint(args.checkpoint, "seq2seq")
    model = ckpt.new_model()
    check_finite_weights(model, args.checkpoint)
    apply_weights(args, model)
    src_tok, tgt_tok = ckpt.tokenizers["src"], ckpt.tokenizers["tgt"]
    lower, S = ckpt.config.data.lowercase, model.config.max_src_len
    what = "words" if src_tok.kind == "word" else "characters"
    for batch in batched(source_lines(args), args.batch_size):
        texts, unknown = {}, {}  # line number -> source to translate; unknown piece -> line numbers
        for n, line in batch:
            text = line.lower() if lower else line  # as trained
            for piece in dict.fromkeys(unknown_pieces(src_tok, text)):
                unknown.setdefault(piece, []).append(n)
            length = len(src_tok.encode(text))
            if length > S:
                warn("translate", f"line {n}: {length} source tokens, more than the model's max_src_len={S}: "
                                  + (f"translated from its first {S}" if args.truncate else
                                     "skipped, its output line is empty (--truncate translates its first tokens)"))
                if not args.truncate:
                    continue
            if line.strip():
                texts[n] = text
        if unknown:
            warn("translate", format_unknown(unknown, what))
        outputs = translate(model, list(texts.values()), src_tok, tgt_tok, beam_size=args.beam,
                            length_penalty=args.length_penalty, truncate=True, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                            decode=lambda ids: readable(tgt_tok, ids, args.lang)) if texts else []
        done = dict(zip(texts, outputs))
        for n, line in batch:  # one output line per source line, empty for a blank or skipped one
            out = done.get(n, "")
            print(recase(out, line) if lower else out)
        sys.stdout.flush()
    return 0
