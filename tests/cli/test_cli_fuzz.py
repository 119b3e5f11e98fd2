"""Generated command lines for every fastformer command, run in-process: whatever the arguments,
the command ends with exit 0 and a result, or exit 2 (1 for a diverged training run) and one
line on stderr -- never a traceback -- and no file outside its run directory changes.

The options and their types come from the CLI's own parser, the values from pools of valid,
borderline and bad ones (the fixture tree of tests/cli/probes.py holds the files). CI runs a
few examples per command; FASTFORMER_FUZZ_EXAMPLES=500 runs many more.
"""

import contextlib
import io
import os
import shutil
import sys
import tempfile
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastformer import use_backend
from fastformer.cli import build_parser, main

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import probes  # noqa: E402

EXAMPLES = int(os.environ.get("FASTFORMER_FUZZ_EXAMPLES", "6"))
SMALL_INTS = [-1, 0, 1, 2, 3]
INTS = SMALL_INTS + [7, 64, 10 ** 12]
FLOATS = ["nan", "inf", "-inf", "-1", "0", "0.5", "1", "2", "1e30", "abc"]
SETS = ["train.max_steps=2", "train.batch_size=0", "train.batch_size=100000", "train.lr=nan", "train.min_lr=inf",
        "train.grad_clip=nan", "model.d_model=7", "model.n_layers=1000000", "model.max_seq_len=1000000000",
        "data.path=", "data.tokenizer=", "train.seq_len=1000", "train.grad_accum_steps=3", "junk", "x.y=1",
        "seq2seq.d_ff=10000000000", "train.optimizer=sgd", "data.val_fraction=nan", "model.dropout=1"]
# values that would run for long (a long training run, a long generation) are kept small
BOUNDED = {"max_steps": SMALL_INTS, "max_new_tokens": INTS[:-1]}
SKIP = {"bench"}  # timed training steps: a benchmark, not an input check


def _commands():
    """{command words: [option actions]} from the parser itself."""
    def subs(parser):
        return next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices

    out = {}
    for name, p in subs(build_parser()).items():
        if name in SKIP:
            continue
        if name == "tokenizer":
            for inner, q in subs(p).items():
                out[(name, inner)] = q
        else:
            out[(name,)] = p
    return {k: [a for a in p._actions if a.option_strings and a.dest != "help"] + [a for a in p._actions
                                                                                  if not a.option_strings]
            for k, p in out.items()}


COMMANDS = _commands()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("fuzz"))
    probes.build_fixtures(path)
    return path


def paths(root, work):
    """The pool of path values: fixtures of every kind, names that do not exist, '' and the
    work directory (where anything may be written)."""
    names = ["data.txt", "empty.txt", "latin1.txt", "tiny.yaml", "s2s.yaml", "latin1.yaml", "deep.yaml",
             "list.yaml", "pairs.tsv", "lm", "s2s", "hf", "hfnan", "nanrun", "prep", "prep_list", "prep_deep",
             "hf_list", "hf_positions", "hf_layers", "hf_eps_str", "tok_wordlevel_sparse", "tok_deep",
             "lm/ckpt-000004", "missing"]
    return [os.path.join(root, n) for n in names] + ["", os.path.join(work, "new"), os.path.join(work, "run"),
                                                    root]


def option_values(action, root, work):
    """A strategy for the values of one option (a list of argv words, [] for a flag)."""
    if action.nargs == 0:
        return st.just([])
    if action.dest == "set":
        return st.sampled_from(SETS).map(lambda s: [s])
    if action.dest in ("out",):
        pool = [os.path.join(work, "out"), os.path.join(work, "run"), os.path.join(work, "out.png"), "", work]
    elif action.choices is not None:
        pool = [str(c) for c in action.choices] + ["", "nope"]
    elif action.type is int:
        pool = [str(v) for v in BOUNDED.get(action.dest, INTS)] + ["x"]
    elif action.type is float:
        pool = FLOATS
    elif action.dest in ("backend",):
        pool = ["numpy", "", "nope"]
    elif action.dest in ("tokenizer", "kind"):
        pool = ["byte", "char", "bpe", ""] + paths(root, work)
    elif action.dest == "dataset":
        pool = ["", "nope"]  # a real name downloads
    elif action.dest in ("prompt", "text", "stop"):
        pool = ["To", "", "<eos>", "\x00", "é" * 40]
    else:
        pool = paths(root, work)
    value = st.sampled_from(pool)
    if action.nargs in ("+", "*"):
        return st.lists(value, min_size=1, max_size=2)
    return value.map(lambda v: [v])


@st.composite
def argv(draw, command, root, work):
    actions = COMMANDS[command]
    words = list(command)
    for action in actions:
        required = action.required or not action.option_strings
        if required or draw(st.booleans()):
            if action.option_strings:
                words.append(draw(st.sampled_from(action.option_strings)))
            words += draw(option_values(action, root, work))
    if command == ("train",):  # never the 2000 steps of the default, nor the default corpus (slow to build)
        words += ["--max-steps", "2"] * ("--max-steps" not in words) + ["--data", os.path.join(root, "data.txt")] * (
            "--data" not in words)
    return words


def run(words, work):
    out, err = io.StringIO(), io.StringIO()
    with use_backend("numpy"), mock.patch("fastformer.errors.available_memory", return_value=2 << 30), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), contextlib.chdir(work):
        try:
            code = main(words)
        except SystemExit as e:  # argparse
            code = e.code
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("command", list(COMMANDS), ids=[" ".join(c) for c in COMMANDS])
def test_any_command_line_ends_cleanly(root, command):
    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.data())
    def check(data):
        work = tempfile.mkdtemp(dir=root, prefix="work-")
        try:
            if data.draw(st.booleans()):  # sometimes a run to resume or write into
                shutil.copytree(os.path.join(root, "lm"), os.path.join(work, "run"))
            words = data.draw(argv(command, root, work))
            before = probes.snapshot(root, work)
            code, out, err = run(words, work)
            lines = [line for line in err.splitlines() if line.strip()]
            assert code in (0, 1, 2), (words, code, err)
            if code:
                assert len(lines) == 1, (words, err)  # one line, no traceback
            else:
                assert out.strip(), (words, "exit 0 without a result")
            assert probes.snapshot(root, work) == before, (words, "changed a file outside its run directory")
        finally:
            shutil.rmtree(work, ignore_errors=True)

    check()
