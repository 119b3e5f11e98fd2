"""Hugging Face GPT-2 directories as users hold them: float16 and bfloat16 weights load (as
float32); config fields that change the math and that fastformer's GPT-2 does not implement are
refused by name."""

import json
import os
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from fastformer import LMConfig, TransformerLM
from fastformer.errors import FastformerError
from fastformer.models.hf import save_hf


def write_safetensors(path, tensors, dtype):
    """`tensors` ({name: float32 array}) as a safetensors file of `dtype` ("F16" or "BF16",
    the upper 16 bits of each float32, which NumPy cannot write)."""
    if dtype == "F16":
        save_file({k: v.astype(np.float16) for k, v in tensors.items()}, path)
        return
    header, blobs, offset = {}, [], 0
    for name, a in tensors.items():
        raw = (np.ascontiguousarray(a, dtype=np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def rounded(a, dtype):
    """What a float32 array becomes stored in `dtype` and read back."""
    if dtype == "F16":
        return a.astype(np.float16).astype(np.float32)
    return (a.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)


@pytest.fixture
def hf_dir(tmp_path):
    model = TransformerLM(LMConfig(vocab_size=40, max_seq_len=16, d_model=16, n_heads=2, d_ff=32, n_layers=1), seed=3)
    save_hf(model, str(tmp_path / "hf"))
    return str(tmp_path / "hf"), model


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_half_precision_weights_load_as_float32(hf_dir, dtype):
    path, model = hf_dir
    sd = model.state_dict()
    write_safetensors(os.path.join(path, "model.safetensors"), sd, dtype)
    loaded = TransformerLM.from_pretrained(path)
    assert loaded.flat.data.dtype == np.float32
    for name, a in loaded.state_dict().items():
        np.testing.assert_array_equal(a, rounded(np.asarray(sd[name], dtype=np.float32), dtype), err_msg=name)
    ids = np.arange(16)[None] % 40
    np.testing.assert_allclose(loaded.forward(ids), model.forward(ids), atol=0.05)


def test_a_safetensors_header_that_lies_is_refused(hf_dir):
    path, model = hf_dir
    weights = os.path.join(path, "model.safetensors")
    write_safetensors(weights, model.state_dict(), "BF16")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) - 2)  # the last tensor's data is cut
    with pytest.raises(FastformerError, match="model.safetensors is not a readable float safetensors file"):
        TransformerLM.from_pretrained(path)


@pytest.mark.parametrize("field, value", [("scale_attn_weights", False), ("scale_attn_by_inverse_layer_idx", True),
                                          ("reorder_and_upcast_attn", True)])
def test_config_fields_fastformer_does_not_implement_are_refused_by_name(hf_dir, field, value):
    path, _ = hf_dir
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg[field] = value
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(FastformerError, match=f"{field}={str(value).lower()} is not supported"):
        TransformerLM.from_pretrained(path)


def test_save_hf_never_writes_through_a_planted_config_json(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").symlink_to(victim)
    save_hf(TransformerLM(LMConfig(vocab_size=40, max_seq_len=16, d_model=16, n_heads=2, d_ff=32, n_layers=1)),
            str(out))
    assert victim.read_text() == "precious\n"
    assert not (out / "config.json").is_symlink() and json.loads((out / "config.json").read_text())["n_embd"] == 16
