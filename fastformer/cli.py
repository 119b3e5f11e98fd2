"""The `fastformer` command line."""

import argparse
import platform
import sys

import numpy as np


def cmd_info(args):
    from . import __version__, get_backend

    print(f"fastformer {__version__}  python {platform.python_version()}  numpy {np.__version__}")
    print(f"backend: {get_backend()}")
    from .threads import thread_info

    for key, value in thread_info().items():
        print(f"{key}: {value}")


def cmd_bench(args):
    from .bench import main

    main(args)


def build_parser():
    parser = argparse.ArgumentParser(prog="fastformer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="show the backend, versions and threads")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("bench", help="time full training steps of a preset model")
    p.add_argument("--preset", required=True, choices=["tiny", "small", "medium"])
    p.add_argument("--backend", choices=["auto", "numpy", "numba"], default=None)
    p.add_argument("--steps", type=int, default=10, help="timed steps after warm-up (default 10)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
