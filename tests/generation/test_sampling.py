"""Sampling: greedy, temperature, top-k (with ties), top-p, seeds, cropping and <eos>."""

import numpy as np
import pytest

from fastformer import FastformerError, LMConfig, TransformerLM
from fastformer.generation.sampling import cut_at_eos, sample_next
from fastformer.kernels.ops.sampling import filter_top_k, filter_top_p, next_token_probs

CFG = LMConfig(vocab_size=13, max_seq_len=8, d_model=16, n_heads=2, d_ff=32, n_layers=1)


@pytest.fixture(scope="module")
def model():
    m = TransformerLM(CFG, seed=3)
    m.flat.data[...] *= 40  # sharpen the random model so its choices depend on the context
    return m


def test_top_k_1_equals_greedy(model):
    prompt = np.array([1, 2, 3])
    greedy = model.generate(prompt, 12, temperature=0.0)
    for seed in range(3):
        assert np.array_equal(model.generate(prompt, 12, temperature=1.3, top_k=1, seed=seed), greedy)
    assert len(set(greedy[3:].tolist())) > 1  # the check is not vacuous: greedy output varies


def test_temperature_zero_is_deterministic_and_ignores_the_seed(model):
    prompt = np.array([[4, 5], [6, 7]])
    a = model.generate(prompt, 10, temperature=0.0, seed=1)
    b = model.generate(prompt, 10, temperature=0.0, seed=99)
    assert a.shape == (2, 12) and np.array_equal(a, b)
    assert np.array_equal(a[:, :2], prompt)


def test_seed_makes_sampling_reproducible(model):
    prompt = np.array([1])
    a = model.generate(prompt, 20, temperature=20.0, seed=5)
    assert np.array_equal(a, model.generate(prompt, 20, temperature=20.0, seed=5))
    assert any(not np.array_equal(a, model.generate(prompt, 20, temperature=20.0, seed=s)) for s in range(6, 10))


def test_top_k_keeps_ties_at_the_boundary():
    logits = np.array([[3.0, 1.0, 3.0, 0.0, 2.0]])
    assert np.isfinite(filter_top_k(logits, 1)).tolist() == [[True, False, True, False, False]]
    assert np.isfinite(filter_top_k(logits, 2)).tolist() == [[True, False, True, False, False]]
    assert np.isfinite(filter_top_k(logits, 3)).tolist() == [[True, False, True, False, True]]
    assert np.array_equal(filter_top_k(logits, 5), logits)
    rng = np.random.default_rng(0)
    draws = [int(sample_next(logits, 1.0, top_k=1, rng=rng)[0]) for _ in range(200)]
    assert set(draws) == {0, 2}  # both tied maxima are sampled, nothing else


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = np.array([[0.1, 0.4, 0.2, 0.3]])
    kept = lambda p: set(np.flatnonzero(filter_top_p(probs, p)[0]).tolist())  # noqa: E731
    assert kept(0.4) == {1}  # 0.4 alone reaches 0.4
    assert kept(0.41) == {1, 3}
    assert kept(0.7) == {1, 3}  # 0.4 + 0.3 reaches 0.7 exactly
    assert kept(0.71) == {1, 3, 2}
    assert kept(1.0) == {0, 1, 2, 3}
    np.testing.assert_allclose(filter_top_p(probs, 0.7), [[0, 0.4 / 0.7, 0, 0.3 / 0.7]])
    with pytest.raises(ValueError, match=r"top_p must be a number in \(0, 1\]"):
        filter_top_p(probs, 0.0)


def test_sampling_follows_the_distribution():
    logits = np.log(np.array([[0.5, 0.0, 0.3, 0.2]]) + 1e-30)
    rng = np.random.default_rng(1)
    draws = np.array([sample_next(logits, 1.0, rng=rng)[0] for _ in range(4000)])
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq, [0.5, 0.0, 0.3, 0.2], atol=0.03)
    assert freq[1] == 0.0
    # temperature sharpens: probs ∝ p^(1/T)
    p = next_token_probs(logits, 0.5)[0]
    np.testing.assert_allclose(p, np.array([0.25, 0, 0.09, 0.04]) / 0.38, rtol=1e-6, atol=1e-12)


