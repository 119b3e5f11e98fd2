"""What the commands share: the parser class (defaults in --help, one-line errors), the --backend
option, integer options with their defaults, the refusal of options that do not apply, warnings,
and the checks of a loaded model's weights and of a loss."""

import argparse
import sys

import numpy as np

from fastformer.errors import FastformerError, check_int, printable

BACKEND_HELP = "kernel backend: auto, numpy or numba (default: FASTFORMER_BACKEND, else auto)"
CHECKPOINT_HELP = "run directory (newest checkpoint) or checkpoint directory"
WEIGHTS_HELP = ("weight format of the model's products: fp32, bf16 (bfloat16) or int8 (8-bit, a scale per output "
                "column), quantised once at load from the float32 checkpoint; `fastformer info` lists what this CPU "
                "runs natively")


def _has_default(action):
    """Whether an option's default is worth printing: not None, False or an empty list, for which
    the help says what happens without the option."""
    d = action.default
    return bool(action.option_strings) and not (d is None or d is False or d == [] or d is argparse.SUPPRESS)


class HelpFormatter(argparse.HelpFormatter):
    """--help shows each option's default, unless its help already says it (`_has_default`)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or not _has_default(action):
            return text
        return text + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose sub-commands' --help show defaults (HelpFormatter), also of the
    options that have no help text."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def _add_action(self, action):
        if action.help is None and _has_default(action):
            action.help = "(default: %(default)s)"
        return super()._add_action(action)

    def error(self, message):  # one line on stderr and exit status 2, like every other bad input
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_backend(p):
    """The --backend option of a command that runs a model."""
    p.add_argument("--backend", help=BACKEND_HELP)


def apply_backend(args):
    """Switch to the --backend given; without it the default stands (FASTFORMER_BACKEND, else
    auto). An empty name is refused by name, not taken for the default."""
    if args.backend is not None:
        from fastformer import set_backend

        set_backend(args.backend)


def add_weights(p):
    """The --weights option of a command that runs a model for inference."""
    p.add_argument("--weights", default="fp32", help=WEIGHTS_HELP)


def apply_weights(args, model):
    """Quantise the loaded model to --weights (fp32 leaves it as it is); an unknown format, or one
    the CPU lacks the instructions for, is refused in one line."""
    model.quantize(args.weights)
    return model


def option_int(args, name, default, maximum=None):
    """The integer option `name` as given (in [1, maximum]) or, when not given, `default`."""
    value = getattr(args, name)
    return default if value is None else check_int(f"--{name.replace('_', '-')}", value, maximum=maximum)


def refuse_options(args, names, applies_to):
    """FastformerError naming the options of `names` the user gave (not None): they apply to
    `applies_to` only, and ignoring them would answer another question than the one asked."""
    given = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) is not None]
    if given:
        raise FastformerError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to {applies_to}")


def warn(command, message):
    """One warning line on stderr."""
    print(f"fastformer {command}: warning: {printable(message)}", file=sys.stderr)


def check_finite_weights(model, path):
    """Refuse a model holding NaN or inf weights: whatever it printed would be garbage."""
    bad = int(np.count_nonzero(~np.isfinite(model.flat.data)))
    if bad:
        raise FastformerError(f"{path} holds {bad:,} non-finite (NaN or inf) weights of {model.flat.data.size:,}: "
                              f"it cannot give results; use an earlier checkpoint")


def check_finite_loss(m, what):
    if not np.isfinite(m["loss"]):
        raise FastformerError(f"the loss on {what} is not finite ({m['loss']}): the model overflows on this data")
