"""Decoding with a key/value cache: the same logits and tokens as full forwards, on both backends."""

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastformer import FastformerError, LMConfig, TransformerLM
from fastformer.generation.sampling import apply_repetition_penalty

CFG = LMConfig(vocab_size=50, max_seq_len=24, d_model=32, n_heads=4, d_ff=64, n_layers=2)


@pytest.fixture(params=["learned", "sinusoidal"])
def model(backend, request):
    """The decoding tests' model, with learned positions (the fused one-token kernel) and with
    sinusoidal ones (one token through the composed forward)."""
    m = TransformerLM(dataclasses.replace(CFG, positions=request.param), seed=0)
    # larger weights than the init, so greedy paths are not all one token
    m.flat.data[:] = np.random.default_rng(0).normal(0, 0.3, m.flat.size).astype(np.float32)
    return m


def test_decode_step_by_step_matches_forward(model):
    ids = np.random.default_rng(1).integers(0, 50, size=(3, 10))
    full = model.forward(ids)
    cache = model.init_state(3)
    parts = [model.step(ids[:, :4], cache)] + [model.step(ids[:, t:t + 1], cache) for t in range(4, 10)]
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, rtol=1e-4, atol=1e-4)
    assert cache.length == 10 and cache.next_position.tolist() == [10, 10, 10]


def test_many_rows_decode_through_the_composed_forward_alike(model, monkeypatch):
    """Past FUSED_DECODE_MAX_ROWS rows a one-token step takes the composed forward: the same
    logits as the fused kernel's."""
    from fastformer.models import lm

    ids = np.random.default_rng(2).integers(0, 50, size=(3, 8))
    runs = []
    for max_rows in (lm.FUSED_DECODE_MAX_ROWS, 2):  # 3 rows: fused, then composed
        monkeypatch.setattr(lm, "FUSED_DECODE_MAX_ROWS", max_rows)
        cache = model.init_state(3)
        runs.append([model.step(ids[:, :4], cache)] + [model.step(ids[:, t:t + 1], cache) for t in range(4, 8)])
    for a, b in zip(*runs):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_step_past_the_context_window_runs_the_last_window(model):
    """Once the cache is full, a step is a forward over the last max_seq_len tokens."""
    ids = np.random.default_rng(5).integers(0, 50, size=(2, 30))
    cache = model.init_state(2)
    model.step(ids[:, :20], cache)
    for t in range(20, 30):
        got = model.step(ids[:, t:t + 1], cache)[:, 0]
        window = ids[:, max(0, t + 1 - 24):t + 1]
        np.testing.assert_allclose(got, model.forward(window)[:, -1], rtol=1e-4, atol=1e-4)
    assert cache.length == 24


def test_reorder_moves_rows_of_the_cache(model):
    ids = np.random.default_rng(6).integers(0, 50, size=(3, 5))
    cache = model.init_state(3)
    model.step(ids, cache)
    cache.reorder(np.array([2, 2, 0]))
    nxt = np.array([[4], [4], [4]])
    got = model.step(nxt, cache)[:, 0]
    want = model.forward(np.concatenate([ids[[2, 2, 0]], nxt], axis=1))[:, -1]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("max_new", [8, 30])  # 30 runs past the 24-token context window
def test_cached_greedy_equals_uncached(model, max_new):
    prompt = np.random.default_rng(2).integers(0, 50, size=(2, 6))
    cached = model.generate(prompt, max_new)
    uncached = model.generate(prompt, max_new, use_cache=False)
    np.testing.assert_array_equal(cached, uncached)
    assert cached.shape == (2, 6 + max_new)


def test_prompts_of_different_lengths_generate_as_if_alone(model):
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 50, size=n) for n in (3, 9, 1)]
    batch = model.generate(prompts, 12)
    assert isinstance(batch, list) and len(batch) == 3
    for p, out in zip(prompts, batch):
        alone = model.generate(p, 12)
        np.testing.assert_array_equal(out, alone)
        np.testing.assert_array_equal(out[:p.size], p)
    np.testing.assert_array_equal(batch[0], model.generate(prompts, 12, use_cache=False)[0])


def test_left_padded_array_with_mask_equals_list(model):
    prompts = [np.array([5, 6, 7]), np.array([1, 2, 3, 4, 8])]
    ids = np.array([[0, 0, 5, 6, 7], [1, 2, 3, 4, 8]])
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    out = model.generate(ids, 6, attention_mask=mask)
    lst = model.generate(prompts, 6)
    np.testing.assert_array_equal(out[0, 2:], lst[0])
    np.testing.assert_array_equal(out[1], lst[1])


def test_sampling_with_cache_is_seeded_and_equals_uncached(model):
    prompt = np.array([1, 2, 3])
    a = model.generate(prompt, 15, temperature=0.9, top_k=10, top_p=0.9, seed=7)
    b = model.generate(prompt, 15, temperature=0.9, top_k=10, top_p=0.9, seed=7, use_cache=False)
    np.testing.assert_array_equal(a, b)


def test_eos_stops_rows(model):
    prompt = np.array([[1, 2], [3, 4]])
    free = model.generate(prompt, 10)
    eos = int(free[0, 4])  # the third generated token of row 0
    out = model.generate(prompt, 10, eos_id=eos)
    row0 = out[0, 2:]
    first = int(np.argmax(row0 == eos))
    assert (row0[first:] == eos).all()


def test_repetition_penalty(model):
    logits = np.array([[2.0, -1.0, 0.5]])
    seen = np.array([[True, True, False]])
    np.testing.assert_allclose(apply_repetition_penalty(logits, seen, 2.0), [[1.0, -2.0, 0.5]])
    out = model.generate(np.array([1]), 20, repetition_penalty=1e9)
    assert len(set(out.tolist())) == out.size  # no id appears twice


