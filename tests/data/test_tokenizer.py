"""The byte tokenizer: lossless on any Unicode text, special ids, save/load by kind."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastformer.data.tokenizer import ByteTokenizer, CharTokenizer, WordTokenizer, load_tokenizer, make_tokenizer
from fastformer.errors import FastformerError


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_any_unicode(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.dtype == np.int64 and ids.min(initial=0) >= 0 and ids.max(initial=0) < 256
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == text  # special ids are dropped


def test_special_ids():
    tok = ByteTokenizer()
    assert tok.vocab_size == 259 and (tok.pad_id, tok.bos_id, tok.eos_id) == (256, 257, 258)
    ids = tok.encode("hé", bos=True, eos=True)
    assert ids.tolist() == [257, 104, 0xC3, 0xA9, 258]


def test_decode_errors():
    tok = ByteTokenizer()
    with pytest.raises(FastformerError, match=r"token id 259 is outside.*\[0, 259\)"):
        tok.decode([104, 259])
    assert tok.decode([0xC3]) == "\ufffd"  # a character cut in half decodes to U+FFFD
    with pytest.raises(UnicodeDecodeError):
        tok.decode([0xC3], errors="strict")
    with pytest.raises(FastformerError, match="needs a str"):
        tok.encode(b"bytes")


@pytest.mark.parametrize("tok", [ByteTokenizer(), CharTokenizer.from_text("abc"), WordTokenizer(["a", "b"])],
                         ids=["byte", "char", "word"])
def test_every_kind_refuses_the_same_bad_input(tok):
    with pytest.raises(FastformerError, match="encode needs a str, got bytes"):
        tok.encode(b"abc")
    with pytest.raises(FastformerError, match="bos must be True or False, got 1"):
        tok.encode("abc", bos=1)
    with pytest.raises(FastformerError, match="token ids must be integers, got dtype float64"):
        tok.decode([1.0, 2.0])
    with pytest.raises(FastformerError, match=r"token id -1 is outside the .*vocabulary \[0, "):
        tok.decode(np.array([[0, -1]]))
    assert tok.decode([]) == ""


def test_save_and_load_by_kind(tmp_path):
    ByteTokenizer().save(str(tmp_path))
    assert json.loads((tmp_path / "tokenizer.json").read_text())["kind"] == "byte"
    tok = load_tokenizer(str(tmp_path))
    assert isinstance(tok, ByteTokenizer) and tok.decode(tok.encode("ok ✓")) == "ok ✓"


def test_load_errors(tmp_path):
    with pytest.raises(FastformerError, match="no tokenizer at"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text('{"kind": "bpe9"}')
    with pytest.raises(FastformerError, match=r"kind 'bpe9'; known kinds are \['bpe', 'byte', 'char', 'word'\]"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text('{"kind": "by')
    with pytest.raises(FastformerError, match="corrupt or truncated"):
        load_tokenizer(str(tmp_path))


# ---------------------------------------------------------------- char tokenizer
CHARS = "abc é✓😀\n"


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=CHARS))
def test_char_round_trip_and_byte_lengths(text):
    tok = CharTokenizer.from_text(CHARS)
    ids = tok.encode(text, bos=True, eos=True)
    assert ids.dtype == np.int64 and ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert len(ids) == len(text) + 2
    assert tok.decode(ids) == text
    assert tok.byte_lengths()[ids].sum() == len(text.encode("utf-8"))


def test_char_unknown_characters_become_unk(tmp_path):
    (tmp_path / "a.txt").write_text("hello\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("world 😀", encoding="utf-8")
    tok = CharTokenizer.train([tmp_path / "a.txt", tmp_path / "b.txt"], chunk_bytes=3)  # an emoji split across chunks
    assert tok.chars == sorted(set("hello\nworld 😀")) and tok.vocab_size == 4 + len(tok.chars)
    ids = tok.encode("hex😀")
    assert ids[2] == tok.unk_id and ids[3] != tok.unk_id  # 'x' unseen; the emoji (beyond U+FFFF) seen
    assert tok.decode(ids) == "he\ufffd😀"
    with pytest.raises(FastformerError, match=r"token id 99 is outside the char vocabulary"):
        tok.decode([99])
    with pytest.raises(FastformerError, match="no such text file"):
        CharTokenizer.train([tmp_path / "missing.txt"])


def test_char_save_and_load_by_kind(tmp_path):
    tok = CharTokenizer.from_text("the ünïcödé text\n")
    tok.save(str(tmp_path))
    again = load_tokenizer(str(tmp_path))
    assert isinstance(again, CharTokenizer) and again.chars == tok.chars
    np.testing.assert_array_equal(again.encode("the text"), tok.encode("the text"))
    d = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    d["vocab_size"] = 3
    (tmp_path / "tokenizer.json").write_text(json.dumps(d))
    with pytest.raises(FastformerError, match="vocab_size=3, but its characters make"):
        load_tokenizer(str(tmp_path))


def test_char_reads_the_seq2seq_char_format(tmp_path):
    # the file the synthetic tasks' char tokenizers were first saved in: specials, then the alphabet in its order
    (tmp_path / "tokenizer.json").write_text(json.dumps(
        {"kind": "char", "lowercase": False, "specials": ["<pad>", "<bos>", "<eos>", "<unk>"], "vocab": ["z", "a"]}))
    tok = load_tokenizer(str(tmp_path))
    assert tok.encode("az?").tolist() == [5, 4, 3] and tok.vocab_size == 6
    tok.save(str(tmp_path / "again"))
    assert json.loads((tmp_path / "again" / "tokenizer.json").read_text())["vocab"] == ["z", "a"]


def test_make_tokenizer(tmp_path):
    assert isinstance(make_tokenizer("byte"), ByteTokenizer)
    assert make_tokenizer("char", "aab").chars == ["a", "b"]
    ByteTokenizer().save(str(tmp_path))
    assert isinstance(make_tokenizer(str(tmp_path)), ByteTokenizer)
    with pytest.raises(FastformerError, match="data.tokenizer 'wordpiece' is not known: valid values are byte, char"):
        make_tokenizer("wordpiece")


def test_unknown_tokenizer_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"vocab": {"a": 0}}')
    with pytest.raises(FastformerError, match=r"has kind None; known kinds are .*Hugging Face"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text('[1, 2]')
    with pytest.raises(FastformerError, match="holds a list, not a JSON object"):
        load_tokenizer(str(tmp_path))


def test_cli_tokenizer_train(tmp_path, capsys):
    from fastformer.cli import main

    (tmp_path / "a.txt").write_text("abc cab\n", encoding="utf-8")
    assert main(["tokenizer", "train", "--kind", "char", "--data", str(tmp_path / "a.txt"), "--out",
                 str(tmp_path / "char")]) == 0
    assert "char tokenizer with 9 ids" in capsys.readouterr().out  # 4 specials + newline, space, a, b, c
    assert load_tokenizer(str(tmp_path / "char")).chars == ["\n", " ", "a", "b", "c"]
    assert main(["tokenizer", "train", "--kind", "char", "--vocab-size", "10", "--data", str(tmp_path / "a.txt"),
                 "--out", str(tmp_path / "x")]) == 2
    assert "--vocab-size does not apply to --kind char" in capsys.readouterr().err
    assert main(["tokenizer", "train", "--data", str(tmp_path / "a.txt"), "--out", str(tmp_path / "x")]) == 2
    assert "needs --vocab-size N" in capsys.readouterr().err
