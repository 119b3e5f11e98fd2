"""Hugging Face GPT-2 interchange: directories that `transformers.GPT2LMHeadModel` reads and writes.

A Hugging Face GPT-2 directory holds `config.json` (a GPT2Config) and `model.safetensors` whose
tensor names and (in, out) layouts are exactly fastformer's, so moving weights is a matter of
translating the config. Float16 and bfloat16 weights are read as float32. Only safetensors weights
are read: `pytorch_model.bin` is a pickle, and loading a file must never run code. Nothing here
imports torch or transformers; the tokenizer side of an export is `fastformer.training.export`.
"""

import json
import math
import os

import numpy as np

from fastformer.atomic import write_json_atomic
from fastformer.errors import FastformerError, check_bool, check_int, check_number, is_int, load_json, short_repr
from fastformer.models.config import LMConfig, check_model_memory

# GPT2Config activation names that mean the tanh-approximated GELU fastformer's LM uses
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of old checkpoints


def is_hf_dir(path):
    """Whether `path` is a Hugging Face model directory (a config.json) rather than a fastformer
    checkpoint (whose state.json, training/checkpoint.STATE_FILE, decides when both are there)."""
    return os.path.isfile(os.path.join(path, "config.json")) and not os.path.isfile(os.path.join(path, "state.json"))


def gpt2_config(config, bos_id=None, eos_id=None):
    """The GPT2Config dict (config.json) for an LMConfig; FastformerError for a model GPT-2
    cannot represent (sinusoidal positions)."""
    if config.positions != "learned":
        raise FastformerError(f"a language model with model.positions={config.positions} has no Hugging Face "
                              f"GPT-2 equivalent: GPT2LMHeadModel learns its position rows (wpe), so only "
                              f"model.positions=learned exports")
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": config.vocab_size,
        "n_positions": config.max_seq_len,
        "n_embd": config.d_model,
        "n_head": config.n_heads,
        "n_inner": config.d_ff,
        "n_layer": config.n_layers,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": 0.0,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
    }


def lm_config_from_gpt2(cfg, path="config.json"):
    """An LMConfig from a GPT2Config dict; anything fastformer's LM cannot represent is refused,
    and a model too large for the memory available is refused before it is built."""
    if not isinstance(cfg, dict):
        raise FastformerError(f"{path} must hold a JSON object (a GPT2Config), got {type(cfg).__name__}")
    if cfg.get("model_type") != "gpt2":
        raise FastformerError(f"{path}: model_type must be 'gpt2' (GPT-2 architecture), got {cfg.get('model_type')!r}")
    act = cfg.get("activation_function", "gelu_new")
    if not isinstance(act, str) or act not in _TANH_GELU:
        raise FastformerError(f"{path}: activation_function {act!r} is not supported; allowed: {', '.join(_TANH_GELU)}")
    eps = check_number(f"{path}: layer_norm_epsilon", cfg.get("layer_norm_epsilon", 1e-5), low=0)
    if abs(eps - 1e-5) > 1e-12:
        raise FastformerError(f"{path}: layer_norm_epsilon must be 1e-5, got {eps}")
    if not check_bool(f"{path}: scale_attn_weights", cfg.get("scale_attn_weights", True)):
        raise FastformerError(f"{path}: scale_attn_weights=false is not supported: fastformer's GPT-2 always scales "
                              f"the attention scores by 1/sqrt(head size)")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
        if check_bool(f"{path}: {flag}", cfg.get(flag, False)):
            raise FastformerError(f"{path}: {flag}=true is not supported by fastformer's GPT-2")
    missing = [k for k in ("vocab_size", "n_positions", "n_embd", "n_head", "n_layer") if k not in cfg]
    if missing:
        raise FastformerError(f"{path}: missing GPT2Config field(s) {missing}")
    sizes = {k: check_int(f"{path}: {k}", cfg[k]) for k in ("vocab_size", "n_positions", "n_embd", "n_head", "n_layer")}
    n_inner = cfg.get("n_inner")  # null: 4 * n_embd, as GPT2Config
    try:
        config = LMConfig(vocab_size=sizes["vocab_size"], max_seq_len=sizes["n_positions"], d_model=sizes["n_embd"],
                          n_heads=sizes["n_head"], n_layers=sizes["n_layer"],
                          d_ff=4 * sizes["n_embd"] if n_inner is None else check_int(f"{path}: n_inner", n_inner),
                          tie_embeddings=check_bool(f"{path}: tie_word_embeddings",
                                                    cfg.get("tie_word_embeddings", True)))
    except FastformerError as e:
        raise FastformerError(f"{path}: {e}") from None
    check_model_memory(config, f"the GPT-2 of {path}")
    return config


