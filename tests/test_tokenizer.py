"""The byte tokenizer: lossless on any Unicode text, special ids, save/load by kind."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastformer.tokenizer import ByteTokenizer, load_tokenizer


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
    with pytest.raises(ValueError, match=r"token id 259 is outside.*\[0, 259\)"):
        tok.decode([104, 259])
    assert tok.decode([0xC3]) == "\ufffd"  # a character cut in half decodes to U+FFFD
    with pytest.raises(UnicodeDecodeError):
        tok.decode([0xC3], errors="strict")
    with pytest.raises(ValueError, match="needs a str"):
        tok.encode(b"bytes")


def test_save_and_load_by_kind(tmp_path):
    ByteTokenizer().save(str(tmp_path))
    assert json.loads((tmp_path / "tokenizer.json").read_text())["kind"] == "byte"
    tok = load_tokenizer(str(tmp_path))
    assert isinstance(tok, ByteTokenizer) and tok.decode(tok.encode("ok ✓")) == "ok ✓"


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer at"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text('{"kind": "bpe9"}')
    with pytest.raises(ValueError, match=r"kind 'bpe9'; known kinds are \['bpe', 'byte', 'char'\]"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text('{"kind": "by')
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_tokenizer(str(tmp_path))
