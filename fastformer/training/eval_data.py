"""What an evaluation of a checkpoint scores (`fastformer eval`): by default the run's own
validation data -- the windows or pairs its trainer scored -- or a split of another file, split
as training splits it. The choice lives here, below the command line, so that tests and scripts
can ask for it without argv; the messages still name the command's options (--data, --split,
--examples), since that is where the choice is made."""

import dataclasses
import os
from typing import NamedTuple

from fastformer.data.pairs import fit_pairs, read_pairs
from fastformer.data.prepare import is_prepared_dir, load_prepared
from fastformer.data.text import load_text, split_ids
from fastformer.data.tokenizer import same_tokenizer
from fastformer.errors import FastformerError, check_memory
from fastformer.training.tasks import LMTask, Seq2SeqTask


class EvalTokens(NamedTuple):
    ids: object  # (N,) token ids to score in windows
    what: str  # a description of them, for the report
    default_batches: object  # how many batches the trainer scores of them (None: all)
    warning: object  # a line to warn with (the run's data changed since training), or None


class EvalPairs(NamedTuple):
    pairs: list  # (source, target) texts to score
    what: str
    skipped: dict  # reason -> number of pairs left out
    warning: object


def run_data_path(config, ckpt_path):
    """The data file a run trained on, checked to be here (a relative path is relative to where
    training ran)."""
    path = config.data.path
    if path and not os.path.exists(path):
        raise FastformerError(f"the run {ckpt_path} trained on {path!r}, which is not here (a relative path is "
                              f"relative to where training ran): pass the data with --data")
    return path


def changed_data_warning(ckpt, fingerprint, what):
    """The warning when the data the run names is no longer the data it trained on, else None."""
    if ckpt.state.get("data_sha256") not in (None, fingerprint):
        return (f"{what} changed since training (its fingerprint differs from the checkpoint's): its held-out split "
                f"is not the one the trainer scored")
    return None


def lm_eval_tokens(config, tokenizer, ckpt, seq_len, data=None, split=None, checkpoint=None):
    """The tokens a language model is scored on (EvalTokens): the run's own validation split (the
    trainer's windows by default) without `data`, else `split` (val, train or all; default val)
    of a text file (split as training splits it) or of a prepared directory. `ckpt` is None for
    a Hugging Face directory (`checkpoint`, its path), which has no run data."""
    split, t = split or "val", config.train
    fraction = f"its last {100 * config.data.val_fraction:g}%, as training splits it"
    if data is None:
        if ckpt is None:
            raise FastformerError(f"{checkpoint} is a Hugging Face directory with no run data: pass the text "
                                  f"to score with --data FILE")
        if split == "all":
            raise FastformerError("--split all applies to a text file (--data FILE); the run's data has a train and "
                                  "a val split")
        path = run_data_path(config, ckpt.path)
        task = LMTask(config, {"tokenizer": tokenizer})  # the trainer's data and split
        warning = changed_data_warning(ckpt, task.fingerprint, f"the run's data {path or '(the embedded corpus)'}")
        ids = task.val_ids if split == "val" else task.train_ids
        what = f"the {split} split of the run's data, {path or 'the embedded stdlib-documentation corpus'}"
        if not is_prepared_dir(path):
            what += f" ({fraction})" if split == "val" else " (all but its validation tokens)"
        return EvalTokens(ids, what, t.eval_batches if split == "val" else None, warning)
    if is_prepared_dir(data):
        prepared = load_prepared(data)
        if not same_tokenizer(prepared.tokenizer, tokenizer):
            other = " (another vocabulary)" if prepared.tokenizer.vocab_size == tokenizer.vocab_size else ""
            raise FastformerError(f"{data!r} was prepared with a {prepared.tokenizer.kind} tokenizer of "
                                  f"{prepared.tokenizer.vocab_size} ids, but the checkpoint's is {tokenizer.kind} "
                                  f"with {tokenizer.vocab_size}{other}: prepare the text with the checkpoint's "
                                  f"tokenizer")
        if split == "all":
            raise FastformerError(f"--split all applies to a text file; the prepared directory {data} has "
                                  f"a train and a val split: choose one")
        return EvalTokens(getattr(prepared, split), f"the {split} split of the prepared directory {data}", None, None)
    ids = tokenizer.encode(load_text(data))
    if split == "all":
        return EvalTokens(ids, f"all of {data}", None, None)
    train, val = split_ids(ids, config.data.val_fraction, seq_len)
    what = f"the {split} split of {data} " + (f"({fraction}; --split all scores the whole file)"
                                              if split == "val" else "(all but its validation tokens)")
    return EvalTokens(val if split == "val" else train, what, None, None)


