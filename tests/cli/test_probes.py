"""Every bad-input probe of tests/cli/probes.py, run in-process: each ends clean -- exit 2 with
one line on stderr, or exit 0 with a result where the input is valid -- never a traceback, a
silent success or a changed file outside the case's own output directory."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import probes  # noqa: E402


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("probes"))
    probes.build_fixtures(path)
    return path


@pytest.mark.parametrize("case", probes.CASES, ids=[f"{c.cls}: {c.name}" for c in probes.CASES])
def test_probe_is_clean(root, case):
    verdict, code, err = probes.run_case_inprocess(case, root)
    assert verdict == "clean", f"{verdict}: exit {code}, stderr {err!r}"


def test_the_judge_tells_the_outcomes_apart():
    refuse, ok = probes.Case("c", "n", []), probes.Case("c", "n", [], expect="ok")
    assert probes.judge(refuse, 2, "fastformer x: error: bad\n", False) == "clean"
    assert probes.judge(refuse, 2, "usage: ...\nfastformer x: error: bad\n", False) == "traceback"
    assert probes.judge(refuse, 0, "", False) == "wrong success"
    assert probes.judge(refuse, 1, "Traceback (most recent call last):\n...", False) == "traceback"
    assert probes.judge(refuse, -6, "", False) == "traceback"  # SIGABRT
    assert probes.judge(refuse, None, "", False) == "hang"
    assert probes.judge(refuse, 2, "fastformer x: error: bad\n", True) == "data lost"
    assert probes.judge(ok, 0, "", False) == "clean" and probes.judge(ok, 2, "x\n", False) == "wrong success"


MESSAGES = [  # (argv, what the one line must say)
    (["tokenizer", "train", "--data", "{R}/data.txt", "--vocab-size", "1000000000", "--out", "{O}"],
     r"vocab_size must be an integer in \[259, 16777216\], got 1000000000"),
    (["generate", "--checkpoint", "{R}/hf_positions", "--prompt", "To"],
     r"the GPT-2 of .*hf_positions/config.json \(16,000,000,006,400 parameters.*needs about [\d,]+\.\d\d GB of memory"),
    (["generate", "--checkpoint", "{R}/hf_eps_str", "--prompt", "To"],
     r"hf_eps_str/config.json: layer_norm_epsilon must be a number >= 0, got 'abc'"),
    (["generate", "--checkpoint", "{R}/hf_list", "--prompt", "To"],
     r"hf_list/config.json must hold a JSON object \(a GPT2Config\), got list"),
    (["generate", "--checkpoint", "{R}/hf_badjson", "--prompt", "To"], r"hf_badjson/config.json is not valid JSON"),
    (["generate", "--checkpoint", "{R}/hf_deep", "--prompt", "To"], r"hf_deep/config.json is nested too deeply"),
    (["train", "--config", "{R}/latin1.yaml", "--out", "{O}"], r"latin1.yaml is not UTF-8 text \(byte 28"),
    (["eval", "--checkpoint", "{R}/lm", "--data", "{R}/data.txt", "--batch-size", "0"],
     r"--batch-size must be an integer >= 1, got 0"),
    (["eval", "--checkpoint", "{R}/lm", "--data", "{R}/data.txt", "--batch-size", "-1"],
     r"--batch-size must be an integer >= 1, got -1"),
    (["eval", "--checkpoint", "{R}/lm", "--data", "{R}/data.txt", "--seq-len", "0"],
     r"--seq-len must be an integer in \[1, 32\], got 0"),
    (["eval", "--checkpoint", "{R}/s2s", "--examples", "0"], r"--examples must be an integer >= 1, got 0"),
    (["eval", "--checkpoint", "{R}/lm", "--data", "{R}/data.txt", "--beam", "3"],
     r"--beam applies to an encoder-decoder"),
    (["eval", "--checkpoint", "{R}/s2s", "--seq-len", "5"], r"--max-batches and --seq-len apply to a language model"),
    (["eval", "--checkpoint", "{R}/s2s", "--length-penalty", "0.6"],
     r"--length-penalty applies to beam search \(--beam N > 1\), not to greedy decoding"),
    (["eval", "--checkpoint", "{R}/s2s", "--data", "{R}/pairs.tsv", "--split", "train"],
     r"--split train splits a pairs file as its run's training did, but a reverse run trained on no file"),
    (["eval", "--checkpoint", "{R}/nanrun", "--data", "{R}/data.txt"],
     r"nanrun holds 6,912 non-finite \(NaN or inf\) weights of 6,912"),
    (["generate", "--checkpoint", "{R}/hfnan", "--prompt", "To"], r"hfnan holds 6,912 non-finite"),
    (["train", "--config", "{R}/tiny.yaml", "--data", "", "--out", "{O}"], r"data.path is empty"),
    (["train", "--config", "{R}/tiny.yaml", "--data", "{R}/data.txt", "--backend", "", "--out", "{O}"],
     r"unknown fastformer backend '': valid values are auto, numpy, numba"),
    (["train", "--config", "{R}/tiny.yaml", "--data", "{R}/data.txt", "--out", "{O}", "--set", "train.min_lr=inf"],
     r"train.min_lr must be a finite number >= 0, got inf"),
    (["translate", "--checkpoint", "{R}/s2s", "--text", "abc", "--beam", "2", "--length-penalty", "nan"],
     r"length_penalty must be a finite number, got nan"),
    (["tokenizer", "train", "--data", "{R}/empty.txt", "--vocab-size", "300", "--out", "{O}"],
     r"hold no text to learn merges from"),
    (["tokenizer", "train", "--data", "{R}/latin1.txt", "--vocab-size", "300", "--out", "{O}"],
     r"latin1.txt is not UTF-8 \(byte 3: invalid continuation byte\)"),
    (["prepare", "--data", "{R}/data.txt", "--tokenizer", "{R}/tok_wordlevel_sparse", "--out", "{O}"],
     r"tok_wordlevel_sparse/tokenizer.json: the tokenizer's ids must be 0..4 without gaps"),
    (["eval", "--checkpoint", "{R}/lm", "--data", "{R}/prep_tokens_float"],
     r"prep_tokens_float/meta.json split 'val': field 'tokens' must be int, got 2.5"),
    (["train", "--resume", "--out", "{RUN}", "--tokenizer", "char"],
     r"--resume continues with the run's own tokenizer"),
    (["train", "--resume", "--out", "{RUN}", "--max-steps", "2"],
     r"is at step 4, past train.max_steps=2: give --max-steps above 4 to continue it"),
    (["train", "--max-steps", "abc"],
     r"argument --max-steps: invalid int value: 'abc' \(see fastformer train --help\)"),
]


@pytest.mark.parametrize("words, message", MESSAGES, ids=[" ".join(w[:4]) for w, _ in MESSAGES])
def test_the_one_line_says_what_is_wrong(root, tmp_path, words, message):
    import contextlib
    import io
    import re
    import shutil
    from unittest import mock

    from fastformer.cli import main

    run = str(tmp_path / "run")
    shutil.copytree(os.path.join(root, "lm"), run)
    before = probes.snapshot(run, None)
    argv = [w.replace("{R}", root).replace("{O}", str(tmp_path / "out")).replace("{RUN}", run) for w in words]
    err = io.StringIO()
    with mock.patch("fastformer.errors.available_memory", return_value=2 << 30), \
            contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    assert code == 2 and err.getvalue().count("\n") == 1, err.getvalue()
    assert re.search(message, err.getvalue()), err.getvalue()
    assert probes.snapshot(run, None) == before  # a refused resume leaves the run as it was


def test_resuming_a_finished_run_says_there_is_nothing_to_train(root, tmp_path, capsys):
    import shutil

    from fastformer.cli import main

    run = str(tmp_path / "run")
    shutil.copytree(os.path.join(root, "lm"), run)
    assert main(["train", "--resume", "--out", run]) == 0
    assert f"nothing to train: the run in {run} is at step 4 = train.max_steps; give --max-steps above 4" in \
        capsys.readouterr().out
