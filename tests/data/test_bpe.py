"""Byte-level BPE: training offline, lossless round trips, the standard tokenizer.json."""

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

pytest.importorskip("tokenizers")
from fastformer.data.bpe import BPETokenizer  # noqa: E402
from fastformer.errors import FastformerError

CORPUS = ("the cat sat on the mat. the dog sat on the log. "
          "a cat and a dog met on the mat and sat together.\n") * 50


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(CORPUS, encoding="utf-8")
    return BPETokenizer.train([path], vocab_size=300)


def test_training_learns_merges_and_compresses(bpe):
    assert 259 < bpe.vocab_size <= 300  # a small corpus may run out of pairs to merge
    assert (bpe.pad_id, bpe.bos_id, bpe.eos_id) == (0, 1, 2)
    ids = bpe.encode("the cat sat on the mat.")
    assert len(ids) < len("the cat sat on the mat.".encode()) / 2


@settings(max_examples=60, deadline=None)
@given(st.text())
@example("say <eos> or <pad>")  # text that spells a special token stays text
def test_round_trip_any_unicode(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_specials_and_bad_ids(bpe):
    ids = bpe.encode("the dog", bos=True, eos=True)
    assert ids[0] == bpe.bos_id and ids[-1] == bpe.eos_id
    assert bpe.decode(ids) == "the dog"
    V = bpe.vocab_size
    with pytest.raises(FastformerError, match=f"token id {V} is outside the BPE vocabulary \\[0, {V}\\)"):
        bpe.decode([5, V])


def test_saved_file_is_standard_and_reloads(bpe, tmp_path):
    import tokenizers

    bpe.save(tmp_path)
    text = "a cat met a dog. ünïcödé ✓"
    std = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert std.encode(text).ids == bpe.encode(text).tolist()
    again = BPETokenizer.from_file(tmp_path / "tokenizer.json")
    np.testing.assert_array_equal(again.encode(text), bpe.encode(text))
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert fast(text)["input_ids"] == bpe.encode(text).tolist()


def test_bad_training_input(tmp_path):
    with pytest.raises(FastformerError, match="no such text file"):
        BPETokenizer.train([tmp_path / "missing.txt"], vocab_size=300)
    (tmp_path / "c.txt").write_text("abc")
    with pytest.raises(FastformerError, match=r"vocab_size must be an integer in \[259, 16777216\], got 100"):
        BPETokenizer.train([tmp_path / "c.txt"], vocab_size=100)
    # a size the Rust trainer would abort the process on is refused before it runs
    with pytest.raises(FastformerError, match=r"vocab_size must be an integer in \[259, 16777216\], got 1000000000"):
        BPETokenizer.train([tmp_path / "c.txt"], vocab_size=10 ** 9)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(FastformerError, match=r"bad.json is not valid JSON \(corrupt or truncated\)"):
        BPETokenizer.from_file(tmp_path / "bad.json")


def test_training_text_must_be_utf8_and_not_empty(tmp_path):
    good, bad = tmp_path / "good.txt", tmp_path / "latin1.txt"
    good.write_text("some text\n" * 20)
    bad.write_bytes(b"ok so far\n" * 1000 + "caf\xe9\n".encode("latin-1"))
    with pytest.raises(FastformerError, match=r"latin1.txt is not UTF-8 \(byte 10003: invalid continuation byte\)"):
        BPETokenizer.train([good, bad], vocab_size=300)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text(" \n\n\t")
    with pytest.raises(FastformerError, match="hold no text to learn merges from"):
        BPETokenizer.train([tmp_path / "empty.txt", tmp_path / "blank.txt"], vocab_size=300)
    with pytest.raises(FastformerError, match="no text files given"):
        BPETokenizer.train([], vocab_size=300)


def test_ids_with_gaps_are_refused(bpe):
    from tokenizers import Tokenizer, models

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "a": 7, "b": 1000}  # 5 tokens, ids up to 1000
    sparse = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    with pytest.raises(FastformerError,
                       match=r"ids must be 0\.\.4 without gaps.*run to 1000 \(missing: \[3, 4, 5, 6, 8\]"):
        BPETokenizer(sparse)
    dense = Tokenizer(models.WordLevel({**vocab, "a": 3, "b": 4}, unk_token="<pad>"))
    assert BPETokenizer(dense).vocab_size == 5


@settings(max_examples=60, deadline=None)
@given(st.text())
@example("<eos>")
def test_byte_lengths_count_utf8_bytes(bpe, text):
    ids = bpe.encode(text, bos=True, eos=True)
    assert bpe.byte_lengths()[ids].sum() == len(text.encode("utf-8"))


def test_load_tokenizer_recognises_the_hf_file(bpe, tmp_path):
    from fastformer.data.tokenizer import load_tokenizer

    bpe.save(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    assert isinstance(tok, BPETokenizer) and tok.vocab_size == bpe.vocab_size
    np.testing.assert_array_equal(tok.encode("the cat"), bpe.encode("the cat"))
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "Nonsense"}}')
    with pytest.raises(FastformerError, match="not a readable Hugging Face tokenizer.json"):
        load_tokenizer(str(tmp_path))
