"""`fastformer prepare`: encode text once into memory-mapped token files (train.bin, val.bin)."""

import os

from fastformer.errors import FastformerError, printable


def add_parser(sub):
    p = sub.add_parser("prepare", help="encode text once into memory-mapped token files")
    p.add_argument("--data", nargs="+", help="UTF-8 text files, in order")
    p.add_argument("--dataset", help="download a public corpus instead: tinyshakespeare or tinystories (needs "
                                     "pooch: pip install \"fastformer[datasets]\")")
    p.add_argument("--val-data", nargs="+", help="text files for the validation split (default: the last "
                                                 "--val-fraction of --data)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--tokenizer", default="byte", help="byte or a tokenizer directory (default byte)")
    p.add_argument("--cache-dir", help="where --dataset downloads go (default ~/.cache/fastformer/datasets)")
    p.add_argument("--out", required=True, help="directory for train.bin, val.bin, meta.json, tokenizer.json")
    p.set_defaults(func=main)


def main(args):
    from fastformer.data.datasets import fetch_dataset
    from fastformer.data.prepare import prepare
    from fastformer.data.tokenizer import ByteTokenizer, load_tokenizer

    if (args.data is None) == (args.dataset is None):
        raise FastformerError("prepare needs either --data FILE... or --dataset NAME")
    files, val_files = args.data, args.val_data
    if args.dataset is not None:
        if val_files:
            raise FastformerError("--val-data does not apply to --dataset, which brings its own split")
        files, val_files = fetch_dataset(args.dataset, args.cache_dir)
    if args.tokenizer == "byte":
        tok = ByteTokenizer()
    elif os.path.isdir(args.tokenizer):
        tok = load_tokenizer(args.tokenizer)
    else:
        raise FastformerError(f"--tokenizer {args.tokenizer!r} is neither 'byte' nor a directory holding a "
                              f"tokenizer.json (make one with fastformer tokenizer train)")
    meta = prepare(files, tok, args.out, val_fraction=args.val_fraction, val_files=val_files)
    s = meta["splits"]
    print(printable(f"wrote {s['train']['tokens']:,} training and {s['val']['tokens']:,} validation tokens "
                    f"({meta['dtype']}, {tok.kind} tokenizer, {tok.vocab_size} ids) to {args.out}"))
    return 0