def test_long_prompt_is_cropped_to_the_context(model):
    long_prompt = np.arange(20) % CFG.vocab_size
    out = model.generate(long_prompt, 5, temperature=0.0)
    assert out.shape == (25,) and np.array_equal(out[:20], long_prompt)
    cropped = model.generate(long_prompt[-CFG.max_seq_len:], 5, temperature=0.0)
    assert np.array_equal(out[20:], cropped[CFG.max_seq_len:])


def test_stops_at_eos(model):
    prompt = np.array([1, 2, 3])
    greedy = model.generate(prompt, 10, temperature=0.0)
    eos = int(greedy[5])  # the third generated token
    out = model.generate(prompt, 10, temperature=0.0, eos_id=eos)
    first = int(np.flatnonzero(greedy[3:] == eos)[0]) + 3
    assert np.array_equal(out, greedy[:first + 1]) and out[-1] == eos


def test_cut_at_eos():
    row = np.array([5, 2, 7, 2, 9])
    assert cut_at_eos(row, 2).tolist() == [5]
    assert cut_at_eos(row, 2, keep=True).tolist() == [5, 2]  # the first <eos> only, kept
    assert cut_at_eos(row, 4).tolist() == row.tolist() and cut_at_eos(row, None).tolist() == row.tolist()
    assert cut_at_eos(np.array([2, 5]), 2).tolist() == []


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        model.generate(np.array([], dtype=np.int64), 3)
    with pytest.raises(ValueError, match="top_k must be an integer >= 1"):
        model.generate(np.array([1]), 3, temperature=1.0, top_k=0)
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        model.generate(np.array([1]), 3, temperature=-1.0)
    with pytest.raises(ValueError, match="ids must lie in"):
        model.generate(np.array([CFG.vocab_size]), 3)


@pytest.mark.parametrize("where", [0, 3, 4])
def test_greedy_stops_at_a_nan_logit_wherever_it_lies(where):
    """Greedy picks by argmax alone; a NaN anywhere in any row still stops the generation by
    name, as it does when sampling."""
    from fastformer.errors import FastformerError
    from fastformer.generation.sampling import sample_tokens

    def step(ids):
        logits = np.tile(np.arange(5.0), (2, 1))  # the largest logit is the last one
        logits[1, where] = np.nan
        return logits

    steps = sample_tokens(step, np.zeros((2, 5)), 3)
    assert next(steps).tolist() == [0, 0]
    with pytest.raises(FastformerError, match="logits became NaN at new token 2"):
        next(steps)


def test_greedy_steps_chunks_are_yielded_one_by_one_and_a_nan_among_them_is_refused():
    from fastformer.generation.sampling import sample_tokens

    logits = np.array([[0.0, 1.0, 0.0]])
    calls = []

    def greedy_steps(ids, n, done):  # makes 2 tokens a call (fast: the chunks grow); the third call's last is NaN
        calls.append((ids.tolist(), n))
        return np.array([[len(calls), 2]]), len(calls) == 3

    def step(ids):
        raise AssertionError("the steps all ran through greedy_steps")

    gen = sample_tokens(step, logits, 7, greedy_steps=greedy_steps)
    got = [int(next(gen)[0]) for _ in range(6)]
    assert got == [1, 1, 2, 2, 2, 3]
    assert calls == [([1], 1), ([2], 4), ([2], 2)]  # one token first, then as many as GREEDY_SECONDS allow
    with pytest.raises(FastformerError, match="became NaN at new token 7"):
        next(gen)


@pytest.mark.parametrize("pace, first", [(1e-6, 6), (10.0, 1)])
def test_the_first_greedy_chunk_is_sized_by_the_pace_given(pace, first):
    """A token costs no more than the prompt before it: `pace` (the prompt's seconds) sizes the
    first chunk, up to the tokens left (6 after the prompt's), down to one token."""
    from fastformer.generation.sampling import sample_tokens

    calls = []

    def greedy_steps(ids, n, done):
        calls.append(n)
        return np.full((1, n), 2), False

    got = list(sample_tokens(None, np.array([[0.0, 1.0, 0.0]]), 7, greedy_steps=greedy_steps, pace=pace))
    assert len(got) == 7 and calls[0] == first and sum(calls) == 6


