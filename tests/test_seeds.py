"""The random streams of fastformer.seeds are the ones the package drew before they were gathered
there, generator for generator: checkpoints, resumed runs and published figures depend on it."""

import numpy as np
import pytest

from fastformer import seeds

SEEDS = [0, 1, 7, 2 ** 31 + 5]


def same(a, b):
    """Two generators at the same point of the same stream: equal states and equal draws."""
    assert a.bit_generator.state == b.bit_generator.state
    np.testing.assert_array_equal(a.random(5), b.random(5))


@pytest.mark.parametrize("seed", SEEDS)
def test_run_streams_are_the_old_expressions(seed):
    s = seeds.run_streams(seed)
    # models: init_seq, dropout_seq = np.random.SeedSequence(seed).spawn(2)
    init_seq, dropout_seq = np.random.SeedSequence(seed).spawn(2)
    same(s.init, np.random.default_rng(init_seq))
    same(s.dropout, np.random.default_rng(dropout_seq))
    # training tasks: np.random.default_rng(np.random.SeedSequence(seed).spawn(4)[which]), data 2, held-out 3
    same(s.data, np.random.default_rng(np.random.SeedSequence(seed).spawn(4)[2]))
    same(s.heldout, np.random.default_rng(np.random.SeedSequence(seed).spawn(4)[3]))
    # split_pairs(pairs, val_fraction, seed=seed): np.random.default_rng(seed).permutation(n)
    same(s.split, np.random.default_rng(seed))
    init, dropout = seeds.model_streams(seed)
    same(init, np.random.default_rng(init_seq))
    same(dropout, np.random.default_rng(dropout_seq))


def test_other_streams_are_the_old_expressions():
    same(seeds.sampling_stream(3), np.random.default_rng(3))  # generate(..., seed=3)
    assert seeds.sampling_stream(None).random() != seeds.sampling_stream(None).random()  # fresh entropy
    same(seeds.bench_stream(), np.random.default_rng(0))  # fastformer bench's synthetic inputs
    same(seeds.bench_stream(4), np.random.default_rng(4))


def test_each_call_starts_the_streams_afresh_and_the_streams_differ():
    a = seeds.run_streams(0)
    a.data.random(10)
    same(seeds.run_streams(0).data, np.random.default_rng(np.random.SeedSequence(0).spawn(4)[2]))
    draws = [g.random() for g in seeds.run_streams(0)]
    assert len(set(draws)) == len(draws)
    assert seeds.run_streams(0).data.random() != seeds.run_streams(1).data.random()


def test_the_training_tasks_draw_from_the_run_streams():
    from fastformer.data.pairs import split_pairs
    from fastformer.models.config import Seq2SeqConfig
    from fastformer.training.config import DataConfig, RunConfig, TrainConfig
    from fastformer.training.tasks import Seq2SeqTask

    config = RunConfig(data=DataConfig(task="reverse", max_len=6), train=TrainConfig(seed=5, batch_size=4),
                       seq2seq=Seq2SeqConfig(max_src_len=8, max_tgt_len=9))
    task = Seq2SeqTask(config)
    same(task.source.rng, seeds.run_streams(5).data)
    assert task.heldout(3) == task.source.sample(3, rng=np.random.default_rng(np.random.SeedSequence(5).spawn(4)[3]))
    items = list(range(40))
    old_perm = np.random.default_rng(5).permutation(40)[-4:]
    assert sorted(split_pairs(items, 0.1, seeds.run_streams(5).split)[1]) == sorted(old_perm.tolist())
