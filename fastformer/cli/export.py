"""`fastformer export`: write a checkpoint in another format (a Hugging Face GPT-2 directory)."""

from fastformer.cli.options import CHECKPOINT_HELP
from fastformer.errors import FastformerError, printable

EXPORT_FORMATS = ("hf",)


def add_parser(sub):
    p = sub.add_parser("export", help="write a checkpoint in another format")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--format", required=True, help=f"one of: {', '.join(EXPORT_FORMATS)}")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=main)


def main(args):
    from fastformer.training.checkpoint import load_model
    from fastformer.training.export import export_hf

    if args.format not in EXPORT_FORMATS:
        raise FastformerError(f"unknown export format {args.format!r}: valid formats are "
                              f"{', '.join(EXPORT_FORMATS)}")
    model, tokenizer, _ = load_model(args.checkpoint)
    wrote = export_hf(model, tokenizer, args.out)
    print(printable(f"wrote {', '.join(wrote)} to {args.out}"))
    return 0
