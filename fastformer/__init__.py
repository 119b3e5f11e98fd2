"""fastformer: small Transformers trained and run on the CPU, with hand-written forward and
backward passes on NumPy arrays and Numba kernels for the hot paths.

The package is layered; each subpackage imports only those below it (checked by the
import-linter contract in pyproject.toml):

    cli        the `fastformer` command, `fastformer bench`, plots
    training   run configs, optimizers, tasks, the trainer, checkpoints, evaluation, export
    data       tokenizers, text windows, prepared corpora, datasets, translation pairs
    models     the GPT-2 language model and the encoder-decoder, assembled from blocks
    generation sampling and greedy/beam search over any model's `step(tokens, state)`
    nn         parameters in one flat buffer, layers, blocks, the key/value cache
    kernels    the kernel interface: NumPy reference, Numba backend, threads
    errors, seeds, atomic   FastformerError and its checks; every random stream; atomic file writes
    seeds      every random stream (weights, dropout, data, held-out data, sampling) and its seed

The names below import from `fastformer` itself, loaded on first use so that
`import fastformer.kernels` stays light.
"""

import importlib

from fastformer.errors import FastformerError
from fastformer.kernels import get_backend, get_ops, set_backend, use_backend

__version__ = "0.1.0"

_LAZY = {
    "LMConfig": "fastformer.models.config",
    "Seq2SeqConfig": "fastformer.models.config",
    "TransformerLM": "fastformer.models.lm",
    "Seq2SeqTransformer": "fastformer.models.seq2seq",
    "KVCache": "fastformer.models.lm",
    "Trainer": "fastformer.training.trainer",
}

__all__ = ["FastformerError", "KVCache", "LMConfig", "TransformerLM", "Seq2SeqConfig", "Seq2SeqTransformer",
           "Trainer", "get_backend", "get_ops", "set_backend", "use_backend", "__version__"]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastformer' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
