"""model.positions for the language model: learned rows (GPT-2) or the fixed sinusoidal table --
what the table adds, the Hugging Face export's refusal, and configs saved before the field
existed. The finite-difference gradients (tests/models/test_lm.py) and the decoding tests
(tests/models/test_kv_cache.py) run with both kinds of positions."""

import hashlib
import json
import math
import os

import numpy as np
import pytest
import yaml

from fastformer import FastformerError, LMConfig, TransformerLM
from fastformer.models.hf import save_hf
from fastformer.nn.blocks import sinusoidal_table
from fastformer.training.checkpoint import STATE_FILE, load_checkpoint, load_model
from fastformer.training.config import RunConfig, TrainConfig
from fastformer.training.trainer import Trainer

TINY = dict(vocab_size=11, max_seq_len=8, d_model=8, n_heads=2, d_ff=12, n_layers=2, positions="sinusoidal")
CFG = LMConfig(vocab_size=50, max_seq_len=24, d_model=32, n_heads=4, d_ff=64, n_layers=2, positions="sinusoidal")


@pytest.fixture
def model(backend):
    m = TransformerLM(CFG, seed=0)
    # larger weights than the init, so greedy paths are not all one token
    m.flat.data[:] = np.random.default_rng(0).normal(0, 0.3, m.flat.size).astype(np.float32)
    return m


def test_sinusoidal_has_no_position_parameters_and_adds_the_fixed_table():
    learned = TransformerLM(LMConfig(**{**TINY, "positions": "learned"}))
    sin = TransformerLM(LMConfig(**TINY))
    assert "transformer.wpe.weight" in learned.state_dict() and "transformer.wpe.weight" not in sin.state_dict()
    assert learned.num_parameters() - sin.num_parameters() == 8 * 8  # max_seq_len x d_model
    ids = np.array([[3, 3, 3, 5]])
    x, _ = sin.embed.forward(sin.params, ids, table=sin.pos_table)
    want = sin.params["transformer.wte.weight"][ids] * math.sqrt(8) + sinusoidal_table(8, 8)[:4]
    np.testing.assert_allclose(x, want, rtol=1e-6)
    # the same token at different positions gets different logits; without positions it would not
    logits = sin.forward(ids)[0]
    assert not np.allclose(logits[0], logits[1]) and not np.allclose(logits[1], logits[2])
    # the token rows keep GPT-2's init, so the tied head starts near uniform: loss near ln V
    rng = np.random.default_rng(0)
    big = TransformerLM(LMConfig(vocab_size=97, max_seq_len=32, d_model=64, n_heads=4, d_ff=128, n_layers=2,
                                 positions="sinusoidal"))
    loss = big.loss(rng.integers(0, 97, (4, 32)), rng.integers(0, 97, (4, 32)))
    assert abs(loss - math.log(97)) < 0.1


def test_sinusoidal_decoding_does_not_use_the_fused_kernel(model):
    # (tests/models/test_kv_cache.py runs every decoding test with sinusoidal positions too)
    cache = model.init_state(1)
    model.step(np.array([[1, 2]]), cache)
    np.testing.assert_allclose(model.step(np.array([[3]]), cache), model.forward(np.array([[1, 2, 3]]))[:, -1:],
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(FastformerError, match="fused decoding kernel reads learned position rows"):
        model.packed_weights()


def test_hf_export_refuses_a_sinusoidal_model(tmp_path):
    with pytest.raises(FastformerError, match="model.positions=sinusoidal has no Hugging Face GPT-2 equivalent"):
        save_hf(TransformerLM(LMConfig(**TINY)), tmp_path / "hf")
    assert not os.path.exists(tmp_path / "hf")


@pytest.mark.parametrize("kwargs, match", [
    (dict(positions="rotary"), "positions must be one of learned, sinusoidal, got 'rotary'"),
    (dict(positions="sinusoidal", d_model=9, n_heads=3), "positions='sinusoidal' needs an even d_model, got 9"),
])
def test_bad_positions(kwargs, match):
    with pytest.raises(FastformerError, match=match):
        LMConfig(**kwargs)


def test_a_checkpoint_saved_without_positions_loads_as_learned(tmp_path):
    """Checkpoints written before model.positions existed have no such key in config.yaml."""
    config = RunConfig(model=LMConfig(max_seq_len=16, d_model=16, n_heads=2, d_ff=32, n_layers=1),
                       train=TrainConfig(batch_size=2, seq_len=16, max_steps=2, eval_interval=2, eval_batches=1))
    run = str(tmp_path / "r")
    Trainer(config, run, text="abcd " * 200, verbose=False).train()
    ckpt = os.path.join(run, "ckpt-000002")
    for path in (os.path.join(ckpt, "config.yaml"), os.path.join(run, "config.yaml")):
        with open(path) as f:
            d = yaml.safe_load(f)
        del d["model"]["positions"]
        with open(path, "w") as f:
            yaml.safe_dump(d, f, sort_keys=False)
    with open(os.path.join(ckpt, STATE_FILE)) as f:  # as the old checkpoint recorded it
        state = json.load(f)
    with open(os.path.join(ckpt, "config.yaml"), "rb") as f:
        state["files"]["config.yaml"] = hashlib.sha256(f.read()).hexdigest()
    with open(os.path.join(ckpt, STATE_FILE), "w") as f:
        json.dump(state, f)
    assert load_checkpoint(run).config.model.positions == "learned"
    model, _, _ = load_model(run)
    assert "transformer.wpe.weight" in model.state_dict()
    trainer = Trainer(None, run, resume=True, text="abcd " * 200, verbose=False)  # and it resumes
    assert trainer.step == 2 and trainer.config.model.positions == "learned"
