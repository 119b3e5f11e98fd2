"""The small training runs several tests share: a word-salad text and the configs of a one-layer
language model and a reverse-task encoder-decoder (test_grad_accum, test_distributed and its
MPI worker, test_interrupt, test_finetune)."""

import numpy as np

from fastformer.models.config import Seq2SeqConfig
from fastformer.training.config import DataConfig, ModelConfig, RunConfig, TrainConfig

WORDS = "the cat sat on a mat while one dog ran to its red ball and every bird sang".split()
TEXT = " ".join(np.random.default_rng(0).choice(WORDS, size=1500)) + "\n"


def lm_config(dropout=0.0, **train):
    t = dict(batch_size=4, seq_len=16, max_steps=10, lr=3e-3, min_lr=3e-4, warmup_steps=2, log_interval=1,
             eval_interval=5, eval_batches=2, checkpoint_interval=100)
    t.update(train)
    return RunConfig(model=ModelConfig(max_seq_len=16, d_model=16, n_heads=2, d_ff=32, n_layers=1, dropout=dropout),
                     train=TrainConfig(**t))


def reverse_config(dropout=0.0, **train):
    t = dict(batch_size=8, max_steps=10, warmup_steps=1, log_interval=1, eval_interval=5, eval_batches=1,
             checkpoint_interval=100)
    t.update(train)
    model = Seq2SeqConfig(max_src_len=8, max_tgt_len=9, d_model=16, n_heads=2, d_ff=32, n_encoder_layers=1,
                          n_decoder_layers=1, dropout=dropout)
    return RunConfig(data=DataConfig(task="reverse", max_len=8), seq2seq=model, train=TrainConfig(**t))


def make_config(kind, dropout=0.0, **train):
    """lm_config or reverse_config: kind "lm" or "seq2seq"."""
    return lm_config(dropout, **train) if kind == "lm" else reverse_config(dropout, **train)
