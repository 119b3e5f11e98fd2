"""The chunk order of the parts that share a kernel call's stages (_sync.py), and _sync.run_together."""
import threading

import numpy as np
import pytest

from fastformer.kernels import _sync, tasks


def _py(fn):
    return getattr(fn, "py_func", fn)  # the Python function of an inlined helper


@pytest.mark.parametrize("parts", [1, 2, 3])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 7])
def test_each_part_tries_every_chunk_once_its_own_first(parts, n):
    chunk_at = _py(_sync.chunk_at)
    shares = []
    for part in range(parts):
        order = [chunk_at(j, n, part, parts) for j in range(n)]
        assert sorted(order) == list(range(n))
        own = list(range(part * n // parts, (part + 1) * n // parts))
        assert order[:len(own)] == own
        shares += own
    assert sorted(shares) == list(range(n))  # the shares cut the stage
    if parts == 2 and n > 1:  # the other's chunks from the far end: the last one it would reach
        assert chunk_at(n - 1, n, 0, 2) == n // 2 and chunk_at(n - 1, n, 1, 2) == 0


def test_stage_chunks_and_spans_cover_the_units():
    stage_chunks, chunk_span = _py(_sync.stage_chunks), _py(_sync.chunk_span)
    assert stage_chunks(32, 1) == 1
    assert stage_chunks(1, 2) == 1 and stage_chunks(3, 2) == 3 and stage_chunks(32, 2) == 2 * _sync.CHUNKS_PER_PART
    assert stage_chunks(10 ** 6, 64) == _sync.MAX_CHUNKS
    for items in (1, 5, 32):
        n = stage_chunks(items, 2)
        spans = [chunk_span(c, n, items) for c in range(n)]
        assert spans[0][0] == 0 and spans[-1][1] == items
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(spans, spans[1:]))


def test_run_together_runs_every_part_and_returns_the_first(monkeypatch):
    seen, threads = [], set()

    def part_fn(x, part, parts):
        seen.append((x, part, parts))
        threads.add(threading.get_ident())
        return 10 * x + part

    monkeypatch.setattr(tasks, "task_threads", lambda: 2)
    assert _sync.run_together(part_fn, (4,), 2) == 40
    assert sorted(seen) == [(4, 0, 2), (4, 1, 2)]
    assert len(threads) == 2 and threading.get_ident() in threads  # part 0 on the caller, part 1 on the partner
    seen.clear()
    monkeypatch.setattr(tasks, "task_threads", lambda: 1)  # one thread: one part after the other
    assert _sync.run_together(part_fn, (5,), 2) == 50
    assert seen == [(5, 0, 2), (5, 1, 2)]


@pytest.mark.parametrize("failing, error", [(0, RuntimeError), (0, KeyboardInterrupt), (1, RuntimeError)])
def test_run_together_waits_for_every_part_and_raises_the_failing_ones_error(monkeypatch, failing, error):
    """The other part may still be writing the call's arrays: it is waited for, then the error of
    the part that failed is raised (the caller's, or the partner's after the caller's part); the
    partner is free again and the caller's CPUs are its own."""
    monkeypatch.setattr(tasks, "task_threads", lambda: 2)
    before = _sync._cpus()
    finished = []

    def part_fn(part, parts):
        if part == failing:
            raise error(f"part {part}")
        threading.Event().wait(0.05)
        finished.append(part)

    with pytest.raises(error):
        _sync.run_together(part_fn, (), 2)
    assert finished == [1 - failing]
    partner = _sync._get_partner()
    assert partner is None or not partner.busy.locked()
    assert _sync._cpus() == before
    assert _sync.run_together(lambda part, parts: part + 7, (), 2) == 7  # and the next call is served


def _partner_or_skip(monkeypatch):
    monkeypatch.setattr(tasks, "task_threads", lambda: 2)
    partner = _sync._get_partner()
    if partner is None:
        pytest.skip("the partner thread spins in compiled code: Numba")
    return partner


def test_two_parts_run_on_the_partner_which_keeps_its_own_core(monkeypatch):
    """Part 1 runs on the partner thread; during the call the caller keeps off the partner's core,
    and its own CPUs are as they were after it."""
    import os

    partner = _partner_or_skip(monkeypatch)
    seen = {}

    def part_fn(part, parts):
        seen[part] = threading.current_thread().name, (os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity")
                                                       else None)
        return part

    before = _sync._cpus()
    assert _sync.run_together(part_fn, (), 2) == 0
    assert seen[1][0] == "fastformer-partner" and seen[0][0] == threading.current_thread().name
    assert _sync._cpus() == before
    if partner.cpu is not None:
        assert seen[1][1] == {partner.cpu} and partner.cpu not in seen[0][1] and seen[0][1] <= before


def test_a_sleeping_partner_is_woken_and_a_busy_one_leaves_the_call_to_the_pool(monkeypatch):
    """Past WARM_SPINS the partner sleeps until the next call wakes it; while one caller has it,
    another thread's call runs its part 1 on the pool."""
    partner = _partner_or_skip(monkeypatch)
    monkeypatch.setattr(_sync, "WARM_SPINS", 10)
    slept = partner.sleeps
    _sync.run_together(lambda part, parts: None, (), 2)
    for _ in range(100):  # it stops spinning and sleeps
        if partner.sleeps > slept:
            break
        threading.Event().wait(0.01)
    assert partner.sleeps > slept
    names = []
    call = threading.Thread(target=_sync.run_together,
                            args=(lambda part, parts: names.append(threading.current_thread().name), (), 2))
    call.start()
    call.join(10)  # a lost wake-up would hang here: fail instead
    assert not call.is_alive() and "fastformer-partner" in names
    inside, release, names = threading.Event(), threading.Event(), []

    def holder(part, parts):
        if part == 0:
            inside.set()
            release.wait(5)

    t = threading.Thread(target=_sync.run_together, args=(holder, (), 2))
    t.start()
    assert inside.wait(5)
    _sync.run_together(lambda part, parts: names.append(threading.current_thread().name), (), 2)
    release.set()
    t.join(5)
    assert threading.current_thread().name in names and any(n.startswith("fastformer-tasks") for n in names)


def test_a_stage_of_few_parts_is_one_cache_line_of_an_aligned_sync():
    assert _sync._stage_words(1) == _sync._stage_words(2) == _sync._stage_words(3) == _sync.LINE_WORDS == 8
    assert _sync._stage_words(4) == _sync.STAGE_WORDS  # 8 chunks and a count: more than a line
    for parts in (2, 4):
        sync = _sync.new_sync(5, parts)
        assert sync.dtype == np.int64 and sync.size == 5 * _sync._stage_words(parts) and not sync.any()
        assert sync.ctypes.data % 64 == 0
    assert 1 + 3 * _sync.CHUNKS_PER_PART <= _sync.LINE_WORDS  # three parts' chunks and the count fit a line
