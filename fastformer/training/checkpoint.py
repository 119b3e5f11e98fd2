"""Checkpoints: everything needed to resume a run exactly, or to load a model for generation.

A run directory holds the resolved `config.yaml`, `metrics.jsonl` and one directory per
checkpoint, newest last:

    RUN/ckpt-000500/
        model.safetensors      weights, Hugging Face GPT-2 names
        optimizer.safetensors  optimizer state as flat arrays (the layout of the flat buffer)
        config.yaml            the resolved RunConfig (its data.task tells the model kind)
        tokenizer.json         a language model's tokenizer (see fastformer.tokenizer), or
        src_tokenizer/tokenizer.json, tgt_tokenizer/tokenizer.json   an encoder-decoder's two
        state.json             step, model kind, the bit-generator state of every RNG (the data's:
                               its task's position), the data fingerprint, and the SHA-256 of
                               each file above

A checkpoint is written into `ckpt-000500.tmp/` (every file fsynced) and then renamed into place,
so a run killed at any moment leaves the previous checkpoint whole; `state.json` is written last
and its checksums reject a file that was truncated or altered later. Only safetensors, JSON and
YAML are read: loading never executes code.
"""

import hashlib
import json
import os
import re
import shutil

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from fastformer.atomic import write_json_atomic
from fastformer.data.tokenizer import TOKENIZER_FILE, load_tokenizer
from fastformer.errors import FastformerError
from fastformer.models.lm import TransformerLM
from fastformer.models.seq2seq import Seq2SeqTransformer
from fastformer.training.config import load_config, save_config

FORMAT_VERSION = 1
STATE_FILE = "state.json"
_CKPT_RE = re.compile(r"^ckpt-(\d+)$")
# the tokenizers of each model kind: name -> directory inside the checkpoint
TOKENIZER_DIRS = {"lm": {"tokenizer": "."}, "seq2seq": {"src": "src_tokenizer", "tgt": "tgt_tokenizer"}}


def _fsync_file(path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_dirs(run_dir):
    """Complete checkpoint directories of a run, oldest first."""
    if not os.path.isdir(run_dir):
        return []
    found = []
    for name in os.listdir(run_dir):
        m = _CKPT_RE.match(name)
        if m and os.path.isfile(os.path.join(run_dir, name, STATE_FILE)):
            found.append((int(m.group(1)), os.path.join(run_dir, name)))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir):
    """The newest checkpoint directory of a run; FastformerError when there is none."""
    dirs = checkpoint_dirs(run_dir)
    if not dirs:
        raise FastformerError(f"no checkpoint in {run_dir!r}: expected a directory ckpt-NNNNNN holding "
                              f"{STATE_FILE} (written by fastformer train)")
    return dirs[-1]


def resolve_checkpoint(path):
    """A checkpoint directory from either a checkpoint directory or a run directory (its newest)."""
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return path
    return latest_checkpoint(path)


