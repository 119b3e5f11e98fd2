"""count_parameters(cfg) against the parameter count of the models the configs build."""

import pytest

from fastformer import FastformerError, Seq2SeqTransformer, TransformerLM
from fastformer.models.config import LMConfig, Seq2SeqConfig, count_parameters

LM_CONFIGS = [
    LMConfig(),
    LMConfig(vocab_size=50, max_seq_len=16, d_model=24, n_heads=3, d_ff=40, n_layers=3, tie_embeddings=False),
    LMConfig(vocab_size=1000, max_seq_len=7, d_model=8, n_heads=1, d_ff=8, n_layers=1, dropout=0.1),
    LMConfig(vocab_size=50, max_seq_len=16, d_model=8, n_heads=2, d_ff=16, n_layers=2, positions="sinusoidal"),
]
SEQ2SEQ_CONFIGS = [
    Seq2SeqConfig(),
    Seq2SeqConfig(src_vocab_size=31, tgt_vocab_size=57, max_src_len=9, max_tgt_len=13, d_model=12, n_heads=3,
                  d_ff=20, n_encoder_layers=1, n_decoder_layers=3, tie_embeddings=False),
    Seq2SeqConfig(src_vocab_size=40, tgt_vocab_size=40, d_model=16, n_heads=2, d_ff=24, n_encoder_layers=3,
                  n_decoder_layers=1, positions="sinusoidal", activation="relu", norm_first=False),
    Seq2SeqConfig(src_vocab_size=5, tgt_vocab_size=300, max_src_len=3, max_tgt_len=4, d_model=10, n_heads=5,
                  d_ff=6, n_encoder_layers=2, n_decoder_layers=1, positions="sinusoidal", dropout=0.2),
]


@pytest.mark.parametrize("cfg", LM_CONFIGS, ids=lambda c: f"lm-tied{c.tie_embeddings}-C{c.d_model}-{c.positions}")
def test_lm_count_matches_the_model(cfg):
    model = TransformerLM(cfg)
    assert count_parameters(cfg) == model.num_parameters() == sum(p.size for p in model.state_dict().values())


@pytest.mark.parametrize("cfg", SEQ2SEQ_CONFIGS, ids=lambda c: f"s2s-tied{c.tie_embeddings}-{c.positions}")
def test_seq2seq_count_matches_the_model(cfg):
    model = Seq2SeqTransformer(cfg)
    assert count_parameters(cfg) == model.num_parameters() == sum(p.size for p in model.state_dict().values())


def test_tying_saves_one_embedding():
    tied, untied = LMConfig(vocab_size=100, d_model=32), LMConfig(vocab_size=100, d_model=32, tie_embeddings=False)
    assert count_parameters(untied) - count_parameters(tied) == 100 * 32


def test_a_huge_config_is_counted_without_allocating():
    # 1e5 wide: about 80 billion parameters, counted from the shapes alone
    n = count_parameters(LMConfig(d_model=100_000, n_heads=1, d_ff=400_000, n_layers=2))
    assert n == 259 * 100_000 + 128 * 100_000 + 2 * (12 * 100_000 ** 2 + 13 * 100_000) + 2 * 100_000


def test_refuses_other_objects():
    with pytest.raises(FastformerError, match="LMConfig or a Seq2SeqConfig"):
        count_parameters({"d_model": 64})