def test_decode_errors(model):
    cache = model.init_state(2)
    with pytest.raises(FastformerError, match=r"state's batch size 2 and T >= 1, got \(1, 2\)"):
        model.step(np.array([[1, 2]]), cache)
    with pytest.raises(FastformerError, match=r"tokens must lie in \[0, vocab_size=50\), got 50"):
        model.step(np.array([[1], [50]]), cache)
    with pytest.raises(FastformerError, match=r"tokens must have shape \(B, T\)"):
        model.step(np.array([1, 2]), cache)
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        model.generate(np.array([], np.int64), 3)
    with pytest.raises(ValueError, match="left padding"):
        model.generate(np.array([[1, 2]]), 3, attention_mask=np.array([[1, 0]]))
    with pytest.raises(ValueError, match="position_ids must lie in"):
        model.forward(np.array([[1, 2]]), position_ids=np.array([[0, 24]]))


def test_attention_cached_kernel_matches_reference(fast_ops, ref):
    rng = np.random.default_rng(4)
    B, H, hs, Tmax, start, T = 2, 3, 4, 10, 5, 2
    qkv = rng.normal(size=(B, T, 3 * H * hs)).astype(np.float32)
    kc = rng.normal(size=(B, H, Tmax, hs)).astype(np.float32)
    vc = rng.normal(size=(B, H, Tmax, hs)).astype(np.float32)
    kpm = np.zeros((B, Tmax), bool)
    kpm[1, :3] = True
    kc2, vc2 = kc.copy(), vc.copy()
    out = fast_ops.attention_cached(qkv, kc, vc, start, H, kpm)
    expect = ref.attention_cached(qkv, kc2, vc2, start, H, kpm)
    np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(kc, kc2)
    np.testing.assert_array_equal(vc, vc2)



@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 2e-5)])
@pytest.mark.parametrize("tied", [True, False])
def test_gpt2_decode_step_matches_reference_and_forward(ops, ref, dtype, tol, tied):
    """The fused one-token step against the reference and against a full forward, with a
    left-padded row and a row whose every key so far is padding (its attention output is 0)."""
    cfg = LMConfig(vocab_size=37, max_seq_len=12, d_model=12, n_heads=3, d_ff=20, n_layers=2, tie_embeddings=tied)
    m = TransformerLM(cfg, seed=1, dtype=dtype)
    m.flat.data[:] = np.random.default_rng(5).normal(0, 0.4, m.flat.size)
    rng = np.random.default_rng(6)
    B, start = 3, 5
    cache = m.init_state(B)
    cache.k[...] = rng.normal(size=cache.k.shape)
    cache.v[...] = rng.normal(size=cache.v.shape)
    cache.padding[1, :2] = True
    cache.padding[2, :start + 1] = True
    ids, pos = np.array([3, 36, 0]), np.array([5, 3, 11])
    k2, v2, before = cache.k.copy(), cache.v.copy(), cache.k.copy()
    got = ops.gpt2_decode_step(m.packed_weights(), ids, pos, cache.k, cache.v, cache.padding, start)
    want = ref.gpt2_decode_step(m.packed_weights(), ids, pos, k2, v2, cache.padding, start)
    assert got.shape == (B, 37) and got.dtype == dtype
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    np.testing.assert_allclose(cache.k, k2, rtol=tol, atol=tol)  # the new keys and values, written at `start`
    np.testing.assert_allclose(cache.v, v2, rtol=tol, atol=tol)
    others = np.arange(cfg.max_seq_len) != start
    np.testing.assert_array_equal(cache.k[:, :, :, others], before[:, :, :, others])  # only `start` is written
    assert not np.allclose(cache.k[:, :, :, start], before[:, :, :, start])

    # row 0 from scratch: a prompt of 5 tokens, then the fused step, equals a full forward
    seq = np.array([[7, 1, 30, 2, 9, 3]])
    c0 = m.init_state(1)
    m.step(seq[:, :5], c0)
    step = m.step(seq[:, 5:], c0)[:, 0]
    np.testing.assert_allclose(step, m.forward(seq)[:, 5], rtol=10 * tol, atol=10 * tol)



@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(B=st.integers(1, 3), H=st.integers(1, 3), hs=st.integers(1, 5), F=st.integers(1, 9), L=st.integers(1, 2),
       V=st.integers(1, 11), start=st.integers(0, 6), pad=st.sampled_from(["none", "random", "all"]),
       tied=st.booleans(), seed=st.integers(0, 2 ** 16), dtype=st.sampled_from([np.float64, np.float32]))
def test_gpt2_decode_step_property(fast_ops, ref, B, H, hs, F, L, V, start, pad, tied, seed, dtype):
    """Odd sizes, a head size of 1, the first position, padding nowhere, somewhere or everywhere."""
    cfg = LMConfig(vocab_size=V, max_seq_len=7, d_model=H * hs, n_heads=H, d_ff=F, n_layers=L, tie_embeddings=tied)
    m = TransformerLM(cfg, seed=seed, dtype=dtype)
    rng = np.random.default_rng(seed)
    m.flat.data[:] = rng.normal(0, 0.5, m.flat.size)
    cache = m.init_state(B)
    cache.k[...] = rng.normal(size=cache.k.shape)
    cache.v[...] = rng.normal(size=cache.v.shape)
    if pad != "none":
        cache.padding[...] = rng.random(cache.padding.shape) < 0.5 if pad == "random" else True
    ids, pos = rng.integers(0, V, B), rng.integers(0, 7, B)
    k2, v2 = cache.k.copy(), cache.v.copy()
    got = fast_ops.gpt2_decode_step(m.packed_weights(), ids, pos, cache.k, cache.v, cache.padding, start)
    want = ref.gpt2_decode_step(m.packed_weights(), ids, pos, k2, v2, cache.padding, start)
    tol = 1e-12 if dtype == np.float64 else 3e-5
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    np.testing.assert_allclose(cache.v, v2, rtol=tol, atol=tol)

