"""`fastformer tokenizer train`: learn a BPE or char vocabulary from text files."""

import os
import sys

from fastformer.errors import FastformerError, printable


def add_parser(sub):
    p = sub.add_parser("tokenizer", help="train a tokenizer")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)
    p = tsub.add_parser("train", help="learn a BPE or char vocabulary from text files")
    p.add_argument("--data", nargs="+", required=True, help="UTF-8 text files")
    p.add_argument("--kind", choices=("bpe", "char"), default="bpe")
    p.add_argument("--vocab-size", type=int, help="BPE vocabulary size including 3 specials (e.g. 4096)")
    p.add_argument("--out", required=True, help="directory to write tokenizer.json to")
    p.set_defaults(func=main)


def main(args):
    from fastformer.data.bpe import BPETokenizer
    from fastformer.data.tokenizer import CharTokenizer

    if args.kind == "bpe":
        if args.vocab_size is None:
            raise FastformerError("tokenizer train --kind bpe needs --vocab-size N (e.g. 4096)")
        tok = BPETokenizer.train(args.data, args.vocab_size, show_progress=sys.stderr.isatty())
    else:
        if args.vocab_size is not None:
            raise FastformerError("--vocab-size does not apply to --kind char: its vocabulary is every character "
                                  "of the data")
        tok = CharTokenizer.train(args.data)
    tok.save(args.out)
    where = os.path.join(args.out, "tokenizer.json")
    print(printable(f"wrote a {tok.kind} tokenizer with {tok.vocab_size} ids to {where}"))
    return 0
