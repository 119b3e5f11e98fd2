"""Greedy and beam-search decoding: the cached decoder against full forward passes, beam size 1
against greedy, wide beams against exhaustive search, and a case where greedy is myopic."""

import itertools

import numpy as np
import pytest

from fastformer.generation.search import beam_decode, beam_search, greedy_decode, greedy_search, log_softmax
from fastformer.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer

BOS, EOS = 1, 2


def small_model(V=11, max_tgt_len=7, seed=0, **kw):
    cfg = Seq2SeqConfig(src_vocab_size=13, tgt_vocab_size=V, max_src_len=6, max_tgt_len=max_tgt_len,
                        d_model=16, n_heads=2, d_ff=24, n_encoder_layers=2, n_decoder_layers=2,
                        tie_embeddings=False, **kw)
    return Seq2SeqTransformer(cfg, seed=seed, dtype=np.float64)


def stop_sometimes(model, src, mask):
    """A random model rarely says <eos>: give <eos> the output row, a little larger, of a token
    that greedy picks after the first step in some rows but not all, so that those rows stop
    early and the others run to max_len."""
    seqs, _ = greedy_decode(model, src, mask, BOS, EOS)
    rows_with = np.array([[t in s[1:] for s in seqs] for t in range(model.config.tgt_vocab_size)]).sum(axis=1)
    some = [t for t in range(3, len(rows_with)) if 0 < rows_with[t] < len(seqs)]
    assert some, "no token splits the rows; pick another seed"
    W = model.params["lm_head.weight"]
    W[EOS] = 1.1 * W[some[0]]


def sources(seed=0):
    rng = np.random.default_rng(seed)
    src = rng.integers(3, 13, (5, 6))
    mask = np.ones_like(src)
    mask[1, 2:] = 0
    mask[3, 4:] = 0
    return src, mask


def uncached_greedy(model, src, mask, max_len):
    """Reference: a full forward pass over the whole prefix for every new token."""
    out = []
    for b in range(len(src)):
        seq = [BOS]
        for _ in range(max_len):
            nxt = int(model.forward(src[b:b + 1], mask[b:b + 1], np.array([seq]), None)[0, -1].argmax())
            if nxt == EOS:
                break
            seq.append(nxt)
        out.append(seq[1:])
    return out


@pytest.mark.parametrize("kw", [dict(), dict(positional="sinusoidal", norm_first=False)])
def test_cached_greedy_equals_uncached(kw):
    model = small_model(**kw)
    src, mask = sources()
    stop_sometimes(model, src, mask)
    seqs, scores = greedy_decode(model, src, mask, BOS, EOS)
    ref = uncached_greedy(model, src, mask, model.config.max_tgt_len)
    assert seqs == ref
    assert min(map(len, seqs)) < model.config.max_tgt_len and max(map(len, seqs)) == model.config.max_tgt_len
    # the score is the sum of the chosen tokens' log-probs, <eos> included when produced
    for b, seq in enumerate(seqs):
        tgt_in = np.array([[BOS] + seq])[:, :model.config.max_tgt_len]
        logp = log_softmax(model.forward(src[b:b + 1], mask[b:b + 1], tgt_in, None))[0]
        nxt = seq + ([EOS] if len(seq) < model.config.max_tgt_len else [])
        assert scores[b] == pytest.approx(sum(logp[i, t] for i, t in enumerate(nxt)), rel=1e-9)


def test_decode_step_matches_forward_logits():
    model = small_model()
    src, mask = sources()
    tgt = np.random.default_rng(1).integers(0, 11, (5, 6))
    full = model.forward(src, mask, tgt, None)
    state = model.init_state(src, mask)
    first = model.step(tgt[:, :3], state)  # a prefix of 3 at once, then one at a time
    rest = [model.step(tgt[:, t:t + 1], state) for t in range(3, 6)]
    np.testing.assert_allclose(np.concatenate([first] + rest, axis=1), full, atol=1e-12)
    with pytest.raises(ValueError, match="cache room left"):
        model.step(tgt[:, :2], state)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_size_one_equals_greedy(length_penalty):
    model = small_model()
    src, mask = sources()
    stop_sometimes(model, src, mask)
    g, g_scores = greedy_decode(model, src, mask, BOS, EOS)
    b, b_scores = beam_decode(model, src, mask, beam_size=1, length_penalty=length_penalty, bos_id=BOS, eos_id=EOS)
    assert b == g
    lengths = np.array([len(s) + (len(s) < model.config.max_tgt_len) for s in g])
    np.testing.assert_allclose(b_scores, g_scores / lengths ** length_penalty, rtol=1e-12)


