"""The `fastformer` command line."""

import argparse
import platform
import sys

import numpy as np


def cmd_info(args):
    from . import __version__, get_backend

    print(f"fastformer {__version__}  python {platform.python_version()}  numpy {np.__version__}")
    print(f"backend: {get_backend()}")


def build_parser():
    parser = argparse.ArgumentParser(prog="fastformer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="show the backend, versions and threads")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
