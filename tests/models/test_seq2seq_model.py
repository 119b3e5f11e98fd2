"""Seq2SeqTransformer: float64 finite-difference gradient checks of every parameter tensor, the
effects of the masks, configuration and input errors, state dicts."""

import numpy as np
import pytest

from fastformer.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer

TINY = dict(src_vocab_size=9, tgt_vocab_size=7, max_src_len=6, max_tgt_len=5, d_model=8, n_heads=2,
            d_ff=12, n_encoder_layers=2, n_decoder_layers=2)


def padded_batch(cfg, seed=0):
    """B=3 with right padding in source and target, targets -100 at target padding."""
    rng = np.random.default_rng(seed)
    src = rng.integers(0, cfg.src_vocab_size, (3, 6))
    tgt = rng.integers(0, cfg.tgt_vocab_size, (3, 5))
    src_mask = np.ones_like(src)
    tgt_mask = np.ones_like(tgt)
    src_mask[1, 3:] = 0
    src_mask[2, 5:] = 0
    tgt_mask[0, 2:] = 0
    tgt_mask[2, 4:] = 0
    targets = rng.integers(0, cfg.tgt_vocab_size, tgt.shape)
    targets[tgt_mask == 0] = -100
    return dict(src_ids=src, src_mask=src_mask, tgt_in=tgt, tgt_mask=tgt_mask, targets=targets)


@pytest.mark.parametrize("variant", [
    dict(tie_embeddings=True, positions="learned"),
    dict(tie_embeddings=False, positions="learned"),
    dict(tie_embeddings=True, positions="sinusoidal"),
    dict(tie_embeddings=False, positions="sinusoidal", activation="relu"),
    dict(norm_first=False),
])
def test_gradients_match_finite_differences(variant):
    cfg = Seq2SeqConfig(**TINY, **variant)
    model = Seq2SeqTransformer(cfg, seed=3, dtype=np.float64)
    rng = np.random.default_rng(1)
    for p in model.params.values():  # move norms and biases off 1 and 0
        if p.ndim == 1:
            p += rng.normal(0, 0.2, p.shape)
    batch = padded_batch(cfg)
    _, grads = model.loss_and_grads(**batch)
    eps = 1e-6
    for name, p in model.params.items():
        flat, g = p.reshape(-1), grads[name].reshape(-1).copy()
        # every entry of small tensors, a sample of the big ones (each tensor checked)
        idx = np.arange(flat.size) if flat.size <= 16 else rng.choice(flat.size, 16, replace=False)
        for i in idx:
            old = flat[i]
            flat[i] = old + eps
            lp = model.loss(**batch)
            flat[i] = old - eps
            lm = model.loss(**batch)
            flat[i] = old
            num = (lp - lm) / (2 * eps)
            assert abs(num - g[i]) <= 1e-6 + 1e-5 * abs(num), (name, i, num, g[i])


@pytest.fixture
def model():
    return Seq2SeqTransformer(Seq2SeqConfig(**TINY), seed=0, dtype=np.float64)


def test_padding_and_future_tokens_do_not_leak(model):
    b = padded_batch(model.config)
    args = (b["src_ids"], b["src_mask"], b["tgt_in"], b["tgt_mask"])
    logits = model.forward(*args)
    # other ids at source padding: nothing changes
    src2 = np.where(b["src_mask"] == 1, b["src_ids"], (b["src_ids"] + 1) % 9)
    np.testing.assert_allclose(model.forward(src2, b["src_mask"], *args[2:]), logits, atol=1e-12)
    # other ids at target padding (right padding): the real positions do not change
    tgt2 = np.where(b["tgt_mask"] == 1, b["tgt_in"], (b["tgt_in"] + 1) % 7)
    real = b["tgt_mask"] == 1
    np.testing.assert_allclose(model.forward(*args[:2], tgt2, b["tgt_mask"])[real], logits[real], atol=1e-12)
    # a later target token does not change earlier logits, and does change its own
    tgt3 = b["tgt_in"].copy()
    tgt3[:, 3] = (tgt3[:, 3] + 1) % 7
    logits3 = model.forward(*args[:2], tgt3, None)
    logits_nomask = model.forward(*args[:2], b["tgt_in"], None)
    np.testing.assert_allclose(logits3[:, :3], logits_nomask[:, :3], atol=1e-12)
    assert np.abs(logits3[:, 3] - logits_nomask[:, 3]).max() > 1e-6
    # and the source mask does matter: unmasking the padding changes row 1
    assert np.abs(model.forward(args[0], None, *args[2:])[1] - logits[1]).max() > 1e-6