@pytest.mark.parametrize("weights", ["fp32", "int8"])
def test_fused_step_of_many_rows_in_two_halves_gives_the_same_bits(fast_ops, monkeypatch, weights):
    """Rows from DECODE_SPLIT_ROWS on run as two halves side by side on the task pool: every
    logit and every cache entry equal those of one call over all the rows."""
    from fastformer.kernels.ops import gpt2_decode, quantized
    from fastformer.kernels.tasks import task_threads

    if task_threads() < 2:
        pytest.skip("one thread: the step never splits")
    if weights != "fp32" and not quantized.format_runs_natively(weights):
        pytest.skip(f"{weights} weights do not run natively on this CPU")
    m = TransformerLM(CFG, seed=3)
    m.flat.data[:] = np.random.default_rng(1).normal(0, 0.3, m.flat.size).astype(np.float32)
    m.quantize(weights)
    B, start = 5, 4
    states, run_tasks = [], gpt2_decode.run_tasks
    for split_from in (B + 1, 2):  # one call, then two halves (2 and 3 rows)
        monkeypatch.setattr(gpt2_decode, "DECODE_SPLIT_ROWS", split_from)
        cache = m.init_state(B)
        cache.k[...] = np.random.default_rng(3).normal(size=cache.k.shape)
        cache.v[...] = np.random.default_rng(4).normal(size=cache.v.shape)
        cache.padding[1, :2] = True
        calls = []
        monkeypatch.setattr(gpt2_decode, "run_tasks", lambda tasks: calls.append(len(tasks)) or run_tasks(tasks))
        logits = fast_ops.gpt2_decode_step(m.packed_weights(), np.arange(B) * 7 % 50, np.full(B, start), cache.k,
                                           cache.v, cache.padding, start)
        states.append((calls, logits, cache.k.copy(), cache.v.copy()))
    (one, *a), (two, *b) = states
    assert one == [1] and two == [2]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_gpt2_decode_step_refuses_bad_input(ops):
    m = TransformerLM(CFG, seed=0)
    cache = m.init_state(1)
    w = m.packed_weights()
    args = (np.array([1]), np.array([0]), cache.k, cache.v, cache.padding, 0)
    with pytest.raises(ValueError, match="offsets must hold .* inside weights.flat"):
        ops.gpt2_decode_step(w._replace(offsets=w.offsets + m.flat.size), *args)
    with pytest.raises(ValueError, match="offsets must hold"):
        ops.gpt2_decode_step(w._replace(d_ff=10 ** 6), *args)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 50\)"):
        ops.gpt2_decode_step(w, np.array([50]), *args[1:])
    with pytest.raises(ValueError, match=r"positions in \[0, 24\)"):
        ops.gpt2_decode_step(w, np.array([1]), np.array([24]), *args[2:])
    with pytest.raises(ValueError, match="k_cache and v_cache must be contiguous float32"):
        ops.gpt2_decode_step(w, *args[:2], cache.k.astype(np.float64), *args[3:])
    with pytest.raises(ValueError, match=r"start must lie in \[0, 24\)"):
        ops.gpt2_decode_step(w, *args[:5], 24)

def test_stream_text_holds_back_partial_characters_and_stops():
    import io

    from fastformer.cli.generate import stream_text
    from fastformer.data.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    ids = tok.encode("héllo wörld. STOP here")

    class Recorder(io.StringIO):
        def __init__(self):
            super().__init__()
            self.pieces = []

        def write(self, s):
            self.pieces.append(s)
            return super().write(s)

    out = Recorder()
    text = stream_text(tok, iter(ids), out, stop=["STOP"])
    assert text == out.getvalue() == "héllo wörld. "
    assert all("\ufffd" not in p for p in out.pieces)  # never a half-decoded character
    assert len(out.pieces) > 5  # written as it formed, not at the end
    whole = io.StringIO()
    assert stream_text(tok, iter(ids), whole) == "héllo wörld. STOP here" == whole.getvalue()


@pytest.mark.parametrize("tied", [True, False])
def test_decode_layout_names_every_parameter_for_the_kernel_slots(tied):
    from fastformer.kernels.ops.gpt2_decode import LAYER_SLOTS, MODEL_SLOTS

    m = TransformerLM(LMConfig(vocab_size=11, max_seq_len=6, d_model=8, n_heads=2, d_ff=12, n_layers=3,
                               tie_embeddings=tied))
    names = m.decode_layout()
    assert len(names) == 3 * LAYER_SLOTS + MODEL_SLOTS
    assert set(names) == set(m.state_dict()) and len(set(names)) == len(names) - tied  # a tied head is wte again
    offsets = m.packed_weights().offsets
    assert [m.flat.offsets[n] for n in names] == offsets.tolist()


