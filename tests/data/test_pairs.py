"""Pairs files, batches (padding, masks, shifted targets), splits, synthetic tasks, resumable streams."""

import numpy as np
import pytest

from fastformer.data import pairs
from fastformer.data.pairs import (
    PairBatches,
    SyntheticTask,
    detokenize,
    encode_pairs,
    make_batch,
    parse_alphabet,
    read_pairs,
    readable,
    split_pairs,
    unknown_pieces,
)
from fastformer.data.tokenizer import ByteTokenizer, WordTokenizer
from fastformer.errors import FastformerError


def test_make_batch_pads_shifts_and_masks():
    b = make_batch([[5, 6, 7], [8]], [[9], [10, 11, 12]], pad_id=0, bos_id=1, eos_id=2)
    np.testing.assert_array_equal(b["src_ids"], [[5, 6, 7], [8, 0, 0]])
    np.testing.assert_array_equal(b["src_mask"], [[1, 1, 1], [1, 0, 0]])
    np.testing.assert_array_equal(b["tgt_in"], [[1, 9, 0, 0], [1, 10, 11, 12]])
    np.testing.assert_array_equal(b["targets"], [[9, 2, -100, -100], [10, 11, 12, 2]])
    np.testing.assert_array_equal(b["tgt_mask"], [[1, 1, 0, 0], [1, 1, 1, 1]])
    # the decoder input is the target shifted right by one, behind <bos>
    np.testing.assert_array_equal(b["tgt_in"][1, 1:], b["targets"][1, :-1])


def test_read_pairs_skips_bad_lines(tmp_path):
    p = tmp_path / "pairs.txt"
    p.write_text("Go.\tVa !\n\nno tab here\nHi.\tSalut !\tCC-BY\n\tvide\nRun!\tCours\u202f!\n", encoding="utf-8")
    pairs, skipped = read_pairs(p, lowercase=True)
    assert pairs == [("go.", "va !"), ("hi.", "salut !"), ("run!", "cours\u202f!")]
    assert skipped == {"empty line": 1, "no tab": 1, "empty side": 1}
    c = tmp_path / "pairs.csv"
    c.write_text('source,target\n"Hello, you",Bonjour\n', encoding="utf-8")
    assert read_pairs(c)[0] == [("source", "target"), ("Hello, you", "Bonjour")]
    with pytest.raises(FastformerError, match="does not exist"):
        read_pairs(tmp_path / "missing.txt")


def test_encode_pairs_filters_long_pairs():
    tok = WordTokenizer.build(["a b c d"])
    src, tgt, too_long = encode_pairs([("a b", "c"), ("a b c d", "a"), ("a", "a b c")], tok, tok, 3, 3)
    # target room: max_tgt_len - 1 = 2
    assert ([s.tolist() for s in src], [t.tolist() for t in tgt], too_long) == ([[4, 5]], [[6]], 2)


def test_split_is_deterministic_and_disjoint():
    items = list(range(50))
    train, val = split_pairs(items, 0.1, rng=3)
    assert len(val) == 5 and sorted(train + val) == items
    assert split_pairs(items, 0.1, rng=3) == (train, val)
    assert split_pairs(items, 0.1, rng=4)[1] != val


def test_pair_batches_cover_an_epoch_and_resume():
    src = [[i + 4] for i in range(10)]
    data = PairBatches(src, src, batch_size=4, rng=np.random.default_rng(0))
    seen = np.concatenate([data.next_batch()["src_ids"][:, 0] for _ in range(3)])
    assert sorted(seen.tolist()) == list(range(4, 14))  # one epoch: 4 + 4 + 2
    state = data.state_dict()
    after = [data.next_batch()["src_ids"] for _ in range(4)]
    resumed = PairBatches(src, src, batch_size=4, rng=1)
    resumed.load_state_dict(state)
    for a in after:
        np.testing.assert_array_equal(resumed.next_batch()["src_ids"], a)


@pytest.mark.parametrize("task,src,tgt", [("copy", "ab!3", "ab!3"), ("reverse", "hello123", "321olleh"),
                                          ("sort", "cab1", "abc1")])