def save_checkpoint(run_dir, step, model, optimizer, config, tokenizers, rng_states, extra=None,
                    keep=2):
    """Write RUN/ckpt-<step> atomically and delete all but the newest `keep` checkpoints.

    Args:
        tokenizers: {name: tokenizer} with the names of TOKENIZER_DIRS[config.kind].
        rng_states: {name: bit_generator.state dict} of every generator the run uses.
        extra: more JSON-able fields for state.json (e.g. the data fingerprint).
    Returns the checkpoint directory.
    """
    final = os.path.join(run_dir, f"ckpt-{step:06d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    weights = {n: np.ascontiguousarray(a) for n, a in model.state_dict().items()}
    save_file(weights, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    save_file({n: np.ascontiguousarray(a) for n, a in optimizer.state_dict().items()},
              os.path.join(tmp, "optimizer.safetensors"), metadata={"optimizer": type(optimizer).__name__})
    save_config(config, os.path.join(tmp, "config.yaml"))
    names = ["model.safetensors", "optimizer.safetensors", "config.yaml"]
    for name, sub in TOKENIZER_DIRS[config.kind].items():
        tokenizers[name].save(os.path.join(tmp, sub))
        names.append(os.path.normpath(os.path.join(sub, TOKENIZER_FILE)))
    files = {}
    for name in names:
        _fsync_file(os.path.join(tmp, name))
        files[name] = _sha256(os.path.join(tmp, name))
    state = {"format_version": FORMAT_VERSION, "step": step, "model_kind": config.kind, "rng": rng_states,
             "files": files, **(extra or {})}
    write_json_atomic(state, os.path.join(tmp, STATE_FILE))
    _fsync_dir(tmp)
    if os.path.exists(final):  # re-saving the same step (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(run_dir)
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


class Checkpoint:
    """A loaded checkpoint: `config` (RunConfig), `tokenizers` ({name: tokenizer}, see
    TOKENIZER_DIRS), `weights` and `optimizer_state` ({name: array}), `state` (the state.json
    dict) and `path`."""

    def __init__(self, path, config, tokenizers, weights, optimizer_state, state):
        self.path, self.config, self.tokenizers = path, config, tokenizers
        self.weights, self.optimizer_state, self.state = weights, optimizer_state, state

    @property
    def step(self):
        return self.state["step"]

    @property
    def tokenizer(self):
        """A language model's tokenizer."""
        return self.tokenizers["tokenizer"]

    def new_model(self):
        """The checkpoint's model (TransformerLM or Seq2SeqTransformer) with its weights."""
        c = self.config
        model = (TransformerLM(c.model, seed=c.train.seed) if c.kind == "lm"
                 else Seq2SeqTransformer(c.seq2seq, seed=c.train.seed))
        model.load_state_dict(self.weights)
        return model


def load_checkpoint(path):
    """Load and verify a checkpoint (a checkpoint directory, or a run directory: its newest).

    A missing, truncated or altered file raises FastformerError naming it.
    """
    path = resolve_checkpoint(path)
    state_path = os.path.join(path, STATE_FILE)
    try:
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
        files, step = state["files"], state["step"]
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise FastformerError(f"checkpoint {path!r} is corrupt: cannot read {STATE_FILE} ({e})") from None
    if state.get("format_version") != FORMAT_VERSION:
        raise FastformerError(f"checkpoint {path!r} has format_version {state.get('format_version')!r}; "
                              f"this fastformer reads version {FORMAT_VERSION}")
    for name, digest in files.items():
        fpath = os.path.join(path, name)
        if not os.path.isfile(fpath):
            raise FastformerError(f"checkpoint {path!r} is incomplete: {name} is missing")
        if _sha256(fpath) != digest:
            raise FastformerError(f"checkpoint file {fpath!r} is corrupt or truncated (its SHA-256 does not "
                                  f"match the one recorded at step {step}); older checkpoints of this run: "
                                  f"{[d for d in checkpoint_dirs(os.path.dirname(path) or '.') if d != path]}")
    try:
        weights = load_file(os.path.join(path, "model.safetensors"))
        optimizer_state = load_file(os.path.join(path, "optimizer.safetensors"))
    except (SafetensorError, OSError) as e:
        raise FastformerError(f"checkpoint {path!r} holds an unreadable safetensors file: {e}") from None
    config = load_config(os.path.join(path, "config.yaml"))
    if state.get("model_kind", "lm") != config.kind:
        raise FastformerError(f"checkpoint {path!r} is corrupt: state.json says model kind "
                              f"{state.get('model_kind')!r} but its config trains a {config.kind} "
                              f"(data.task={config.data.task})")
    tokenizers = {name: load_tokenizer(os.path.join(path, sub)) for name, sub in TOKENIZER_DIRS[config.kind].items()}
    return Checkpoint(path, config, tokenizers, weights, optimizer_state, state)


def load_model(path):
    """(TransformerLM, tokenizer, RunConfig) for inference, from a checkpoint or run directory or
    a Hugging Face GPT-2 directory (config.json, model.safetensors, tokenizer.json; e.g. one
    written by `fastformer export`). A directory of another architecture is refused by name."""
    if not os.path.isfile(os.path.join(path, STATE_FILE)) and os.path.isfile(os.path.join(path, "config.json")):
        from fastformer.training.config import RunConfig, TrainConfig

        model = TransformerLM.from_pretrained(path)
        tokenizer = load_tokenizer(path)
        if tokenizer.vocab_size > model.config.vocab_size:
            raise FastformerError(f"{path}: the tokenizer has {tokenizer.vocab_size} ids but the model only "
                                  f"{model.config.vocab_size}")
        seq_len = min(TrainConfig.seq_len, model.config.max_seq_len)
        return model, tokenizer, RunConfig(model=model.config, train=TrainConfig(seq_len=seq_len))
    ckpt = load_checkpoint(path)
    if ckpt.config.kind != "lm":
        raise FastformerError(f"{ckpt.path} holds an encoder-decoder (data.task={ckpt.config.data.task}), not a "
                              f"language model: use fastformer translate or eval with it")
    return ckpt.new_model(), ckpt.tokenizer, ckpt.config

