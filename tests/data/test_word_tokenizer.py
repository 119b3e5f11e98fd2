"""WordTokenizer: splitting, specials, unknowns, min_freq, save/load through the shared registry."""

import json

import numpy as np
import pytest

from fastformer.data.tokenizer import TOKENIZER_KINDS, CharTokenizer, WordTokenizer, load_tokenizer
from fastformer.errors import FastformerError


def test_split_vocab_and_round_trip(tmp_path):
    texts = ["Il est là !", "Il a de l'eau.", "il est grand."]
    tok = WordTokenizer.build(texts, lowercase=True)
    assert tok.tokenize("Il a de l'eau.") == ["il", "a", "de", "l", "'", "eau", "."]
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    # most frequent first ("il" 3, "." 2, "est" 2), ties alphabetical
    assert tok.words[:3] == ["il", ".", "est"]
    ids = tok.encode("Il est petit.")
    assert ids.dtype == np.int64 and ids.tolist() == [4, 6, 3, 5]  # "petit" is unknown
    assert tok.encode("il", bos=True, eos=True).tolist() == [1, 4, 2]
    assert tok.decode([1, *ids, 2, 0, 0]) == "il est ."  # specials and <unk> skipped
    assert tok.normalize("Il est petit.") == "il est petit ."
    tok.save(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    assert data["kind"] == "word" and TOKENIZER_KINDS["word"] is WordTokenizer
    again = load_tokenizer(tmp_path)
    assert isinstance(again, WordTokenizer)
    assert again.words == tok.words and again.lowercase and again.vocab_size == tok.vocab_size
    assert tok.byte_lengths().tolist()[:5] == [0, 0, 0, 0, 3]  # "il" and its space


def test_min_freq_and_errors(tmp_path):
    tok = WordTokenizer.build(["a b b", "c b a"], min_freq=2)
    assert tok.words == ["b", "a"]
    assert tok.encode("c").tolist() == [3]
    with pytest.raises(FastformerError, match="min_freq must be an integer >= 1"):
        WordTokenizer.build(["a"], min_freq=0)
    with pytest.raises(FastformerError, match="token id 99 is outside the word vocabulary"):
        tok.decode([99])
    with pytest.raises(FastformerError, match="no tokenizer at"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(FastformerError, match="distinct non-empty strings and no specials"):
        WordTokenizer(["a", "a"])
    d = tok.to_dict()
    d["vocab_size"] = 99
    (tmp_path / "tokenizer.json").write_text(json.dumps(d))
    with pytest.raises(FastformerError, match="vocab_size=99, but its words make 6"):
        load_tokenizer(tmp_path)


def test_char_tokenizer_over_an_alphabet(tmp_path):
    tok = CharTokenizer("abc12!")
    assert tok.encode("cab!?").tolist() == [6, 4, 5, 9, 3]
    assert tok.decode([1, 6, 4, 5, 9, 2]) == "cab!"
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert isinstance(again, CharTokenizer) and again.chars == tok.chars