@pytest.mark.parametrize("seconds, first", [(0.02, 2), (0.25, 25)])
def test_a_greedy_chunk_lasts_about_the_seconds_given(seconds, first):
    """At 0.01 s a token (the prompt's pace), a chunk of GREEDY_SECONDS makes 2 tokens, one of
    GENERATE_SECONDS 25."""
    from fastformer.generation.sampling import GENERATE_SECONDS, GREEDY_SECONDS, sample_blocks

    assert (GREEDY_SECONDS, GENERATE_SECONDS) == (0.02, 0.25)
    calls = []

    def greedy_steps(ids, n, done):
        calls.append(n)
        return np.full((1, n), 2), False

    blocks = list(sample_blocks(None, np.array([[0.0, 1.0, 0.0]]), 40, greedy_steps=greedy_steps, pace=0.01,
                                seconds=seconds))
    assert calls[0] == first and sum(b.shape[1] for b in blocks) == 40


def test_generate_sizes_its_greedy_calls_by_generate_seconds(monkeypatch):
    """generate hands out nothing before the end: its greedy_steps calls (the fused kernel's) last
    up to GENERATE_SECONDS at the prompt's pace, so a long bound makes the tokens after the
    prompt's argmax one call and a tiny one a call a token, the same tokens either way."""
    from fastformer import use_backend
    from fastformer.generation import sampling

    m = TransformerLM(LMConfig(vocab_size=13, max_seq_len=64, d_model=16, n_heads=2, d_ff=32, n_layers=1), seed=3)
    calls = []
    greedy_steps = m.greedy_steps

    def counted(ids, state, n, done=None, eos_id=None):
        calls.append(n)
        return greedy_steps(ids, state, n, done, eos_id)

    monkeypatch.setattr(m, "greedy_steps", counted)
    out = {}
    with use_backend("numba"):
        for seconds in (30.0, 1e-9):
            monkeypatch.setattr(sampling, "GENERATE_SECONDS", seconds)
            calls.clear()
            out[seconds] = m.generate(np.array([1, 2, 3]), 40, temperature=0.0)
            assert calls == ([39] if seconds > 1 else [1] * 39)  # the first token is the prompt's argmax
    assert np.array_equal(out[30.0], out[1e-9])


def test_an_empty_greedy_chunk_falls_back_to_the_step():
    from fastformer.generation.sampling import sample_tokens

    logits = np.array([[0.0, 1.0, 0.0]])
    steps = []

    def step(ids):
        steps.append(ids.tolist())
        return np.array([[0.0, 0.0, 1.0]])

    def greedy_steps(ids, n, done):  # makes no token: the loop must step instead, not ask again for ever
        return np.zeros((1, 0), np.int64), False

    got = [int(t[0]) for t in sample_tokens(step, logits, 3, greedy_steps=greedy_steps)]
    assert got == [1, 2, 2] and steps == [[1], [2]]


def test_sample_blocks_hands_out_a_greedy_chunk_whole_and_the_tokens_before_a_nan():
    """generate keeps blocks: a greedy_steps chunk is one block, a step's token a block of one
    column; their columns are sample_tokens' tokens, and a NaN's chunk gives its tokens before
    the NaN, then the refusal."""
    from fastformer.generation.sampling import sample_blocks, sample_tokens

    def make(nan_on_call):
        calls = []

        def greedy_steps(ids, n, done):
            calls.append(n)
            return np.arange(10, 10 + n)[None] % 3, len(calls) == nan_on_call
        return greedy_steps

    logits = np.array([[0.0, 1.0, 0.0]])
    blocks = list(sample_blocks(None, logits, 7, greedy_steps=make(0), pace=1e-6))
    assert [b.shape for b in blocks] == [(1, 1), (1, 6)]  # the prompt's token, then one chunk of the rest
    tokens = list(sample_tokens(None, logits, 7, greedy_steps=make(0), pace=1e-6))
    assert np.concatenate(blocks, axis=1)[0].tolist() == [int(t[0]) for t in tokens]
    got = sample_blocks(None, logits, 7, greedy_steps=make(1), pace=1e-6)
    assert next(got).tolist() == [[1]]
    assert next(got).tolist() == [[1, 2, 0, 1, 2]]  # the chunk's first five of six
    with pytest.raises(FastformerError, match="became NaN at new token 7"):
        next(got)
