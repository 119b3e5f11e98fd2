"""Export of a trained language model and its tokenizer as a Hugging Face directory that
`transformers` (GPT2LMHeadModel, AutoTokenizer) loads as it is."""

import json
import os
import shutil

from fastformer.atomic import atomic_dir, temp_target
from fastformer.data.bpe import byte_level_chars
from fastformer.errors import FastformerError
from fastformer.models.hf import save_hf
from fastformer.training.checkpoint import safetensors_errors


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


EXPORT_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}


def _remove_killed_exports(out_dir):
    """Delete the temporary directories of `out_dir` a killed export left (`<out_dir>.tmp-XXXXXXXX`
    holding only files an export writes); any other file or directory of such a name is left alone."""
    parent, name = os.path.split(os.path.normpath(out_dir))
    parent = parent or "."
    if not os.path.isdir(parent):
        return
    for entry in os.scandir(parent):
        if temp_target(entry.name) == name and entry.is_dir(follow_symlinks=False) \
                and set(os.listdir(entry.path)) <= EXPORT_FILES:
            shutil.rmtree(entry.path)


def export_hf(model, tokenizer, out_dir):
    """Write `model` and its tokenizer as a Hugging Face directory: model.safetensors, config.json,
    tokenizer.json and tokenizer_config.json (for PreTrainedTokenizerFast / AutoTokenizer).

    The directory is built under a fresh temporary name beside `out_dir` and renamed into place
    (fastformer.atomic.atomic_dir); the temporary directories of `out_dir` a killed export left are
    deleted first (`_remove_killed_exports`), nothing else is created or deleted. An existing non-empty
    `out_dir`, or one that is not a directory, is refused. A tokenizer kind without an equivalent
    is left out (with a warning). Returns the names of the files written.
    """
    import warnings

    out_dir = os.fspath(out_dir)
    if not out_dir:
        raise FastformerError("the export directory (--out) is an empty path: name a new directory")
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise FastformerError(f"export directory {out_dir!r} exists and is not a directory: choose a new one")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise FastformerError(f"export directory {out_dir!r} already exists and is not empty: choose a new one")
    _remove_killed_exports(out_dir)
    with atomic_dir(out_dir) as tmp:
        with safetensors_errors(out_dir):
            save_hf(model, tmp, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
        hf_tok = hf_tokenizer(tokenizer)
        if hf_tok is None:
            warnings.warn(f"the {tokenizer.kind} tokenizer has no Hugging Face equivalent: exported the model "
                          f"without a tokenizer", stacklevel=2)
        else:
            with open(os.path.join(tmp, "tokenizer.json"), "w", encoding="utf-8") as f:
                f.write(hf_tok.to_str(pretty=True))  # what Tokenizer.save writes, with Python's file errors
            names = {v: k for k, v in tokenizer.special_tokens.items()}
            tcfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model.config.max_seq_len,
                    "bos_token": names[tokenizer.bos_id], "eos_token": names[tokenizer.eos_id],
                    "pad_token": names[tokenizer.pad_id], "clean_up_tokenization_spaces": False}
            if "<unk>" in tokenizer.special_tokens:
                tcfg["unk_token"] = "<unk>"
            with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
                json.dump(tcfg, f, indent=2)
        wrote = sorted(os.listdir(tmp))
    return wrote
