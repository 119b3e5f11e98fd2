"""Hugging Face GPT-2 interchange: directories that `transformers.GPT2LMHeadModel` reads and writes.

A Hugging Face GPT-2 directory holds `config.json` (a GPT2Config) and `model.safetensors` whose
tensor names and (in, out) layouts are exactly fastformer's, so moving weights is a matter of
translating the config. Only safetensors weights are read: `pytorch_model.bin` is a pickle, and
loading a file must never run code. Nothing here imports torch or transformers.
"""

import json
import os

import numpy as np

from .model import LMConfig, TransformerLM

# GPT2Config activation names that mean the tanh-approximated GELU fastformer's LM uses
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of old checkpoints


def gpt2_config(config, bos_id=None, eos_id=None):
    """The GPT2Config dict (config.json) for an LMConfig."""
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
    """An LMConfig from a GPT2Config dict; anything fastformer's LM cannot represent is refused."""
    if cfg.get("model_type") != "gpt2":
        raise ValueError(f"{path}: model_type must be 'gpt2' (GPT-2 architecture), got {cfg.get('model_type')!r}")
    act = cfg.get("activation_function", "gelu_new")
    if act not in _TANH_GELU:
        raise ValueError(f"{path}: activation_function {act!r} is not supported; allowed: {', '.join(_TANH_GELU)}")
    eps = cfg.get("layer_norm_epsilon", 1e-5)
    if abs(eps - 1e-5) > 1e-12:
        raise ValueError(f"{path}: layer_norm_epsilon must be 1e-5, got {eps}")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
        if cfg.get(flag):
            raise ValueError(f"{path}: {flag}=true is not supported by fastformer's GPT-2")
    try:
        n_embd = cfg["n_embd"]
        return LMConfig(vocab_size=cfg["vocab_size"], max_seq_len=cfg["n_positions"], d_model=n_embd,
                        n_heads=cfg["n_head"], d_ff=cfg.get("n_inner") or 4 * n_embd, n_layers=cfg["n_layer"],
                        tie_embeddings=cfg.get("tie_word_embeddings", True))
    except KeyError as e:
        raise ValueError(f"{path}: missing GPT2Config field {e.args[0]!r}") from None


def save_hf(model, out_dir, bos_id=None, eos_id=None):
    """Write `model` as a Hugging Face GPT-2 directory (config.json, model.safetensors)."""
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in model.state_dict().items()}
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(gpt2_config(model.config, bos_id, eos_id), f, indent=2)


def load_hf(path, seed=0, dtype=np.float32):
    """A TransformerLM with the weights of a local Hugging Face GPT-2 directory."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    cfg_path = os.path.join(path, "config.json")
    weights = os.path.join(path, "model.safetensors")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{path} is not a GPT-2 model directory: no config.json")
    if not os.path.isfile(weights):
        found = [f for f in ("pytorch_model.bin", "tf_model.h5") if os.path.isfile(os.path.join(path, f))]
        raise ValueError(f"{path}: no model.safetensors (found {found or 'no weights'}); only safetensors "
                         "weights are loaded, since pickle files can run code")
    with open(cfg_path) as f:
        config = lm_config_from_gpt2(json.load(f), cfg_path)
    try:
        raw = load_file(weights)
    except (SafetensorError, OSError, TypeError) as e:
        raise ValueError(f"{weights} is not a readable float safetensors file: {e}") from None
    state = {}
    for name, arr in raw.items():
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name  # saved from GPT2Model rather than GPT2LMHeadModel
        state[name] = arr.astype(dtype, copy=False)
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)  # a tied head may be stored as a duplicate
    model = TransformerLM(config, seed=seed, dtype=dtype)
    model.load_state_dict(state)
    return model


def hf_tokenizer(tokenizer):
    """A `tokenizers.Tokenizer` that gives the same ids as a fastformer tokenizer, or None when
    its kind has no equivalent here.

    bpe   the tokenizer itself (it is one).
    byte  byte-level BPE with no merges: the vocabulary maps each byte's byte-level character to
          the byte's id, and <pad>, <bos>, <eos> are special tokens 256, 257, 258.
    char  a word-level model over single characters (the pre-tokenizer isolates every character),
          with <unk> for characters outside the vocabulary; a decoder joins tokens without spaces.
    As in every Hugging Face tokenizer, the literal text "<eos>" (etc.) in an input is read as the
    special token, where fastformer's byte and char tokenizers read it as plain characters.
    """
    if tokenizer.kind == "bpe":
        return tokenizer._tk
    import tokenizers as tk

    from .bpe import byte_level_chars

    if tokenizer.kind == "byte":
        vocab = {c: b for b, c in enumerate(byte_level_chars())}
        out = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=[]))
        out.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        out.decoder = tk.decoders.ByteLevel()
    elif tokenizer.kind == "char":
        vocab = dict(tokenizer.special_tokens)
        vocab.update({c: i for i, c in enumerate(tokenizer.chars, start=len(vocab))})
        out = tk.Tokenizer(tk.models.WordLevel(vocab=vocab, unk_token="<unk>"))
        out.pre_tokenizer = tk.pre_tokenizers.Split(tk.Regex(r"[\s\S]"), behavior="isolated")
        out.decoder = tk.decoders.Fuse()
    else:
        return None
    out.add_special_tokens(list(tokenizer.special_tokens))
    ids = [out.token_to_id(t) for t in tokenizer.special_tokens]
    assert ids == list(tokenizer.special_tokens.values()), f"special ids {ids} != {tokenizer.special_tokens}"
    return out


def export_hf(model, tokenizer, out_dir):
    """Write `model` and its tokenizer as a Hugging Face directory: model.safetensors, config.json,
    tokenizer.json and tokenizer_config.json (for PreTrainedTokenizerFast / AutoTokenizer).

    The directory is built under a temporary name and renamed into place; an existing non-empty
    `out_dir` is refused. A tokenizer kind without an equivalent is left out (with a warning).
    Returns the names of the files written.
    """
    import shutil
    import warnings

    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ValueError(f"export directory {out_dir!r} already exists and is not empty: choose a new one")
    tmp = out_dir.rstrip("/\\") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_hf(model, tmp, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
    hf_tok = hf_tokenizer(tokenizer)
    if hf_tok is None:
        warnings.warn(f"the {tokenizer.kind} tokenizer has no Hugging Face equivalent: exported the model "
                      f"without a tokenizer", stacklevel=2)
    else:
        hf_tok.save(os.path.join(tmp, "tokenizer.json"))
        names = {v: k for k, v in tokenizer.special_tokens.items()}
        tcfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model.config.max_seq_len,
                "bos_token": names[tokenizer.bos_id], "eos_token": names[tokenizer.eos_id],
                "pad_token": names[tokenizer.pad_id], "clean_up_tokenization_spaces": False}
        if "<unk>" in tokenizer.special_tokens:
            tcfg["unk_token"] = "<unk>"
        with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
            json.dump(tcfg, f, indent=2)
    wrote = sorted(os.listdir(tmp))
    if os.path.isdir(out_dir):
        os.rmdir(out_dir)  # empty, checked above
    os.replace(tmp, out_dir)
    return wrote
