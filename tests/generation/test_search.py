"""Greedy and beam-search decoding: the cached decoder against full forward passes, beam size 1
against greedy, wide beams against exhaustive search, and a case where greedy is myopic."""

import dataclasses
import itertools

import numpy as np
import pytest

from fastformer.generation.sampling import sample_decode
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


@pytest.mark.parametrize("kw", [dict(), dict(positions="sinusoidal", norm_first=False)])
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
    state = model.init_state(src, mask)
    last = model.step(tgt[:, :3], state, last=True)  # the prefix's last position alone
    assert last.shape == (5, 1, full.shape[2]) and state.length == 3
    np.testing.assert_allclose(last[:, 0], full[:, 2], atol=1e-12)


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
    beam, _ = beam_decode(model, src, mask, beam_size=3, bos_id=BOS, eos_id=EOS)
    assert translate(model, texts, tok, out_tok, beam_size=3) == [out_tok.decode(e) for e in beam]
    sampled, _ = sample_decode(model, src, mask, BOS, EOS, temperature=2.0, seed=4)
    assert translate(model, texts, tok, out_tok, temperature=2.0, seed=4) == [out_tok.decode(e) for e in sampled]


# ------------------------------------------------ beam search of the language model
def small_lm(V=5, seed=0, Tmax=12):
    from fastformer import LMConfig, TransformerLM

    m = TransformerLM(LMConfig(vocab_size=V, max_seq_len=Tmax, d_model=16, n_heads=2, d_ff=24, n_layers=2),
                      seed=seed, dtype=np.float64)
    m.flat.data[:] = np.random.default_rng(seed).normal(0, 0.5, m.flat.size)  # sharper than the init
    return m


def test_lm_beam_size_one_equals_greedy():
    from fastformer.generation.search import beam_generate

    model = small_lm()
    prompts = [np.array([1, 2, 3]), np.array([4]), np.array([0, 1])]
    assert all(np.array_equal(b, g) for b, g in zip(beam_generate(model, prompts, 6, 1), model.generate(prompts, 6)))
    eos = int(model.generate(np.array([1, 2, 3]), 6)[5])  # greedy's third token
    for p in prompts:
        np.testing.assert_array_equal(model.generate(p, 6, beam_size=1, eos_id=eos), model.generate(p, 6, eos_id=eos))
        np.testing.assert_array_equal(beam_generate(model, p, 6, 1, eos_id=eos), model.generate(p, 6, eos_id=eos))


def test_lm_wide_beam_finds_the_exhaustive_best():
    """With V ** n beams, beam search (no length penalty, no <eos>) finds the most probable
    continuation of n tokens, checked against every continuation's full-forward log-prob."""
    V, n = 4, 3
    model = small_lm(V=V, seed=2)
    prompt = np.array([1, 3])
    best = model.generate(prompt, n, beam_size=V ** n, length_penalty=0.0)
    scores = {}
    for body in itertools.product(range(V), repeat=n):
        seq = np.concatenate([prompt, body])
        logp = log_softmax(model.forward(seq[:-1]))  # (T, V)
        scores[body] = sum(logp[len(prompt) - 1 + i, t] for i, t in enumerate(body))
    assert tuple(best[len(prompt):].tolist()) == max(scores, key=scores.get)
    greedy = tuple(model.generate(prompt, n)[len(prompt):].tolist())
    assert scores[tuple(best[len(prompt):].tolist())] >= scores[greedy]


def test_lm_beam_rows_alone_equal_rows_in_a_batch_and_cached_equals_uncached():
    model = small_lm(V=7, seed=4)
    eos = 5
    prompts = [np.array([1, 2, 3, 4]), np.array([6]), np.array([2, 0])]
    batch = model.generate(prompts, 14, beam_size=3, eos_id=eos)  # 4 + 14 > 12: past the context window
    for p, out in zip(prompts, batch):
        np.testing.assert_array_equal(out, model.generate(p, 14, beam_size=3, eos_id=eos))
        np.testing.assert_array_equal(out[:p.size], p)
    uncached = model.generate(prompts, 14, beam_size=3, eos_id=eos, use_cache=False)
    assert all(np.array_equal(a, b) for a, b in zip(batch, uncached))
    with pytest.raises(ValueError, match="beam search is deterministic"):
        model.generate(prompts[0], 3, beam_size=2, temperature=1.0)