def seq2seq_eval_pairs(ckpt, model, data=None, split=None, examples=None):
    """The pairs an encoder-decoder is scored on (EvalPairs): without `data` the trainer's
    validation pairs (held-out strings of a synthetic task; `examples` of them); with a pairs
    file its `split` (val, train, all; default val) as training splits a pairs file (the run's
    seed, val_fraction, max_pairs, ...), at most `examples` of them. Pairs too long for the
    model are skipped and counted."""
    config, (src_tok, tgt_tok) = ckpt.config, ckpt.tokenizers.values()
    given_split, split, d, t = split, split or "val", ckpt.config.data, ckpt.config.train
    n_trainer = t.eval_batches * t.batch_size
    if data is not None and d.task != "pairs":  # a synthetic run trained on no file: all of it is scored
        if split != "all" and given_split is not None:
            raise FastformerError(f"--split {split} splits a pairs file as its run's training did, but a {d.task} run "
                                  f"trained on no file: leave --split out (or --split all) to score all of {data}")
        split = "all"
    if data is None and d.task != "pairs":
        if split != "val":
            raise FastformerError(f"--split {split} needs --data FILE: a {d.task} run's training strings are drawn "
                                  f"fresh every step, its held-out strings are the val split")
        if examples is None:
            return EvalPairs(Seq2SeqTask(config, ckpt.tokenizers).val_pairs,
                             f"the trainer's {n_trainer:,} held-out {d.task} strings (--examples N for another "
                             f"number)", {}, None)
        check_memory(f"--examples {examples:,} held-out strings", examples * 2 * (d.max_len + 64))
        return EvalPairs(Seq2SeqTask(config, ckpt.tokenizers).heldout(examples), f"held-out {d.task} strings", {},
                         None)
    path = run_data_path(config, ckpt.path) if data is None else data
    if split == "all":
        if data is None:
            raise FastformerError("--split all applies to a pairs file (--data FILE); the run's data has a train "
                                  "and a val split")
        pairs, skipped = read_pairs(path, lowercase=d.lowercase)
        pairs, skipped["too long"] = fit_pairs(pairs[:examples], src_tok, tgt_tok, model.config.max_src_len,
                                               model.config.max_tgt_len)
        return EvalPairs(pairs, f"all pairs of {path}", skipped, None)
    task = Seq2SeqTask(dataclasses.replace(config, data=dataclasses.replace(d, path=path)), ckpt.tokenizers)
    warning = changed_data_warning(ckpt, task.fingerprint, f"the run's data {path}") if data is None else None
    if split == "val":
        pairs = task.val_pairs
        if data is None and examples is None:
            more = "; --examples N for more" if len(pairs) > n_trainer else ""
            train = ", which are its training pairs: data.val_fraction is 0" if not d.val_fraction else ""
            what = (f"the trainer's validation pairs of {path} ({min(n_trainer, len(pairs)):,} of "
                    f"{len(pairs):,}{more}{train})")
            return EvalPairs(pairs[:n_trainer], what, task.skipped, warning)
        return EvalPairs(pairs[:examples], f"the validation pairs of {path} (split as training splits it)",
                         task.skipped, warning)
    pairs, n_long = fit_pairs(task.train_pairs, src_tok, tgt_tok, model.config.max_src_len, model.config.max_tgt_len)
    return EvalPairs(pairs[:examples], f"the training pairs of {path} (split as training splits it)",
                     {"too long": n_long}, warning)
