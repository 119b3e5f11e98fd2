"""Seq2SeqTransformer against torch.nn.Transformer: logits and every parameter's gradient, with
padding in source and target. Skips when torch is not installed."""

import numpy as np
import pytest
from torch_reference import seq2seq_from_torch_state_dict, seq2seq_to_torch_state_dict, torch_seq2seq_module

from fastformer.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer

torch = pytest.importorskip("torch")


def make_batch(cfg, rng, B=3, S=6, T=5):
    src = rng.integers(0, cfg.src_vocab_size, (B, S))
    tgt = rng.integers(0, cfg.tgt_vocab_size, (B, T))
    src_mask = np.ones((B, S), dtype=np.int64)
    tgt_mask = np.ones((B, T), dtype=np.int64)
    src_mask[1, 4:] = 0  # right padding, as the batcher makes
    src_mask[2, 2:] = 0
    tgt_mask[0, 3:] = 0
    tgt_mask[2, 1:] = 0
    targets = rng.integers(0, cfg.tgt_vocab_size, (B, T))
    targets[tgt_mask == 0] = -100
    return src, src_mask, tgt, tgt_mask, targets


@pytest.mark.parametrize("variant", [
    dict(),  # the configuration: gelu, pre-LN, learned positions, tied
    dict(tie_embeddings=False, positions="sinusoidal"),
    dict(activation="relu", norm_first=False),
])
def test_logits_and_grads_match_torch(backend, variant):
    cfg = Seq2SeqConfig(src_vocab_size=17, tgt_vocab_size=19, max_src_len=8, max_tgt_len=8, d_model=16,
                        n_heads=4, d_ff=24, n_encoder_layers=2, n_decoder_layers=2, **variant)
    model = Seq2SeqTransformer(cfg, seed=1)
    rng = np.random.default_rng(0)
    # non-trivial norms and biases, so a swapped gain/bias or a missing bias cannot go unnoticed
    for name, p in model.params.items():
        if p.ndim == 1:
            p += rng.normal(0, 0.1, p.shape)
    batch = make_batch(cfg, rng)

    tm = torch_seq2seq_module(cfg).train()  # train mode: no fused inference fast path; dropout is 0
    tm.load_state_dict(seq2seq_to_torch_state_dict(model))
    src, src_mask, tgt, tgt_mask, targets = (torch.from_numpy(a) for a in batch)
    logits_t = tm(src, src_mask, tgt, tgt_mask)
    loss_t = torch.nn.functional.cross_entropy(logits_t.reshape(-1, cfg.tgt_vocab_size), targets.reshape(-1),
                                               ignore_index=-100)
    loss_t.backward()

    logits = model.forward(*batch[:4])
    assert np.abs(logits - logits_t.detach().numpy()).max() < 1e-4
    loss, grads = model.loss_and_grads(*batch)
    assert abs(loss - loss_t.item()) < 1e-5
    torch_grads = {n: p.grad.numpy() for n, p in tm.named_parameters()}  # a tied weight once
    ours = {n if n.endswith(("_embed.weight", "lm_head.weight")) else "transformer." + n: g for n, g in grads.items()}
    assert sorted(ours) == sorted(torch_grads)
    for name, g in ours.items():
        gt = torch_grads[name]
        scale = max(np.abs(gt).max(), 1e-3)
        assert np.abs(g - gt).max() / scale < 1e-4, name


def test_state_dict_round_trip_through_torch():
    cfg = Seq2SeqConfig(src_vocab_size=9, tgt_vocab_size=7, max_src_len=4, max_tgt_len=4, d_model=8,
                        n_heads=2, d_ff=8, n_encoder_layers=1, n_decoder_layers=1, tie_embeddings=False)
    a, b = Seq2SeqTransformer(cfg, seed=0), Seq2SeqTransformer(cfg, seed=1)
    tm = torch_seq2seq_module(cfg)
    tm.load_state_dict(seq2seq_to_torch_state_dict(a))  # strict: every torch name is provided
    seq2seq_from_torch_state_dict(b, tm.state_dict())
    np.testing.assert_array_equal(a.flat.data, b.flat.data)
