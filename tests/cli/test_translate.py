"""`fastformer translate`: --input FILE and stdin, one output line per input line in batches,
readable (detokenized) output with <unk> shown, warnings for unknown source words or characters
and for too-long sources (by their 1-based line, skipped or truncated, never fatal)."""

import io

import pytest

from fastformer import use_backend
from fastformer.cli import main
from fastformer.cli.translate import recase
from fastformer.data.pairs import readable
from fastformer.generation.search import translate
from fastformer.training.checkpoint import load_checkpoint

PAIRS = ["I am here.\tJe suis là.", "You are here.\tTu es là.", "We run.\tNous courons.", "He is here.\tIl est là.",
         "I am cold.\tJ'ai froid.", "Is it here?\tEst-ce là ?", "Run!\tCours !", "Who?\tQui ?"]
SIZE = ["--set", "seq2seq.max_src_len=6", "--set", "seq2seq.max_tgt_len=8", "--set", "seq2seq.d_model=16",
        "--set", "seq2seq.n_heads=2", "--set", "seq2seq.d_ff=32", "--set", "seq2seq.n_encoder_layers=1",
        "--set", "seq2seq.n_decoder_layers=1", "--set", "train.batch_size=4", "--set", "train.eval_interval=2",
        "--set", "train.eval_batches=1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("translate")
    (d / "pairs.txt").write_text("\n".join(PAIRS * 3) + "\n", encoding="utf-8")
    with use_backend("numpy"):
        assert main(["train", "--task", "pairs", "--data", str(d / "pairs.txt"), "--out", str(d / "words"),
                     "--max-steps", "2", "--set", "data.lowercase=true", "--set", "data.val_fraction=0.25",
                     *SIZE]) == 0
        assert main(["train", "--task", "reverse", "--out", str(d / "reverse"), "--max-steps", "1",
                     "--set", "data.max_len=6", "--set", "data.alphabet=lower", *SIZE]) == 0
    return d


def test_input_file_gives_one_readable_line_per_line(runs, tmp_path, capsys):
    src = ["I am here.", "", "He is cold!", "you are here?", "Who are you?"]
    (tmp_path / "in.txt").write_text("\n".join(src) + "\n", encoding="utf-8")
    run = str(runs / "words")
    capsys.readouterr()
    assert main(["translate", "--checkpoint", run, "--input", str(tmp_path / "in.txt"), "--batch-size", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(src) and out[1] == ""  # a blank line stays blank
    # the text translate() decodes, made readable and re-cased like the source
    ckpt = load_checkpoint(run)
    model, src_tok, tgt_tok = ckpt.new_model(), ckpt.tokenizers["src"], ckpt.tokenizers["tgt"]
    for line, got in zip(src, out):
        if line:
            [want] = translate(model, [line.lower()], src_tok, tgt_tok, decode=lambda ids: readable(tgt_tok, ids))
            assert got == recase(want, line)
    # batches do not change what a line becomes; --text gives the same lines
    assert main(["translate", "--checkpoint", run, "--input", str(tmp_path / "in.txt"), "--batch-size", "5"]) == 0
    assert capsys.readouterr().out.splitlines() == out
    assert main(["translate", "--checkpoint", run, *[a for line in src for a in ("--text", line)]]) == 0
    assert capsys.readouterr().out.splitlines() == out


def test_stdin(runs, monkeypatch, capsys):
    run = str(runs / "words")
    assert main(["translate", "--checkpoint", run, "--text", "we run.", "--text", "who?"]) == 0
    expected = capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO("we run.\nwho?\n"))
    assert main(["translate", "--checkpoint", run, "--input", "-"]) == 0
    assert capsys.readouterr().out == expected


def test_unknown_words_are_named_in_one_warning(runs, capsys):
    capsys.readouterr()
    assert main(["translate", "--checkpoint", str(runs / "words"), "--text", "He is my dog.",
                 "--text", "I am here.", "--text", "My dog runs my dog."]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 3
    assert err == ("fastformer translate: warning: words outside the source vocabulary, read as <unk>: "
                   "'my' (lines 1, 3), 'dog' (lines 1, 3), 'runs' (line 3)\n")


def test_unknown_characters_and_unk_in_the_output(runs, capsys):
    run = str(runs / "reverse")
    capsys.readouterr()
    assert main(["translate", "--checkpoint", run, "--text", "hello world"]) == 0
    out, err = capsys.readouterr()
    assert "characters outside the source vocabulary, read as <unk>: ' ' (line 1)" in err
    assert "\ufffd" not in out  # an unknown character the model writes is shown as <unk>


def test_too_long_sources_are_reported_by_line_and_skipped_or_truncated(runs, tmp_path, capsys):
    run = str(runs / "words")
    lines = ["we run.", "i am here and you are here and he is here.", "who?"]
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["translate", "--checkpoint", run, "--input", str(tmp_path / "in.txt")]) == 0
    out, err = capsys.readouterr()
    alone = []
    for line in (lines[0], lines[2]):
        assert main(["translate", "--checkpoint", run, "--text", line]) == 0
        alone.append(capsys.readouterr().out.strip("\n"))
    assert out.splitlines() == [alone[0], "", alone[1]]  # the others are translated as alone
    assert err.splitlines()[0] == ("fastformer translate: warning: line 2: 12 source tokens, more than the model's "
                                   "max_src_len=6: skipped, its output line is empty (--truncate translates its "
                                   "first tokens)")
    assert main(["translate", "--checkpoint", run, "--input", str(tmp_path / "in.txt"), "--truncate"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 3 and "line 2: 12 source tokens" in err and "translated from its first 6" in err
    assert main(["translate", "--checkpoint", run, "--text", "i am here and you are"]) == 0
    assert out.splitlines()[1] == capsys.readouterr().out.strip("\n")  # its first 6 tokens


@pytest.mark.parametrize("args, message", [
    ([], "translate needs either --text TEXT (repeatable) or --input FILE (- for stdin)"),
    (["--text", "a", "--input", "-"], "translate needs either --text TEXT"),
    (["--input", "/nonexistent/in.txt"], "--input file '/nonexistent/in.txt' does not exist"),
    (["--text", "a", "--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
])
def test_bad_sources(runs, args, message, capsys):
    capsys.readouterr()
    assert main(["translate", "--checkpoint", str(runs / "words"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_recase():
    assert recase("je suis là.", "I am here.") == "Je suis là."
    assert recase("je suis là.", "i am here.") == "je suis là."
    assert recase("« oui »", "Yes") == "« Oui »" and recase("", "Yes") == ""


def test_input_that_is_not_utf8(runs, tmp_path, capsys):
    (tmp_path / "in.txt").write_bytes(b"we run.\n\xff\xfe who?\n")
    assert main(["translate", "--checkpoint", str(runs / "words"), "--input", str(tmp_path / "in.txt")]) == 2
    assert "line 2 is not UTF-8 text" in capsys.readouterr().err


@pytest.mark.parametrize("weights", ["bf16", "int8"])
def test_weights_option(runs, weights, capsys):
    from fastformer.kernels.ops.quantized import format_runs_natively

    if not format_runs_natively(weights):
        pytest.skip(f"no {weights} instruction on this CPU")
    run = str(runs / "words")
    capsys.readouterr()
    with use_backend("numpy"):
        assert main(["translate", "--checkpoint", run, "--text", "I am here.", "--weights", weights,
                     "--backend", "numba"]) == 0
    out = capsys.readouterr().out.splitlines()
    ckpt = load_checkpoint(run)
    model = ckpt.new_model().quantize(weights)
    src_tok, tgt_tok = ckpt.tokenizers["src"], ckpt.tokenizers["tgt"]
    with use_backend("numba"):
        [want] = translate(model, ["i am here."], src_tok, tgt_tok, decode=lambda ids: readable(tgt_tok, ids))
    assert out == [recase(want, "I am here.")]
