"""WordTokenizer and CharTokenizer: splitting, specials, unknowns, min_freq, save/load."""

import json

import pytest

from fastformer.word_tokenizer import CharTokenizer, WordTokenizer, load_tokenizer


def test_split_vocab_and_round_trip(tmp_path):
    texts = ["Il est là !", "Il a de l'eau.", "il est grand."]
    tok = WordTokenizer.build(texts, lowercase=True)
    assert tok.tokenize("Il a de l'eau.") == ["il", "a", "de", "l", "'", "eau", "."]
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    # most frequent first ("il" 3, "." 2, "est" 2), ties alphabetical
    assert tok.itos[4:7] == ["il", ".", "est"]
    ids = tok.encode("Il est petit.")
    assert ids == [4, 6, 3, 5]  # "petit" is unknown
    assert tok.decode([1] + ids + [2, 0, 0]) == "il est ."  # specials and <unk> skipped
    tok.save(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    assert data["kind"] == "word"
    again = WordTokenizer.load(tmp_path)
    assert again.itos == tok.itos and again.lowercase and again.vocab_size == tok.vocab_size
    assert isinstance(load_tokenizer(tmp_path), WordTokenizer)


def test_min_freq_and_errors(tmp_path):
    tok = WordTokenizer.build(["a b b", "c b a"], min_freq=2)
    assert tok.itos[4:] == ["b", "a"]
    assert tok.encode("c") == [3]
    with pytest.raises(ValueError, match="min_freq must be an integer >= 1"):
        WordTokenizer.build(["a"], min_freq=0)
    with pytest.raises(ValueError, match="token id must lie in"):
        tok.decode([99])
    with pytest.raises(ValueError, match="no tokenizer file"):
        WordTokenizer.load(tmp_path / "nowhere")
    CharTokenizer("abc").save(tmp_path)
    with pytest.raises(ValueError, match="expected 'word'"):
        WordTokenizer.load(tmp_path)


def test_char_tokenizer(tmp_path):
    tok = CharTokenizer("abc12!")
    assert tok.encode("cab!?") == [6, 4, 5, 9, 3]
    assert tok.decode([1, 6, 4, 5, 9, 2]) == "cab!"
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert isinstance(again, CharTokenizer) and again.itos == tok.itos
