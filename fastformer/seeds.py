"""Every random stream fastformer draws from, and the functions that make them.

A training run has one integer seed, `train.seed`. It names a root `np.random.SeedSequence`;
the run's streams are that sequence's first four children, in spawn order, and the sequence
itself. Children of one SeedSequence are statistically independent, so adding dropout to a
model does not move its data order, nor a held-out string its training strings.

    stream        generator                          drawn by                              in a checkpoint
    ------------  ---------------------------------  ------------------------------------  ---------------
    init          SeedSequence(seed).spawn(4)[0]     the model's weight initialisation      no (the weights are)
    dropout       SeedSequence(seed).spawn(4)[1]     the model's dropout masks (model.rng)  rng.dropout
                  rank r > 0 of a data-parallel run:  that rank's dropout masks              rng.dropout_ranks
                  child r of that sequence            (rank 0 keeps the stream above)
    data          SeedSequence(seed).spawn(4)[2]     the training batches: text windows     rng.data
                                                     (LMTask), the shuffle of the pairs
                                                     (PairBatches), the synthetic strings
                                                     (SyntheticTask)
    heldout       SeedSequence(seed).spawn(4)[3]     the synthetic tasks' validation        no (remade: the
                                                     strings (Seq2SeqTask.heldout)          same every time)
    split         SeedSequence(seed) itself,         which pairs of a pairs file are held   no (remade)
                  i.e. default_rng(seed)             out for validation (split_pairs)
    sampling      default_rng(seed), the seed of     temperature / top-k / top-p sampling   -
                  `generate` (None: fresh entropy)   in generation
    bench inputs  default_rng(seed), bench's seed    the synthetic batch, prompt and        -
                                                     kernel inputs of `fastformer bench`
                                                     and the benchmark suites

`run_streams(seed)` makes the five streams of a run, `model_streams(seed)` the two a model keeps,
`sampling_stream(seed)` and `bench_stream(seed)` the others; each call makes new generators at
the start of their streams. The text language model's validation windows and the pairs'
evaluation take no randomness (fixed windows, every validation pair). Components that accept an
int where they take a generator (PairBatches, SyntheticTask, split_pairs, for direct use) turn it
into `default_rng(int)`; a run never passes them one.

These spawn trees are fixed: checkpoints hold the dropout and data states, and resumed runs,
tests and published figures rely on every stream giving the same numbers for the same seed.
"""

from typing import NamedTuple

import numpy as np

INIT, DROPOUT, DATA, HELDOUT = range(4)  # the children of SeedSequence(seed), in spawn order


class RunStreams(NamedTuple):
    """The generators of one training run, each at the start of its stream (see the table above)."""

    init: np.random.Generator  # weight initialisation
    dropout: np.random.Generator  # dropout masks
    data: np.random.Generator  # training batches
    heldout: np.random.Generator  # synthetic validation strings
    split: np.random.Generator  # the train/validation split of a pairs file


def run_streams(seed):
    """The RunStreams of `train.seed` = seed (an int >= 0)."""
    root = np.random.SeedSequence(seed)
    init, dropout, data, heldout = (np.random.default_rng(child) for child in root.spawn(HELDOUT + 1))
    return RunStreams(init, dropout, data, heldout, np.random.default_rng(seed))


def model_streams(seed):
    """(init, dropout) generators of a model seeded with `seed`: the first draws its initial
    weights, the second its dropout masks (kept as `model.rng`, saved with checkpoints)."""
    streams = run_streams(seed)
    return streams.init, streams.dropout


def dropout_stream(seed, rank=0):
    """The dropout generator of rank `rank` of a data-parallel run seeded with `seed`: rank 0's is
    the model's own (model_streams), so a one-process run is unchanged; rank r > 0 takes child r
    of the dropout SeedSequence, independent of every other stream."""
    if rank == 0:
        return model_streams(seed)[1]
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(DROPOUT, rank)))


def sampling_stream(seed=None):
    """The generator that sampling in generation draws from: `seed` an int, or None for fresh
    entropy from the operating system (a different continuation each call)."""
    return np.random.default_rng(seed)


def bench_stream(seed=0):
    """The generator of a benchmark's synthetic inputs (token ids, prompts, kernel arrays)."""
    return np.random.default_rng(seed)
