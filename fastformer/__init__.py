"""fastformer: small Transformers trained and run on the CPU, with hand-written forward and
backward passes on NumPy arrays and Numba kernels for the hot paths."""

from .kernels import get_backend, get_ops, set_backend, use_backend
from .model import LMConfig, TransformerLM
from .seq2seq import Seq2SeqConfig, Seq2SeqTransformer
from .trainer import Trainer

__version__ = "0.1.0"

__all__ = ["LMConfig", "TransformerLM", "Seq2SeqConfig", "Seq2SeqTransformer", "Trainer", "get_backend",
           "get_ops", "set_backend", "use_backend", "__version__"]