def test_loss_ignores_padded_targets(model):
    b = padded_batch(model.config)
    logits = model.forward(b["src_ids"], b["src_mask"], b["tgt_in"], b["tgt_mask"])
    keep = b["targets"] != -100
    z = logits[keep]
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    expected = (lse - z[np.arange(len(z)), b["targets"][keep]]).mean()
    assert model.loss(**b) == pytest.approx(expected, rel=1e-12)
    loss, _ = model.loss_and_grads(**b)
    assert loss == pytest.approx(expected, rel=1e-12)


def test_state_dict_round_trip_and_names(model):
    other = Seq2SeqTransformer(model.config, seed=5, dtype=np.float64)
    assert not np.array_equal(other.flat.data, model.flat.data)
    other.load_state_dict({k: v.copy() for k, v in model.state_dict().items()})
    np.testing.assert_array_equal(other.flat.data, model.flat.data)
    names = model.state_dict()
    assert "decoder.layers.1.multihead_attn.in_proj_weight" in names
    assert names["encoder.layers.0.linear1.weight"].shape == (12, 8)  # (out, in) as torch
    with pytest.raises(ValueError, match="missing keys"):
        other.load_state_dict({k: v for k, v in names.items() if k != "encoder.norm.bias"})


def test_dropout_is_deterministic_from_seed():
    cfg = Seq2SeqConfig(**TINY, dropout=0.3)
    b = padded_batch(cfg)
    l1 = Seq2SeqTransformer(cfg, seed=2).loss_and_grads(**b)[0]
    l2 = Seq2SeqTransformer(cfg, seed=2).loss_and_grads(**b)[0]
    m = Seq2SeqTransformer(cfg, seed=2)
    assert l1 == l2 and m.loss(**b) != l1  # eval loss has no dropout


@pytest.mark.parametrize("field,value,message", [
    ("d_model", 9, "divisible by n_heads"),
    ("activation", "swish", "activation must be one of"),
    ("positions", "rotary", "positions must be one of"),
    ("dropout", 1.0, "dropout must be"),
    ("n_decoder_layers", 0, "n_decoder_layers must be an integer >= 1"),
    ("norm_first", 1, "norm_first must be True or False"),
])
def test_config_errors(field, value, message):
    with pytest.raises(ValueError, match=message):
        Seq2SeqConfig(**{**TINY, field: value})


def test_config_dict_round_trip():
    cfg = Seq2SeqConfig(**TINY)
    assert Seq2SeqConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown Seq2SeqConfig field"):
        Seq2SeqConfig.from_dict({"d_modle": 8})


def test_input_errors(model):
    b = padded_batch(model.config)
    with pytest.raises(ValueError, match=r"src_ids must lie in \[0, src_vocab_size=9\), got 9"):
        model.forward(np.full((1, 3), 9), None, b["tgt_in"][:1], None)
    with pytest.raises(ValueError, match="max_src_len=6"):
        model.forward(np.zeros((1, 7), int), None, b["tgt_in"][:1], None)
    with pytest.raises(ValueError, match="max_tgt_len=5"):
        model.forward(b["src_ids"], None, np.zeros((3, 6), int), None)
    with pytest.raises(ValueError, match="same batch size"):
        model.forward(b["src_ids"][:2], None, b["tgt_in"], None)
    with pytest.raises(ValueError, match="tgt_mask must have the shape"):
        model.forward(b["src_ids"], None, b["tgt_in"], b["tgt_mask"][:, :2])
    with pytest.raises(ValueError, match="src_ids must be an integer array"):
        model.forward(b["src_ids"].astype(float), None, b["tgt_in"], None)
    with pytest.raises(ValueError, match="targets must have the shape"):
        model.loss_and_grads(**{**b, "targets": b["targets"][:, :2]})