def test_synthetic_targets(task, src, tgt):
    assert SyntheticTask(task, alphabet="letters+digits+punctuation").target(src) == tgt


def test_synthetic_batches_and_resume():
    task = SyntheticTask("reverse", min_len=2, max_len=5, alphabet="lower+digits", batch_size=8, rng=7)
    b = task.next_batch()
    tok = task.tokenizer
    for i in range(8):
        s = tok.decode(b["src_ids"][i])
        t = tok.decode(b["targets"][i][b["targets"][i] >= 0])
        assert 2 <= len(s) <= 5 and t == s[::-1] and set(s) <= set(parse_alphabet("lower+digits"))
    state = task.state_dict()
    nxt = task.next_batch()
    other = SyntheticTask("reverse", min_len=2, max_len=5, alphabet="lower+digits", batch_size=8, rng=0)
    other.load_state_dict(state)
    again = other.next_batch()
    for k in nxt:
        np.testing.assert_array_equal(again[k], nxt[k])


def test_synthetic_errors():
    with pytest.raises(FastformerError, match="task must be one of"):
        SyntheticTask("shuffle")
    with pytest.raises(FastformerError, match="unknown alphabet name"):
        SyntheticTask("copy", alphabet="letters+emoji")
    with pytest.raises(FastformerError, match="min_len <= max_len"):
        SyntheticTask("copy", min_len=5, max_len=2)
    with pytest.raises(FastformerError, match="min_len <= max_len, got min_len=True"):
        SyntheticTask("copy", min_len=True, max_len=2)
    with pytest.raises(FastformerError, match="batch_size must be an integer >= 1, got 2.0"):
        SyntheticTask("copy", batch_size=2.0)
    with pytest.raises(FastformerError, match="an alphabet must be a str"):
        parse_alphabet(None)
    assert parse_alphabet("chars:abca") == "abc"


# ------------------------------------------------------------------- readable output
def test_readable_reattaches_punctuation_and_shows_unk():
    pytest.importorskip("sacremoses")
    tok = WordTokenizer.build(["Je suis froid. Où est le chat ? L'eau, est-ce là ? (oui)"])
    ids = tok.encode("Je suis froid . Où est le zèbre ? L'eau , est-ce là ? ( oui )")
    assert tok.decode(ids) == "Je suis froid . Où est le ? L ' eau , est - ce là ? ( oui )"  # what decode writes
    assert readable(tok, ids) == "Je suis froid. Où est le <unk>? L'eau, est-ce là? (oui)"
    assert readable(tok, ids, lang="fr") == "Je suis froid. Où est le <unk> ? L'eau, est-ce là ? (oui)"
    specials = [tok.bos_id, *tok.encode("froid ."), tok.eos_id, tok.pad_id]
    assert readable(tok, specials) == "froid."


def test_detokenize_without_sacremoses(monkeypatch):
    monkeypatch.setattr(pairs, "_moses", lambda lang: None)
    tokens = "Où est le <unk> ? L ' eau , est - ce là ? ( oui ) 5 % .".split()
    assert detokenize(tokens) == "Où est le <unk>? L'eau, est-ce là? (oui) 5%."


def test_readable_chars_write_unk():
    tok = SyntheticTask("reverse", alphabet="lower").tokenizer
    ids = tok.encode("hello world")  # the space is outside the alphabet
    assert tok.decode(ids) == "hello\ufffdworld"
    assert readable(tok, ids) == "hello<unk>world"
    assert readable(ByteTokenizer(), ByteTokenizer().encode("a b")) == "a b"  # other kinds decode as they do


def test_unknown_pieces():
    words = WordTokenizer.build(["il est mon chien ."], lowercase=True)
    assert unknown_pieces(words, "Il est mon zèbre, ok.") == ["zèbre", ",", "ok"]
    assert unknown_pieces(words, "il est mon chien .") == []
    chars = SyntheticTask("reverse", alphabet="lower").tokenizer
    assert unknown_pieces(chars, "hello World!") == [" ", "W", "!"]
    assert unknown_pieces(ByteTokenizer(), "anything ✓") == []
