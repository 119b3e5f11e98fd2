"""Command-line habits: --help shows the defaults, generate --num-samples and --prompt-file."""

import io
import re

import pytest

from fastformer.cli import build_parser, main
from fastformer.cli.generate import SAMPLE_SEPARATOR


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("habits")
    data = tmp / "data.txt"
    data.write_text("To be, or not to be, that is the question.\n" * 40, encoding="utf-8")
    out = str(tmp / "run")
    assert main(["train", "--data", str(data), "--out", out, "--max-steps", "2", "--set", "model.max_seq_len=32",
                 "--set", "model.d_model=16", "--set", "model.n_heads=2", "--set", "model.d_ff=32",
                 "--set", "model.n_layers=1", "--set", "train.batch_size=2", "--set", "train.seq_len=32",
                 "--set", "train.eval_batches=1"]) == 0
    return out


def subparser(name):
    parser = build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices[name]


@pytest.mark.parametrize("command", ["train", "generate"])
def test_help_shows_a_default_for_every_option(command):
    p = subparser(command)
    text = p.format_help()
    assert "None" not in text and "default: False" not in text and "default: []" not in text
    required = {a for g in p._mutually_exclusive_groups if g.required for a in g._group_actions}
    for action in p._actions:
        if not action.option_strings or action.dest == "help" or action.default is False or action.required \
                or action in required:
            continue  # flags (store_true) are off unless given; a required option has no default
        assert "default" in p._get_formatter()._get_help_string(action), action.option_strings
    if command == "generate":
        assert re.search(r"--max-new-tokens MAX_NEW_TOKENS\s+\(default: 200\)", text)
        assert re.search(r"0 is greedy \(default:\s+0\.8\)", text)


def test_help_of_every_command_prints_no_none(capsys):
    for name in ("train", "generate", "translate", "eval", "prepare", "export", "info", "plot", "bench"):
        with pytest.raises(SystemExit):
            main([name, "--help"])
        assert "(default: None)" not in capsys.readouterr().out, name


def test_num_samples_gives_n_continuations_of_the_prompt(run, capsys):
    assert main(["generate", "--checkpoint", run, "--prompt", "To be", "--num-samples", "3", "--seed", "1",
                 "--max-new-tokens", "12", "--temperature", "1.0"]) == 0
    out = capsys.readouterr().out
    samples = out.split(SAMPLE_SEPARATOR + "\n")
    assert len(samples) == 3 and all(s.startswith("To be") for s in samples)
    assert len(set(samples)) > 1  # sampled, not copies of one
    # seeded: the same samples again
    assert main(["generate", "--checkpoint", run, "--prompt", "To be", "--num-samples", "3", "--seed", "1",
                 "--max-new-tokens", "12", "--temperature", "1.0"]) == 0
    assert capsys.readouterr().out == out
    # one sample is the stream of before, no separator
    assert main(["generate", "--checkpoint", run, "--prompt", "To be", "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0
    assert SAMPLE_SEPARATOR not in capsys.readouterr().out


@pytest.mark.parametrize("extra, match", [
    (["--num-samples", "2", "--temperature", "0"], "--num-samples 2 needs sampling .*greedy decoding gives the "
                                                   "same continuation every time"),
    (["--num-samples", "2", "--beam", "2"], "--num-samples 2 needs sampling .*beam search gives"),
    (["--num-samples", "0"], "--num-samples must be"),
])
def test_num_samples_refusals(run, capsys, extra, match):
    assert main(["generate", "--checkpoint", run, "--prompt", "To", *extra]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(match, err), err


def test_prompt_file_and_stdin(run, tmp_path, capsys, monkeypatch):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("To be, or\nnot to be", encoding="utf-8")
    args = ["generate", "--checkpoint", run, "--max-new-tokens", "6", "--temperature", "0"]
    assert main([*args, "--prompt-file", str(prompt)]) == 0
    from_file = capsys.readouterr().out
    assert main([*args, "--prompt", "To be, or\nnot to be"]) == 0
    assert capsys.readouterr().out == from_file and from_file.startswith("To be, or\nnot to be")
    monkeypatch.setattr("sys.stdin", io.StringIO("To be, or\nnot to be"))
    assert main([*args, "--prompt-file", "-"]) == 0
    assert capsys.readouterr().out == from_file
    # refusals: one line each
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    for name, match in (("missing.txt", "does not exist"), ("empty.txt", "is empty"),
                        ("latin1.txt", "is not UTF-8 text")):
        assert main([*args, "--prompt-file", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "--prompt-file" in err and match in err, err
    with pytest.raises(SystemExit):  # --prompt and --prompt-file exclude each other
        main([*args, "--prompt", "x", "--prompt-file", str(prompt)])
    assert "not allowed with argument" in capsys.readouterr().err