def test_wide_beam_finds_the_exhaustive_best():
    """With as many beams as there are sequences, beam search (no length penalty) is exact."""
    V, L = 4, 3
    model = small_model(V=V, max_tgt_len=L, seed=3)
    src, mask = sources(2)
    seqs, scores = beam_decode(model, src, mask, beam_size=V ** L, length_penalty=0.0, bos_id=BOS, eos_id=EOS)
    others = [t for t in range(V) if t != EOS]
    for b in range(len(src)):
        best = (-np.inf, None)
        for n in range(L + 1):  # n tokens then <eos>, or L tokens without
            for body in itertools.product(others, repeat=n):
                nxt = list(body) + ([EOS] if n < L else [])
                tgt_in = np.array([[BOS] + list(body)])[:, :L]
                logp = log_softmax(model.forward(src[b:b + 1], mask[b:b + 1], tgt_in, None))[0]
                score = sum(logp[i, t] for i, t in enumerate(nxt))
                best = max(best, (score, list(body)), key=lambda x: x[0])
        assert seqs[b] == best[1]
        assert scores[b] == pytest.approx(best[0], rel=1e-9)


def tree_step(table):
    """A hand-made model: the next-token distribution depends on the previous token only."""
    def step(tokens, parents=None):
        return np.log(np.array([table[int(t)] for t in tokens]))
    return step


def test_beam_beats_greedy_on_a_myopic_case():
    # after <bos>: token 3 (0.6) or token 4 (0.4); after 3 everything is uncertain; after 4, <eos> surely
    eps = 1e-9
    table = {BOS: [eps, eps, eps, 0.6, 0.4 - 3 * eps],
             3: [0.25, 0.25, 0.25, 0.25 - eps, eps],
             4: [eps, eps, 1 - 4 * eps, eps, eps],
             0: [0.2] * 5, 2: [0.2] * 5}
    g, g_score = greedy_search(tree_step(table), 1, BOS, EOS, 2)
    b, b_score = beam_search(tree_step(table), 1, 2, BOS, EOS, 2, length_penalty=0.0)
    assert g == [[3, 0]] and g_score[0] == pytest.approx(np.log(0.6 * 0.25))
    assert b == [[4]] and b_score[0] == pytest.approx(np.log(0.4), rel=1e-6)


def test_search_argument_errors():
    with pytest.raises(ValueError, match="beam_size must be an integer >= 1, got 0"):
        beam_search(tree_step({}), 1, 0, BOS, EOS, 3)
    with pytest.raises(ValueError, match="max_len must be an integer >= 1"):
        greedy_search(tree_step({}), 1, BOS, EOS, 0)


def test_translate_texts_and_long_sources():
    from fastformer.data.tokenizer import WordTokenizer
    from fastformer.generation.search import translate

    tok = WordTokenizer.build(["a b c d e f g h i"])  # 13 ids, like the model's source vocabulary
    model = small_model()
    src, mask = sources()
    src = np.maximum(src, 4)  # ids 4..12 are the words a..i
    texts = [" ".join(tok.words[i - 4] for i in row[m == 1]) for row, m in zip(src, mask)]
    expected, _ = greedy_decode(model, src, mask, BOS, EOS)
    out_tok = WordTokenizer([f"w{i}" for i in range(7)])  # 11 ids, the target vocabulary
    assert translate(model, texts, tok, out_tok) == [out_tok.decode(e) for e in expected]
    long = "a b c d e f g"  # 7 tokens > max_src_len=6
    with pytest.raises(ValueError, match="source 0 has 7 tokens, more than the model's max_src_len=6"):
        translate(model, [long], tok, out_tok)
    assert translate(model, [long], tok, out_tok, truncate=True) == translate(model, ["a b c d e f"], tok, out_tok)
    assert len(translate(model, texts, tok, out_tok, beam_size=3)) == len(texts)