def save_hf(model, out_dir, bos_id=None, eos_id=None):
    """Write `model` as a Hugging Face GPT-2 directory (config.json, model.safetensors)."""
    from safetensors.numpy import save_file

    config = gpt2_config(model.config, bos_id, eos_id)  # first: a model GPT-2 cannot hold writes nothing
    os.makedirs(out_dir, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in model.state_dict().items()}
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    write_json_atomic(config, os.path.join(out_dir, "config.json"), indent=2)


def read_hf(path, dtype=np.float32):
    """(LMConfig, state dict of `dtype` arrays) of a local Hugging Face GPT-2 directory;
    `TransformerLM.from_pretrained(path)` builds the model from them."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    cfg_path = os.path.join(path, "config.json")
    weights = os.path.join(path, "model.safetensors")
    if not os.path.isfile(cfg_path):
        raise FastformerError(f"{path} is not a GPT-2 model directory: no config.json")
    if not os.path.isfile(weights):
        found = [f for f in ("pytorch_model.bin", "tf_model.h5") if os.path.isfile(os.path.join(path, f))]
        raise FastformerError(f"{path}: no model.safetensors (found {found or 'no weights'}); only safetensors "
                         "weights are loaded, since pickle files can run code")
    config = lm_config_from_gpt2(load_json(cfg_path, "Hugging Face config"), cfg_path)
    try:
        raw = load_file(weights)
    except TypeError:  # a dtype NumPy has no type for: bfloat16 is read here, others are refused by name
        raw = _read_float_safetensors(weights)
    except (SafetensorError, OSError) as e:
        raise FastformerError(f"{weights} is not a readable float safetensors file: {e}") from None
    state = {}
    for name, arr in raw.items():
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name  # saved from GPT2Model rather than GPT2LMHeadModel
        state[name] = arr.astype(dtype, copy=False)
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)  # a tied head may be stored as a duplicate
    return config, state


# safetensors dtypes read by _read_float_safetensors: little-endian floats; BF16 as its 16 bits
_SAFETENSORS_FLOATS = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}


def _read_float_safetensors(path):
    """{name: float32 array} of a safetensors file of float tensors, BF16 (the upper half of a
    float32, which NumPy has no type for) included; anything else is a FastformerError naming
    the file. The layout is checked before a byte of data is read: an 8-byte header length, a
    JSON header of {name: {dtype, shape, data_offsets}}, then the data."""
    def bad(what):
        return FastformerError(f"{path} is not a readable float safetensors file: {what}")

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or not 0 < n <= size - 8:
            raise bad(f"its header length {n} does not fit its {size} bytes")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (ValueError, RecursionError):
            raise bad("its header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 8 + n else np.zeros(0, np.uint8)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], list(info["shape"]), info["data_offsets"]
            known = isinstance(dtype, str) and dtype in _SAFETENSORS_FLOATS
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {short_repr(name)} has no dtype, shape and data_offsets") from None
        if not known:
            raise bad(f"tensor {short_repr(name)} has dtype {short_repr(dtype)}; allowed: "
                      f"{', '.join(_SAFETENSORS_FLOATS)}")
        itemsize = np.dtype(_SAFETENSORS_FLOATS[dtype]).itemsize
        if not (all(is_int(v) and v >= 0 for v in (*shape, start, end)) and start <= end <= data.size
                and end - start == itemsize * math.prod(shape)):
            raise bad(f"tensor {short_repr(name)} of shape {short_repr(shape)} lies outside the file or has the "
                      f"wrong size")
        a = data[start:end].view(_SAFETENSORS_FLOATS[dtype]).reshape(shape)
        out[name] = (a.astype(np.uint32) << 16).view(np.float32) if dtype == "BF16" else a.astype(np.float32)
    return out
