"""The `fastformer` command line: train, generate, translate, eval, tokenizer, prepare, export,
info, plot, bench.

    fastformer train --preset tiny --out runs/tiny          # embedded default corpus
    fastformer generate --checkpoint runs/tiny --prompt "def "
    fastformer tokenizer train --data corpus.txt --vocab-size 4096 --out tok
    fastformer prepare --data corpus.txt --tokenizer tok --out data/corpus
    fastformer train --preset small --data data/corpus --out runs/small
    fastformer eval --checkpoint runs/small                  # the run's own validation split
    fastformer export --checkpoint runs/small --format hf --out hf/small
    fastformer train --task reverse --config experiments/configs/tiny_reverse.yaml --out runs/reverse
    fastformer translate --checkpoint runs/reverse --text "hello123" --beam 4
    fastformer translate --checkpoint runs/enfr --input sentences.txt --lang fr   # or --input - (stdin)
    fastformer eval --checkpoint runs/reverse                # held-out strings; --data FILE for pairs
    fastformer info --preset small                           # exact parameter count
    fastformer info --params 2M-3M --set model.n_layers=4    # model shapes in a budget
    fastformer plot runs/tiny runs/small --out loss.png

One module per command (cli/train.py, cli/generate.py, ...), each with `add_parser(sub)`, which
adds its sub-parser, and `main(args)`, which parses nothing more, calls the library and prints;
the options they share are in cli/options.py. A FastformerError (bad config key, missing data
file, corrupt checkpoint, ...) or a file error (OSError: no such file, a directory, no
permission) is printed as one line and exits with 2; any other exception is a bug in fastformer
and keeps its traceback.
"""

import sys
import warnings

from fastformer.cli.generate import stream_text
from fastformer.errors import FastformerError, error_line, printable

__all__ = ["build_parser", "main", "stream_text"]

# the commands in the order --help lists them: modules of fastformer.cli
COMMANDS = ("train", "generate", "translate", "tokenizer", "prepare", "eval", "export", "info", "plot", "bench")


def build_parser():
    import importlib

    from fastformer.cli.options import Parser

    parser = Parser(prog="fastformer", description="Small Transformers on the CPU.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"fastformer.cli.{name}").add_parser(sub)
    return parser


def _end_mpi_job_on_bad_arguments(argv, code):
    """Under an MPI launcher, a `train` rank whose command line is refused ends the whole job (the
    other ranks would wait for it in their first collective); the parser has printed why."""
    from fastformer.training.distributed import get_comm, launched_by_mpi

    argv = sys.argv[1:] if argv is None else argv
    if code not in (0, None) and argv[:1] == ["train"] and launched_by_mpi():
        try:
            comm = get_comm(True)
        except FastformerError:
            return  # no mpi4py: there is no job to end
        comm.abort(code if isinstance(code, int) else 2)


def main(argv=None):
    try:  # Ctrl-C while the modules load and the arguments are parsed is one line too
        from fastformer.training.trainer import NonFiniteLossError

        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:
            _end_mpi_job_on_bad_arguments(argv, e.code)
            raise
    except KeyboardInterrupt:
        print("\nfastformer: interrupted", file=sys.stderr)
        return 130
    # a warning is a line for the user, not a source location
    formatwarning = warnings.formatwarning
    warnings.formatwarning = lambda message, *_, **__: f"fastformer {args.command}: warning: {printable(message)}\n"
    try:
        if getattr(args, "out", None) == "":  # every command's --out names a path to write
            raise FastformerError(f"the output of {args.command} (--out) is an empty path: name what to write")
        return args.func(args)
    except (FastformerError, OSError) as e:  # bad input or a file error; anything else is a bug
        message = error_line(e)
        if message is None:
            raise
        print(f"fastformer {args.command}: error: {printable(message)}", file=sys.stderr)
        return 2
    except MemoryError:  # the machine, not fastformer: one line, as a full disk is
        print(f"fastformer {args.command}: error: out of memory: make the model, batch or sequence smaller",
              file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"fastformer {args.command}: {printable(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nfastformer {args.command}: interrupted; a training run continues from its newest "
              f"checkpoint with --resume", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = formatwarning