def test_decode_path_names_each_way_a_step_runs(backend):
    from fastformer.kernels import get_ops
    from fastformer.models.lm import FUSED_DECODE_MAX_ROWS, FUSED_PROMPT_MAX_TOKENS

    m = TransformerLM(CFG, seed=0)
    state = m.init_state(2)
    # a short prompt whose last logits alone are wanted: one pass where the backend has one (Numba),
    # else the composed forward (the reference's prompt is a step per position)
    short = "prompt" if get_ops().prompt_in_one_pass else "composed"
    assert get_ops().prompt_in_one_pass == (backend == "numba")
    assert m.decode_path(2, 5, state) == "composed"  # a prompt, every position's logits
    assert m.decode_path(2, 5, state, last=True) == short  # only the last's
    limit = FUSED_PROMPT_MAX_TOKENS["fp32"]
    assert m.decode_path(limit // 4, 4, state, last=True) == short  # at the limit
    assert m.decode_path(limit // 4 + 1, 4, state, last=True) == "composed"  # past it
    m.step(np.ones((2, 5), np.int64), state)
    assert m.decode_path(2, 1, state) == "fused"
    assert m.decode_path(FUSED_DECODE_MAX_ROWS + 1, 1, state) == "composed"
    assert m.decode_path(2, CFG.max_seq_len - 4, state) == "window"  # 5 + 20 > 24
    assert m.decode_path(2, 1, m.init_state(2, use_cache=False)) == "uncached"
    sinusoidal = TransformerLM(dataclasses.replace(CFG, positions="sinusoidal"), seed=0)
    state = sinusoidal.init_state(1)
    sinusoidal.step(np.ones((1, 3), np.int64), state)
    assert sinusoidal.decode_path(1, 1, state) == "composed"  # the fused kernel reads wpe


def three_rows_after_prompt(m):
    """(state, first ids (3,), done (3,)) of three rows after a prompt of 4 (row 1 left-padded by
    2) run step by step, the first ids its argmax; row 2 is marked done."""
    prompt = np.array([[5, 6, 7, 8], [0, 0, 9, 10], [11, 12, 13, 14]])
    state = m.init_state(3)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(m, "greedy_steps", lambda *a, **k: None)
        logits = m.step(prompt, state, attention_mask=np.array([[1, 1, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1]]))
    return state, np.argmax(logits[:, -1], axis=-1), np.array([False, False, True])


def _greedy_case(ops_list, weights, dtype=np.float32, eos=None):
    """Each backend's gpt2_decode_greedy from one prompt's state: three rows, one left-padded, one
    already done; returns [(tokens, nan, done, k cache)] per backend."""
    cfg = dataclasses.replace(CFG, max_seq_len=40, tie_embeddings=False)
    m = TransformerLM(cfg, seed=2, dtype=dtype)
    m.flat.data[:] = np.random.default_rng(2).normal(0, 1.0, m.flat.size)  # greedy tokens that vary
    if weights != "fp32":
        m.quantize(weights)
    results = []
    for ops in ops_list:
        state, first, done = three_rows_after_prompt(m)
        tokens, nan = ops.gpt2_decode_greedy(m.packed_weights(), first, state.next_position, state.k, state.v,
                                             state.padding, state.length, 30, eos, done)
        results.append((tokens, nan, done, state.k.copy()))
    return results


@pytest.mark.parametrize("weights", ["fp32", "int8", "bf16"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gpt2_decode_greedy_matches_reference(fast_ops, ref, weights, dtype):
    """Every step in one kernel call makes the reference's tokens and cache, <eos> and done rows
    included."""
    from fastformer.kernels.ops import quantized

    if weights != "fp32" and (dtype == np.float64 or not quantized.format_runs_natively(weights)):
        pytest.skip(f"{weights} weights: float32 models on a CPU that runs them natively")
    (free, nan, _, _), = _greedy_case([ref], weights, dtype)  # one token repeated would prove little
    assert free.shape == (3, 30) and not nan and len(np.unique(free[0])) > 1
    f = int(np.argmax(free[0] != free[0, 0]))  # row 0's first change of token: its eos
    eos = int(free[0, f])
    for eos_id in (None, eos):
        (a, nan_a, done_a, k_a), (b, nan_b, done_b, k_b) = _greedy_case([fast_ops, ref], weights, dtype, eos_id)
        np.testing.assert_array_equal(a, b)
        assert nan_a == nan_b is False
        np.testing.assert_array_equal(done_a, done_b)
        # entries reach about 20: a near-zero one, summed in another order (the reference's BLAS
        # kernel, e.g. OpenBLAS's Haswell kernels under OPENBLAS_CORETYPE), moves by about 1e-5
        np.testing.assert_allclose(k_a, k_b, rtol=1e-4, atol=1e-4)
        if eos_id is not None:  # row 2 was done from the start, row 0 after its eos: they hold eos from then on
            assert (a[2] == eos).all() and (a[0, f:] == eos).all() and done_a[[0, 2]].all()
            np.testing.assert_array_equal(a[0, :f], free[0, :f])
        else:
            np.testing.assert_array_equal(a, free)


def test_gpt2_decode_greedy_stops_at_a_nan_and_refuses_what_does_not_fit(ops):
    m = TransformerLM(CFG, seed=0)
    state = m.init_state(2)
    m.flat.data[m.flat.offsets[m.decode_layout()[-1]]] = np.nan  # a row of the head (tied: of wte)
    w = m.packed_weights()
    tokens, nan = ops.gpt2_decode_greedy(w, np.array([1, 2]), np.array([0, 0]), state.k, state.v, state.padding, 0, 5)
    assert nan and tokens.shape == (2, 1)
    with pytest.raises(ValueError, match="pass the 24 positions of the cache: give at most 4 steps"):
        ops.gpt2_decode_greedy(w, np.array([1, 2]), np.array([20, 3]), state.k, state.v, state.padding, 20, 5)
    with pytest.raises(ValueError, match="the furthest row at position 21"):
        ops.gpt2_decode_greedy(w, np.array([1, 2]), np.array([21, 3]), state.k, state.v, state.padding, 20, 5)
    with pytest.raises(ValueError, match="eos_id must be"):  # an id the embedding has: done rows are fed it
        ops.gpt2_decode_greedy(w, np.array([1, 2]), np.array([0, 0]), state.k, state.v, state.padding, 0, 5, 50)
    with pytest.raises(ValueError, match="ids and positions must have shape"):
        ops.gpt2_decode_greedy(w, np.array([[1, 2]]), np.array([0, 0]), state.k, state.v, state.padding, 0, 5)
    with pytest.raises(ValueError, match="done must be a writeable bool array"):
        ops.gpt2_decode_greedy(w, np.array([1, 2]), np.array([0, 0]), state.k, state.v, state.padding, 0, 5,
                               done=np.zeros(3, bool))
    assert ops.gpt2_decode_greedy(w, np.array([1, 2]), np.array([0, 0]), state.k, state.v, state.padding, 0,
                                  0)[0].shape == (2, 0)


def test_generate_through_greedy_steps_equals_step_by_step(model, monkeypatch):
    """Greedy generation in chunks of kernel steps yields the tokens of one step at a time, past
    the context window (the steps stop at its edge, the window runs, the steps go on) and with
    <eos>; the cache holds the same tokens after."""
    prompt = np.array([[1, 2, 3, 4, 5], [7, 8, 9, 10, 11]])
    init_state, greedy_steps = TransformerLM.init_state, TransformerLM.greedy_steps
    states, chunks = [], []  # each run's state; the tokens each call of the chunked path made (None: declined)

    def keep_state(self, *a, **k):
        states.append(init_state(self, *a, **k))
        return states[-1]

    def spy(self, *a):
        made = greedy_steps(self, *a)
        chunks.append(None if made is None else made[0].shape[1])
        return made

    def run(chunked, eos_id=None):
        monkeypatch.setattr(TransformerLM, "greedy_steps", spy if chunked else lambda self, *a: None)
        out = model.generate(prompt, 40, eos_id=eos_id)
        return out, states[-1]

    monkeypatch.setattr(TransformerLM, "init_state", keep_state)
    (chunked, s1), (stepped, s2) = run(True), run(False)
    if model.config.positions == "learned":  # the fused step: chunks ran, and declined at the window's edge
        assert max(c or 0 for c in chunks) > 1 and None in chunks
    else:
        assert set(chunks) == {None}
    np.testing.assert_array_equal(chunked, stepped)
    assert s1.length == s2.length
    np.testing.assert_array_equal(s1.tokens[:, :s1.length], s2.tokens[:, :s2.length])
    eos = int(stepped[0, 9])
    np.testing.assert_array_equal(run(True, eos)[0], run(False, eos)[0])


def test_gpt2_decode_greedy_of_many_rows_matches_reference(fast_ops, ref):
    """From DECODE_SPLIT_ROWS rows the Numba op loops over its split step: the reference's tokens."""
    from fastformer.kernels.ops.gpt2_decode import DECODE_SPLIT_ROWS

    cfg = dataclasses.replace(CFG, tie_embeddings=False)
    m = TransformerLM(cfg, seed=4)
    m.flat.data[:] = np.random.default_rng(4).normal(0, 1.0, m.flat.size).astype(np.float32)
    B = DECODE_SPLIT_ROWS + 1
    got = []
    for ops in (fast_ops, ref):
        state = m.init_state(B)
        tokens, nan = ops.gpt2_decode_greedy(m.packed_weights(), np.arange(B) % 50, np.zeros(B, np.int64), state.k,
                                             state.v, state.padding, 0, 12)
        got.append(tokens)
    np.testing.assert_array_equal(*got)


def test_gpt2_decode_greedy_runs_its_kernel_for_float64_rows_the_step_would_not_split(fast_ops, ref, monkeypatch):
    """Only float32 steps split across the task pool: float64 rows from DECODE_SPLIT_ROWS on still
    take the one-call kernel, and make the reference's tokens."""
    from fastformer.kernels.ops import gpt2_decode

    m = TransformerLM(dataclasses.replace(CFG, tie_embeddings=False), seed=4, dtype=np.float64)
    m.flat.data[:] = np.random.default_rng(4).normal(0, 1.0, m.flat.size)
    B = gpt2_decode.DECODE_SPLIT_ROWS
    state = m.init_state(B)
    want = ref.gpt2_decode_greedy(m.packed_weights(), np.arange(B) % 50, np.zeros(B, np.int64), state.k, state.v,
                                  state.padding, 0, 6)[0]
    monkeypatch.setattr(gpt2_decode, "gpt2_decode_greedy", lambda *a, **k: pytest.fail("took the reference's loop"))
    state = m.init_state(B)
    got, nan = fast_ops.gpt2_decode_greedy(m.packed_weights(), np.arange(B) % 50, np.zeros(B, np.int64), state.k,
                                           state.v, state.padding, 0, 6)
    np.testing.assert_array_equal(got, want)


def _split_order(order):
    """A run_together that runs the parts one after the other, in `order` (part 0's result back)."""
    def run(fn, args, parts):
        results = {p: fn(*args, p, parts) for p in order(parts)}
        return results[0]
    return run


@pytest.mark.parametrize("weights", ["fp32", "int8", "bf16"])
def test_gpt2_decode_greedy_in_two_parts_makes_the_one_part_bits(fast_ops, weights, monkeypatch):
    """Two parts sharing each stage's chunks (_sync.py) make the one-part call's tokens, done rows
    and cache bit for bit: run side by side, and one after the other in either order (the first
    then does every chunk, the second finds none left)."""
    from fastformer.kernels import _sync
    from fastformer.kernels.ops import gpt2_decode, quantized

    if weights != "fp32" and not quantized.format_runs_natively(weights):
        pytest.skip(f"{weights} weights: a CPU that runs them natively")
    if not gpt2_decode.tiles_run():
        pytest.skip("the parts synchronise through compiled atomics")
    cfg = dataclasses.replace(CFG, d_model=128, n_heads=4, d_ff=512, vocab_size=300, max_seq_len=40,
                              tie_embeddings=False)  # products of several groups of columns: chunks to share
    m = TransformerLM(cfg, seed=5)
    m.flat.data[:] = np.random.default_rng(5).normal(0, 1.0, m.flat.size)
    if weights != "fp32":
        m.quantize(weights)

    def greedy(parts, run_together=None, eos=None):
        monkeypatch.setattr(gpt2_decode, "greedy_parts", lambda *a: parts)
        if run_together is not None:
            monkeypatch.setattr(gpt2_decode, "run_together", run_together)
        state = m.init_state(2)
        state.padding[:, :] = False
        done = np.array([False, True])
        tokens, nan = fast_ops.gpt2_decode_greedy(m.packed_weights(), np.array([3, 4]), np.array([0, 0]), state.k,
                                                  state.v, state.padding, 0, 24, eos, done)
        monkeypatch.setattr(gpt2_decode, "run_together", _sync.run_together)
        return tokens, nan, done, state.k, state.v

    one = greedy(1)
    assert len(np.unique(one[0][0])) > 1
    eos = int(one[0][0, 10])
    for eos_id in (None, eos):
        want = greedy(1, eos=eos_id)
        for run in (None, _split_order(lambda n: range(n)), _split_order(lambda n: reversed(range(n)))):
            got = greedy(2, run, eos_id)
            for a, b in zip(got, want):
                np.testing.assert_array_equal(a, b)


def _prompt_model(weights, dtype=np.float32):
    """A model whose products span several groups of columns (chunks for two parts to share)."""
    cfg = dataclasses.replace(CFG, d_model=128, n_heads=4, d_ff=512, vocab_size=300, max_seq_len=40,
                              tie_embeddings=False)
    m = TransformerLM(cfg, seed=6, dtype=dtype)
    m.flat.data[:] = np.random.default_rng(6).normal(0, 0.5, m.flat.size)
    return m.quantize(weights) if weights != "fp32" else m


def _prompt_case(m, ops, start=3, T=6):
    """ops.gpt2_decode_prompt of three rows (one left-padded) after `start` tokens already in the
    cache: (logits, k cache, v cache)."""
    rng = np.random.default_rng(7)
    state = m.init_state(3)
    if start:
        m.step(rng.integers(0, 300, (3, start)), state)
    mask = np.ones((3, T), np.int64)
    mask[1, :2] = 0
    ids = rng.integers(0, 300, (3, T))
    positions = state.next_position[:, None] + np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    state.padding[:, start:start + T] = mask == 0
    logits = ops.gpt2_decode_prompt(m.packed_weights(), ids, positions, state.k, state.v, state.padding, start)
    return logits, state.k, state.v


@pytest.mark.parametrize("weights", ["fp32", "int8", "bf16"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("start", [0, 3])  # 0: the padded row's first queries see no key at all
def test_gpt2_decode_prompt_matches_reference(fast_ops, ref, weights, dtype, start):
    """A prompt in one kernel call: the reference's last logits and every position's keys and
    values (the reference runs the prompt as one step per position)."""
    from fastformer.kernels.ops import quantized

    if weights != "fp32" and (dtype == np.float64 or not quantized.format_runs_natively(weights)):
        pytest.skip(f"{weights} weights: float32 models on a CPU that runs them natively")
    m = _prompt_model(weights, dtype)
    (a, ka, va), (b, kb, vb) = _prompt_case(m, fast_ops, start), _prompt_case(m, ref, start)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    # quantised: each side makes the activations in float32 in its own order (the reference's BLAS
    # kernels, e.g. OpenBLAS's Haswell ones under OPENBLAS_CORETYPE), so an activation within float32
    # rounding of a bf16 or int8 boundary may round the other way, and a unit of the format (2**-8 of
    # the value in bf16) moves what follows by about that much of one product
    scaled = 1e-2 if weights != "fp32" else tol
    np.testing.assert_allclose(a, b, rtol=tol, atol=scaled * np.abs(b).max())
    np.testing.assert_allclose(ka, kb, rtol=tol, atol=scaled * np.abs(kb).max() if weights != "fp32" else tol)
    np.testing.assert_allclose(va, vb, rtol=tol, atol=scaled * np.abs(vb).max() if weights != "fp32" else tol)


@pytest.mark.parametrize("weights", ["fp32", "int8"])
def test_gpt2_decode_prompt_in_two_parts_makes_the_one_part_bits(fast_ops, weights, monkeypatch):
    """As for the greedy steps: two parts, side by side or one after the other in either order,
    give the one-part logits and caches bit for bit."""
    from fastformer.kernels import _sync
    from fastformer.kernels.ops import gpt2_decode, quantized

    if weights != "fp32" and not quantized.format_runs_natively(weights):
        pytest.skip(f"{weights} weights: a CPU that runs them natively")
    if not gpt2_decode.tiles_run():
        pytest.skip("the parts synchronise through compiled atomics")
    m = _prompt_model(weights)

    def prompt(parts, run_together=_sync.run_together):
        monkeypatch.setattr(gpt2_decode, "greedy_parts", lambda *a: parts)
        monkeypatch.setattr(gpt2_decode, "run_together", run_together)
        return _prompt_case(m, fast_ops, start=0, T=9)

    want = prompt(1)
    for run in (_sync.run_together, _split_order(lambda n: range(n)), _split_order(lambda n: reversed(range(n)))):
        for a, b in zip(prompt(2, run), want):
            np.testing.assert_array_equal(a, b)


def test_a_prompt_whose_last_logits_alone_are_wanted_runs_fused_alike(model, monkeypatch):
    """step(last=True) runs a short prompt in one fused call (learned positions, on Numba): the composed
    forward's last logits and cache, and the same steps after it."""
    from fastformer.kernels import get_ops

    ops_type, calls = type(get_ops()), []
    prompt_op = ops_type.gpt2_decode_prompt
    monkeypatch.setattr(ops_type, "gpt2_decode_prompt", lambda *a: calls.append(1) or prompt_op(*a))
    ids = np.random.default_rng(8).integers(0, 50, size=(3, 7))
    mask = np.ones((3, 7), np.int64)
    mask[2, :3] = 0
    s1, s2 = model.init_state(3), model.init_state(3)
    last = model.step(ids, s1, attention_mask=mask, last=True)
    full = model.step(ids, s2, attention_mask=mask)
    one_pass = model.config.positions == "learned" and get_ops().prompt_in_one_pass
    assert len(calls) == one_pass
    assert last.shape == (3, 1, 50)
    np.testing.assert_allclose(last[:, 0], full[:, -1], rtol=1e-4, atol=1e-5)
    for k1, k2 in ((s1.k, s2.k), (s1.v, s2.v)):  # the real positions' keys and values: rows 0, 1 and 2 from 3
        np.testing.assert_allclose(k1[:, :2, :, :7], k2[:, :2, :, :7], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(k1[:, 2, :, 3:7], k2[:, 2, :, 3:7], rtol=1e-4, atol=1e-5)
    assert s1.length == s2.length == 7 and s1.next_position.tolist() == s2.next_position.tolist() == [7, 7, 4]
    nxt = np.array([[1], [2], [3]])
    np.testing.assert_allclose(model.step(nxt, s1), model.step(nxt, s2), rtol=1e-4, atol=1e-5)
    calls.clear()
    out = model.generate(ids[:1], 4)  # generate asks for the prompt's last logits alone
    assert len(calls) == one_pass
    np.testing.assert_array_equal(out, model.generate(ids[:1], 4, use_cache=False))


def test_last_logits_past_the_context_window_are_the_windows_last(model):
    """step(last=True) on the window path: the last column of the full step's logits."""
    ids = np.random.default_rng(9).integers(0, 50, size=(2, 20))
    s1, s2 = model.init_state(2), model.init_state(2)
    model.step(ids, s1), model.step(ids, s2)
    more = ids[:, :6]  # 20 + 6 > 24: the window runs
    assert model.decode_path(2, 6, s1, last=True) == "window"
    np.testing.assert_allclose(model.step(more, s1, last=True), model.step(more, s2)[:, -1:], rtol=1e-5, atol=1e-6)
    uncached = model.init_state(2, use_cache=False)
    model.step(ids, uncached)
    window = np.concatenate([ids, more], axis=1)[:, -CFG.max_seq_len:]
    np.testing.assert_allclose(model.step(more, uncached, last=True)[:, 0], model.forward(window)[:, -1], rtol=1e-4,
                               atol=1e-5)


def test_gpt2_decode_prompt_refuses_what_does_not_fit(ops):
    m = TransformerLM(CFG, seed=0)
    state = m.init_state(2)
    w = m.packed_weights()
    ids = np.ones((2, 5), np.int64)
    with pytest.raises(ValueError, match="a prompt of 5 tokens from cache position 20 passes the 24 positions"):
        ops.gpt2_decode_prompt(w, ids, ids + 19, state.k, state.v, state.padding, 20)
    with pytest.raises(ValueError, match=r"ids and positions must have shape \(B, T\)"):
        ops.gpt2_decode_prompt(w, ids[:1], ids[:1], state.k, state.v, state.padding, 0)
    with pytest.raises(ValueError, match=r"ids and positions must have shape \(B, T\)"):
        ops.gpt2_decode_prompt(w, ids[:, :0], ids[:, :0], state.k, state.v, state.padding, 0)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 50\)"):
        ops.gpt2_decode_prompt(w, ids * 50, ids, state.k, state.v, state.padding, 0)
    with pytest.raises(ValueError, match=r"positions in \[0, 24\), got .* positions from 0 to 24"):
        ops.gpt2_decode_prompt(w, ids, np.array([[0, 1, 2, 3, 24]] * 2), state.k, state.v, state.padding, 0)


# sampled decoding steps in one kernel call (ops.gpt2_decode_sampled, TransformerLM.sampled_steps): the
# reference's tokens, the step-by-step path's bits, and the step path's refusals
SAMPLED_CFG = dataclasses.replace(CFG, max_seq_len=40, tie_embeddings=False)


def _sampled_model(weights="fp32", dtype=np.float32, cfg=SAMPLED_CFG, seed=2):
    from fastformer.kernels.ops import quantized

    if weights != "fp32" and (dtype == np.float64 or not quantized.format_runs_natively(weights)):
        pytest.skip(f"{weights} weights: float32 models on a CPU that runs them natively")
    m = TransformerLM(cfg, seed=seed, dtype=dtype)
    m.flat.data[:] = np.random.default_rng(seed).normal(0, 0.5, m.flat.size)  # draws that vary
    if weights != "fp32":
        m.quantize(weights)
    return m


def _sampled(ops, m, n=30, eos=None, top_k=None, temperature=0.9, step_by_step=False):
    """ops.gpt2_decode_sampled after a three-row prompt (one row left-padded, one done from the
    start): (tokens, stuck, done, k cache). step_by_step: the reference's loop over `ops`' steps."""
    from fastformer.kernels.ops import gpt2_decode

    state, first, done = three_rows_after_prompt(m)
    u = np.random.default_rng(7).random((n, 3))
    state.padding[:, state.length:state.length + n] = False
    run = (lambda *a: gpt2_decode.gpt2_decode_sampled(ops, *a)) if step_by_step else ops.gpt2_decode_sampled
    tokens, stuck = run(m.packed_weights(), first, state.next_position, state.k, state.v, state.padding, state.length,
                        u, temperature, top_k, eos, done)
    return tokens, stuck, done, state.k.copy()


@pytest.mark.parametrize("weights", ["fp32", "int8", "bf16"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("top_k", [None, 5])
def test_gpt2_decode_sampled_matches_reference_and_its_own_steps(fast_ops, ref, weights, dtype, top_k):
    """Every step and draw in one kernel call: the reference's tokens, <eos> and done rows included;
    and bit for bit the tokens and cache of the same backend's steps and sample_ids one by one."""
    m = _sampled_model(weights, dtype)
    free, stuck, _, _ = _sampled(ref, m, top_k=top_k)
    assert free.shape == (3, 30) and stuck is None and len(np.unique(free[0])) > 5
    f = int(np.argmax(free[0] != free[0, 0]))
    eos = int(free[0, f])  # row 0's first change of token: its eos
    for eos_id in (None, eos):
        a, stuck_a, done_a, k_a = _sampled(fast_ops, m, eos=eos_id, top_k=top_k)
        b, stuck_b, done_b, k_b = _sampled(ref, m, eos=eos_id, top_k=top_k)
        c, stuck_c, done_c, k_c = _sampled(fast_ops, m, eos=eos_id, top_k=top_k, step_by_step=True)
        assert stuck_a is stuck_b is stuck_c is None
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(done_a, done_b)
        if weights == "fp32":  # a quantised row's rounding may fall the other way: a unit of its scale apart
            np.testing.assert_allclose(k_a, k_b, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(done_a, done_c)
        np.testing.assert_array_equal(k_a, k_c)
        if eos_id is not None:  # row 2 was done from the start, row 0 after its eos
            assert (a[2] == eos).all() and (a[0, f:] == eos).all() and done_a[[0, 2]].all()
            np.testing.assert_array_equal(a[0, :f], free[0, :f])
        else:
            np.testing.assert_array_equal(a, free)


@pytest.mark.parametrize("weights", ["fp32", "int8"])
def test_gpt2_decode_sampled_in_two_parts_makes_the_one_part_bits(fast_ops, weights, monkeypatch):
    """The draws run in the choice's one chunk: two parts sharing the stages, side by side or one
    after the other, make the one-part call's tokens, done rows and cache."""
    from fastformer.kernels import _sync
    from fastformer.kernels.ops import gpt2_decode

    if not gpt2_decode.tiles_run():
        pytest.skip("the parts synchronise through compiled atomics")
    cfg = dataclasses.replace(SAMPLED_CFG, d_model=128, n_heads=4, d_ff=512, vocab_size=300)  # chunks to share
    m = _sampled_model(weights, cfg=cfg, seed=5)

    def order(o):
        return lambda fn, args, parts: {p: fn(*args, p, parts) for p in o(parts)}[0]

    def sampled(parts, run_together=_sync.run_together):
        monkeypatch.setattr(gpt2_decode, "greedy_parts", lambda *a: parts)
        monkeypatch.setattr(gpt2_decode, "run_together", run_together)
        return _sampled(fast_ops, m, n=24, top_k=40)

    want = sampled(1)
    assert len(np.unique(want[0][0])) > 5
    for run in (_sync.run_together, order(lambda n: range(n)), order(lambda n: reversed(range(n)))):
        got = sampled(2, run)
        assert got[1] is None
        for a, b in zip(got[::2], want[::2]):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(got[2], want[2])


@pytest.mark.parametrize("rows", [1, 2])  # one row draws in the choice's chunk, more in a stage of their own
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_gpt2_decode_sampled_stops_before_logits_it_cannot_draw_from(ops, bad, rows):
    """A step whose logits hold a NaN or +inf in any row stops the call unchosen: the tokens before
    it, and its logits for the caller to refuse."""
    m = TransformerLM(SAMPLED_CFG, seed=0)
    head = m.flat.offsets[m.decode_layout()[-1]]  # the head (C, V): its first weight feeds every row's logit 0
    m.flat.data[head:head + SAMPLED_CFG.d_model * SAMPLED_CFG.vocab_size] = 0.0
    m.flat.data[head] = bad  # NaN, or +inf times the first input (NaN where that is 0)
    state = m.init_state(rows)
    state.padding[:, :8] = False
    tokens, stuck = ops.gpt2_decode_sampled(m.packed_weights(), np.arange(1, rows + 1), np.zeros(rows, np.int64),
                                            state.k, state.v, state.padding, 0, np.full((5, rows), 0.5), 1.0)
    assert tokens.shape == (rows, 0) and stuck.shape == (rows, SAMPLED_CFG.vocab_size)
    assert not np.isfinite(stuck.max(axis=1)).all()


def test_gpt2_decode_sampled_refuses_bad_draws_and_options(ops):
    m = TransformerLM(SAMPLED_CFG, seed=0)
    w, state = m.packed_weights(), m.init_state(2)
    ids, pos = np.array([1, 2]), np.array([0, 0])

    def call(u, temperature=1.0, top_k=None):
        return ops.gpt2_decode_sampled(w, ids, pos, state.k, state.v, state.padding, 0, u, temperature, top_k)

    with pytest.raises(ValueError, match=r"one uniform draw per step and row, shape \(steps, 2\)"):
        call(np.zeros(4))
    with pytest.raises(ValueError, match=r"u must hold uniform draws in \[0, 1\), got 1.0"):
        call(np.ones((3, 2)))
    with pytest.raises(ValueError, match="temperature must be"):
        call(np.zeros((3, 2)), 0.0)
    with pytest.raises(ValueError, match="top_k must be an integer >= 1"):
        call(np.zeros((3, 2)), 1.0, 0)
    with pytest.raises(ValueError, match="pass the 40 positions of the cache"):
        call(np.zeros((41, 2)))
    tokens, stuck = call(np.zeros((0, 2)))
    assert tokens.shape == (2, 0) and stuck is None


@pytest.mark.parametrize("top_k", [None, 7])
@pytest.mark.parametrize("rows", [1, 2])
def test_generate_through_sampled_steps_equals_step_by_step(backend, top_k, rows, monkeypatch):
    """Sampled generation in chunks of kernel steps draws the tokens of one step at a time with the
    same seed -- past the context window and with <eos> -- and leaves the cache the same."""
    cfg = dataclasses.replace(SAMPLED_CFG, max_seq_len=24)
    model = TransformerLM(cfg, seed=3)
    prompt = np.array([[1, 2, 3, 4, 5], [7, 8, 9, 10, 11]])[:rows]
    init_state, sampled_steps = TransformerLM.init_state, TransformerLM.sampled_steps
    states, chunks = [], []

    def keep_state(self, *a, **k):
        states.append(init_state(self, *a, **k))
        return states[-1]

    def spy(self, *a, **k):
        made = sampled_steps(self, *a, **k)
        chunks.append(None if made is None else made[0].shape[1])
        return made

    def run(chunked, eos_id=None):
        monkeypatch.setattr(TransformerLM, "sampled_steps", spy if chunked else lambda self, *a, **k: None)
        out = model.generate(prompt, 40, temperature=0.9, top_k=top_k, seed=11, eos_id=eos_id)
        return out, states[-1]

    monkeypatch.setattr(TransformerLM, "init_state", keep_state)
    (chunked, s1), (stepped, s2) = run(True), run(False)
    assert max(c or 0 for c in chunks) > 1 and None in chunks  # chunks ran, and declined at the window's edge
    np.testing.assert_array_equal(chunked, stepped)
    assert len(np.unique(stepped[0])) > 10
    assert s1.length == s2.length
    np.testing.assert_array_equal(s1.tokens[:, :s1.length], s2.tokens[:, :s2.length])
    eos = int(stepped[0, 12])
    np.testing.assert_array_equal(run(True, eos)[0], run(False, eos)[0])


def test_sampled_steps_are_left_to_the_step_where_they_do_not_apply(monkeypatch):
    """top-p, a repetition penalty and an id limit draw step by step; plain draws take the chunks."""
    model = TransformerLM(SAMPLED_CFG, seed=3)
    calls = []
    monkeypatch.setattr(TransformerLM, "sampled_steps", lambda self, *a, **k: calls.append(1))
    for options in (dict(top_p=0.9), dict(repetition_penalty=1.3), dict(id_limit=40)):
        model.generate(np.array([1, 2, 3]), 6, temperature=0.8, seed=0, **options)
    assert calls == []
    model.generate(np.array([1, 2, 3]), 6, temperature=0.8, seed=0)
    assert calls


@pytest.mark.parametrize("bad, message", [(np.nan, "logits became NaN at new token 4"),
                                          (np.inf, "logits must be finite or -inf")])
def test_logits_a_sampled_chunk_stops_at_are_refused_as_a_step_refuses_them(bad, message):
    """The chunk's tokens come first, then the logits it could not draw from get the step path's
    refusal (and no step runs for them)."""
    from fastformer.generation.sampling import sample_tokens

    def sampled_steps(ids, n, done):
        stuck = np.zeros((1, 5))
        stuck[0, 2] = bad
        return np.array([[1, 2]]), stuck

    def step(ids):
        raise AssertionError("the stuck logits are refused without a step")

    gen = sample_tokens(step, np.zeros((1, 5)), 8, temperature=1.0, rng=np.random.default_rng(0),
                        sampled_steps=sampled_steps)
    assert [int(t[0]) for t in [next(gen), next(gen), next(gen)]][1:] == [1, 2]
    with pytest.raises(FastformerError, match=message):
        next(gen)