# ------------------------------------------------- sampling of the encoder-decoder
def test_seq2seq_sampling_is_seeded_and_top_k_one_is_greedy():
    from fastformer.generation.sampling import sample_decode

    model = small_model()
    src, mask = sources()
    stop_sometimes(model, src, mask)
    greedy, g_scores = greedy_decode(model, src, mask, BOS, EOS)
    top1, t_scores = sample_decode(model, src, mask, BOS, EOS, temperature=2.0, top_k=1, seed=0)
    assert top1 == greedy
    np.testing.assert_allclose(t_scores, g_scores, rtol=1e-12)  # scores are the model's log-probs
    a, a_scores = sample_decode(model, src, mask, BOS, EOS, temperature=3.0, seed=1)
    assert (a, a_scores.tolist()) == (lambda r: (r[0], r[1].tolist()))(sample_decode(model, src, mask, BOS, EOS,
                                                                                      temperature=3.0, seed=1))
    assert a != greedy  # at temperature 3 some row leaves the greedy path
    for b, seq in enumerate(a):  # each score is the summed log-prob of the drawn tokens, <eos> included
        nxt = seq + ([EOS] if len(seq) < model.config.max_tgt_len else [])
        tgt_in = np.array([[BOS] + seq])[:, :model.config.max_tgt_len]
        logp = log_softmax(model.forward(src[b:b + 1], mask[b:b + 1], tgt_in, None))[0]
        assert a_scores[b] == pytest.approx(sum(logp[i, t] for i, t in enumerate(nxt)), rel=1e-9)
    # greedy decoding through the same loop: a source alone decodes as it does in a batch
    for b in range(len(src)):
        assert sample_decode(model, src[b:b + 1], mask[b:b + 1], BOS, EOS, temperature=1.0, top_k=1)[0] == top1[b:b + 1]


# ------------------------------------- a vocabulary padded past the tokenizer's ids
def cut_vocabulary(model, names, limit):
    """A copy of `model` whose vocabulary is its first `limit` ids (the rows `names` cut)."""
    config = dataclasses.replace(model.config, **{
        ("tgt_vocab_size" if hasattr(model.config, "tgt_vocab_size") else "vocab_size"): limit})
    cut = type(model)(config, dtype=np.float64)
    sd = {k: (v[:limit] if k in names else v) for k, v in model.state_dict().items()}
    cut.load_state_dict(sd)
    return cut


def test_lm_beam_search_picks_only_ids_below_the_limit():
    """The padding ids (the model's best choices) are never picked; the search is the one over the
    model cut to the tokenizer's ids, hypothesis for hypothesis."""
    from fastformer import LMConfig, TransformerLM

    V, limit, eos = 9, 6, 4
    model = TransformerLM(LMConfig(vocab_size=V, max_seq_len=12, d_model=16, n_heads=2, d_ff=24, n_layers=2,
                                   tie_embeddings=False), dtype=np.float64)
    model.flat.data[:] = np.random.default_rng(3).normal(0, 0.5, model.flat.size)
    model.params["lm_head.weight"][limit:] *= 8  # the padding rows win most steps
    prompts = [np.array([1, 2, 3]), np.array([5]), np.array([0, 4])]
    assert any((p[len(q):] >= limit).any() for p, q in zip(model.generate(prompts, 6, beam_size=3), prompts))
    cut = cut_vocabulary(model, ("transformer.wte.weight", "lm_head.weight"), limit)
    for kw in (dict(), dict(eos_id=eos)):
        got = model.generate(prompts, 6, beam_size=3, id_limit=limit, **kw)
        want = cut.generate(prompts, 6, beam_size=3, **kw)
        assert all(np.array_equal(g, w) for g, w in zip(got, want))
        assert all((g < limit).all() for g in got)
    with pytest.raises(ValueError, match=f"id_limit must be an integer in \\[1, {V}\\], got {V + 1}"):
        model.generate(prompts, 2, beam_size=2, id_limit=V + 1)


def test_seq2seq_search_and_translate_pick_only_the_target_tokenizers_ids():
    from fastformer.data.tokenizer import WordTokenizer
    from fastformer.generation.search import translate

    limit = 11
    model = small_model(V=15, seed=1)
    model.params["lm_head.weight"][limit:] *= 8
    src, mask = sources()
    src = np.maximum(src, 4)
    assert any(max(s, default=0) >= limit for s in beam_decode(model, src, mask, beam_size=3)[0])
    cut = cut_vocabulary(model, ("tgt_embed.weight", "lm_head.weight"), limit)
    for ours, theirs in ((beam_decode(model, src, mask, beam_size=3, id_limit=limit), beam_decode(cut, src, mask,
                                                                                                 beam_size=3)),
                         (greedy_decode(model, src, mask, id_limit=limit), greedy_decode(cut, src, mask))):
        assert ours[0] == theirs[0] and np.allclose(ours[1], theirs[1])
    tok = WordTokenizer.build(["a b c d e f g h i"])
    texts = [" ".join(tok.words[i - 4] for i in row[m == 1]) for row, m in zip(src, mask)]
    out_tok = WordTokenizer([f"w{i}" for i in range(7)])  # 11 ids, the model has 15
    for kw in (dict(beam_size=3), dict(), dict(temperature=1.0, seed=0)):
        assert translate(model, texts, tok, out_tok, **kw) == translate(cut, texts, tok, out_tok, **kw)
