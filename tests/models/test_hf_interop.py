"""Hugging Face GPT-2 interchange, against transformers.GPT2LMHeadModel saved and loaded
locally (skips when transformers or torch is absent)."""

import json

import numpy as np
import pytest

from fastformer import LMConfig, TransformerLM
from fastformer.models.hf import gpt2_config, save_hf

load_hf = TransformerLM.from_pretrained

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _hf_logits(path, ids):
    model = transformers.GPT2LMHeadModel.from_pretrained(path, local_files_only=True)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("tie", [True, False])
def test_export_loads_in_transformers_with_same_logits(tmp_path, tie):
    cfg = LMConfig(vocab_size=61, max_seq_len=24, d_model=32, n_heads=4, d_ff=80, n_layers=2, tie_embeddings=tie)
    model = TransformerLM(cfg, seed=5)
    model.flat.data[:] += np.random.default_rng(0).normal(0, 0.05, model.flat.size).astype(np.float32)
    save_hf(model, tmp_path)
    ids = np.random.default_rng(1).integers(0, 61, size=(2, 24))
    np.testing.assert_allclose(_hf_logits(tmp_path, ids), model.forward(ids), atol=1e-4)


def test_from_pretrained_reads_a_transformers_checkpoint(tmp_path):
    hf_cfg = transformers.GPT2Config(vocab_size=53, n_positions=20, n_embd=24, n_head=3, n_layer=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(hf_cfg)
    hf.save_pretrained(tmp_path)
    model = TransformerLM.from_pretrained(tmp_path)
    assert model.config.d_ff == 96 and model.config.tie_embeddings
    ids = np.random.default_rng(2).integers(0, 53, size=(3, 20))
    np.testing.assert_allclose(model.forward(ids), _hf_logits(tmp_path, ids), atol=1e-4)
    # and back again: fastformer's export of it loads with the same logits
    save_hf(model, tmp_path / "again")
    np.testing.assert_allclose(load_hf(tmp_path / "again").forward(ids), model.forward(ids), atol=0)


def test_refuses_other_architectures_and_pickles(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="no model.safetensors"):
        load_hf(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="model_type must be 'gpt2'.*got 'llama'"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "activation_function": "relu"}))
    with pytest.raises(ValueError, match="activation_function 'relu' is not supported"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8}))
    with pytest.raises(ValueError, match="missing GPT2Config field"):
        load_hf(tmp_path)
    cfg = LMConfig(vocab_size=10, max_seq_len=4, d_model=8, n_heads=2, d_ff=8, n_layers=1)
    (tmp_path / "config.json").write_text(json.dumps(gpt2_config(cfg)))
    with pytest.raises(ValueError, match="not a readable float safetensors file"):
        load_hf(tmp_path)
    with pytest.raises(ValueError, match="not a GPT-2 model directory"):
        load_hf(tmp_path / "nowhere")
