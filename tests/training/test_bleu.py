"""Corpus BLEU-4 against a worked example (and against sacrebleu when it is installed)."""

import math
import sys

import pytest

from fastformer.errors import FastformerError
from fastformer.training.bleu import bleu_stats, corpus_bleu, detokenized_bleu, own_corpus_bleu

HYPS = ["the cat sat on the mat", "a b c d e"]
REFS = ["the cat is on the mat", "a b c d e f g"]


def test_worked_example():
    # sentence 1: 1-grams 5/6 (the x2, cat, on, mat), 2-grams 3/5 (the cat, on the, the mat),
    #             3-grams 1/4 (on the mat), 4-grams 0/3
    # sentence 2: every n-gram matches: 5/5, 4/4, 3/3, 2/2
    # corpus: 10/11, 7/9, 4/7, 2/5; c = 11 < r = 13, so BP = exp(1 - 13/11)
    matches, totals, c, r = bleu_stats(HYPS, REFS)
    assert (matches, totals, c, r) == ([10, 7, 4, 2], [11, 9, 7, 5], 11, 13)
    expected = 100 * math.exp(1 - 13 / 11) * (10 / 11 * 7 / 9 * 4 / 7 * 2 / 5) ** 0.25
    assert own_corpus_bleu(HYPS, REFS) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(52.86, abs=0.01)


def test_zero_matches_are_smoothed_and_perfect_is_100():
    # sentence 1 alone: 5/6, 3/5, 1/4 and no 4-gram match -> 1 / (2 * 3); c = r so BP = 1
    assert own_corpus_bleu(HYPS[:1], REFS[:1]) == pytest.approx(100 * (5 / 6 * 3 / 5 * 1 / 4 / 6) ** 0.25)
    assert own_corpus_bleu(REFS, REFS) == pytest.approx(100.0)
    assert own_corpus_bleu(["a b c"], ["a b c"]) == 0.0  # no 4-grams at all
    assert own_corpus_bleu([""], ["a b"]) == 0.0
    with pytest.raises(FastformerError, match="one reference per hypothesis"):
        own_corpus_bleu(HYPS, REFS[:1])


def test_against_sacrebleu():
    sacrebleu = pytest.importorskip("sacrebleu")
    hyps = HYPS + ["il est là .", "je suis très content de te voir ."]
    refs = REFS + ["il est ici .", "je suis content de te voir ."]
    _, which = corpus_bleu(hyps, refs)
    assert which == "sacrebleu"
    assert own_corpus_bleu(hyps, refs) == pytest.approx(
        sacrebleu.corpus_bleu(hyps, [refs], tokenize="none").score, rel=1e-9)


def test_detokenized_bleu_is_sacrebleus_standard_score():
    sacrebleu = pytest.importorskip("sacrebleu")
    hyps, refs = ["Il est là.", "Je suis très content de te voir !"], ["Il est ici.", "Je suis content de te voir !"]
    assert detokenized_bleu(hyps, refs) == sacrebleu.corpus_bleu(hyps, [refs]).score
    # the 13a tokenization splits the punctuation itself: detokenized text scores as its tokens do
    assert detokenized_bleu(hyps, refs) == pytest.approx(
        own_corpus_bleu(["Il est là .", "Je suis très content de te voir !"],
                        ["Il est ici .", "Je suis content de te voir !"]), rel=1e-9)
    with pytest.raises(FastformerError, match="one reference per hypothesis"):
        detokenized_bleu(hyps, refs[:1])


def test_detokenized_bleu_without_sacrebleu(monkeypatch):
    monkeypatch.setitem(sys.modules, "sacrebleu", None)  # import sacrebleu raises ImportError
    assert detokenized_bleu(["a b"], ["a b"]) is None


def test_evaluate_seq2seq_reports_both_bleus():
    pytest.importorskip("sacrebleu")
    import numpy as np

    from fastformer import Seq2SeqConfig, Seq2SeqTransformer
    from fastformer.data.pairs import make_batch, readable
    from fastformer.data.tokenizer import WordTokenizer
    from fastformer.generation.search import greedy_decode
    from fastformer.training.evaluate import evaluate_seq2seq

    pairs = [("i am here .", "Je suis là."), ("who ?", "Qui ?"), ("we run .", "L'eau, est-ce là ?")]
    src, tgt = WordTokenizer.build([s for s, _ in pairs]), WordTokenizer.build([t for _, t in pairs])
    model = Seq2SeqTransformer(Seq2SeqConfig(src_vocab_size=src.vocab_size, tgt_vocab_size=tgt.vocab_size,
                                             max_src_len=8, max_tgt_len=10, d_model=16, n_heads=2, d_ff=16,
                                             n_encoder_layers=1, n_decoder_layers=1), seed=3)
    m = evaluate_seq2seq(model, pairs, src, tgt, batch_size=2)
    b = make_batch([src.encode(s) for s, _ in pairs], [tgt.encode(t) for _, t in pairs], src.pad_id)
    out, _ = greedy_decode(model, b["src_ids"], b["src_mask"], tgt.bos_id, tgt.eos_id)
    assert m["bleu"] == corpus_bleu([tgt.decode(o) for o in out], [tgt.normalize(t) for _, t in pairs])[0]
    assert m["sacrebleu"] == detokenized_bleu([readable(tgt, o) for o in out], [t for _, t in pairs])
    assert np.isfinite(m["sacrebleu"])
