"""Fine-tuning: a run that starts from another model's weights (`fastformer train --init-from DIR`,
`Trainer(..., init_from=DIR)`), as nanoGPT's `init_from`.

DIR is a Hugging Face GPT-2 directory (config.json, model.safetensors and a tokenizer.json, e.g.
`save_pretrained` of a GPT2LMHeadModel and its fast tokenizer, or `fastformer export`) or a
fastformer checkpoint or run directory (its newest checkpoint). The new run takes DIR's model
config, tokenizer(s) and weights, and starts at step 0 with a fresh optimizer and its own seeds.
Its data and training settings start from DIR's run config (a Hugging Face directory: the
defaults, train.seq_len at most its context) and take --config/--set on top. Of the model's
settings only those that leave the weights' shapes alone may change (TUNABLE: dropout); the
others -- widths, depth, heads, context, vocabulary, positions -- are refused by name.
"""

import dataclasses
import os

from fastformer.data.tokenizer import TOKENIZER_FILE, load_tokenizer
from fastformer.errors import FastformerError, load_json
from fastformer.models.hf import is_hf_dir, lm_config_from_gpt2, read_hf
from fastformer.training.checkpoint import load_checkpoint, resolve_checkpoint
from fastformer.training.config import RunConfig, TrainConfig, load_config

TUNABLE = ("dropout",)  # model settings a fine-tuning run may change


def _check_dir(path):
    if not os.path.isdir(path):
        raise FastformerError(f"--init-from {path!r} is not a directory: give a Hugging Face GPT-2 directory "
                              f"(config.json, model.safetensors, tokenizer.json) or a fastformer run or "
                              f"checkpoint directory")


def init_config(path):
    """The RunConfig a run initialised from `path` starts from; reads configs only, no weights."""
    _check_dir(path)
    if is_hf_dir(path):
        cfg_path = os.path.join(path, "config.json")
        model = lm_config_from_gpt2(load_json(cfg_path, "Hugging Face config"), cfg_path)
        return RunConfig(model=model, train=TrainConfig(seq_len=min(TrainConfig.seq_len, model.max_seq_len)))
    config = load_config(os.path.join(resolve_checkpoint(path), "config.yaml"))
    # the tokenizer comes with the weights, not from data.tokenizer
    return dataclasses.replace(config, data=dataclasses.replace(config.data, tokenizer=None))


def load_init_source(path):
    """({name: tokenizer} as the run's task takes them, state dict of weights) of `path`."""
    _check_dir(path)
    if not is_hf_dir(path):
        ckpt = load_checkpoint(path)
        return ckpt.tokenizers, ckpt.weights
    model, weights = read_hf(path)
    if not os.path.isfile(os.path.join(path, TOKENIZER_FILE)):
        raise FastformerError(f"--init-from {path!r} has no {TOKENIZER_FILE}: fine-tuning needs the model's "
                              f"tokenizer (save it into the directory, e.g. with a fast tokenizer's "
                              f"save_pretrained)")
    tokenizer = load_tokenizer(path)
    if tokenizer.vocab_size != model.vocab_size:
        raise FastformerError(f"--init-from {path!r}: its tokenizer has {tokenizer.vocab_size} ids but the "
                              f"model's vocabulary {model.vocab_size}; fine-tuning needs the two equal")
    return {"tokenizer": tokenizer}, weights


def check_init_config(path, base, config):
    """Refuse a run `config` whose model cannot take the weights of `path` (its config `base`)."""
    if config.kind != base.kind:
        raise FastformerError(f"--init-from {path!r} holds {base.model_config().noun}, but data.task="
                              f"{config.data.task} trains {config.model_config().noun}")
    section, mine, theirs = config.model_section, config.model_config(), base.model_config()
    for f in dataclasses.fields(mine):
        a, b = getattr(mine, f.name), getattr(theirs, f.name)
        if f.name not in TUNABLE and a != b:
            raise FastformerError(f"--init-from {path!r}: {section}.{f.name}={a} differs from its {b}; the weights "
                                  f"fix the model's shape, so of the model settings only "
                                  f"{', '.join(f'{section}.{n}' for n in TUNABLE)} may change")
