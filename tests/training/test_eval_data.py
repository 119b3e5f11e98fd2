"""training/eval_data.py without the command line: what `fastformer eval` scores for each kind of
model -- the run's own validation data by default, a split of another file, the warning when the
run's data changed -- and the refusal of a checkpoint of the other kind."""

import pytest
from small_runs import TEXT, lm_config, reverse_config

from fastformer.errors import FastformerError
from fastformer.training.checkpoint import checkpoint_kind, load_checkpoint, load_model
from fastformer.training.config import apply_overrides
from fastformer.training.eval_data import lm_eval_tokens, seq2seq_eval_pairs
from fastformer.training.tasks import LMTask, Seq2SeqTask
from fastformer.training.trainer import Trainer


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    data = root / "text.txt"
    data.write_text(TEXT)
    lm, s2s = str(root / "lm"), str(root / "reverse")
    Trainer(apply_overrides(lm_config(max_steps=2), [f"data.path={data}"]), lm, verbose=False).train()
    Trainer(reverse_config(max_steps=2), s2s, verbose=False).train()
    return lm, s2s, data


def test_a_language_model_scores_its_runs_validation_windows(runs):
    lm, _, data = runs
    ckpt = load_checkpoint(lm)
    config, tok = ckpt.config, ckpt.tokenizer
    got = lm_eval_tokens(config, tok, ckpt, 16)
    assert (got.ids == LMTask(config, {"tokenizer": tok}).val_ids).all()
    assert got.default_batches == config.train.eval_batches and got.warning is None
    assert got.what.startswith(f"the val split of the run's data, {data}")
    train = lm_eval_tokens(config, tok, ckpt, 16, split="train")
    assert len(train.ids) > len(got.ids) and train.default_batches is None
    whole = lm_eval_tokens(config, tok, ckpt, 16, data=str(data), split="all")
    assert len(whole.ids) == len(tok.encode(TEXT)) and whole.what == f"all of {data}"
    with pytest.raises(FastformerError, match="--split all applies to a text file"):
        lm_eval_tokens(config, tok, ckpt, 16, split="all")
    with pytest.raises(FastformerError, match="is a Hugging Face directory with no run data"):
        lm_eval_tokens(config, tok, None, 16, checkpoint="hf")


def test_changed_run_data_is_a_warning(runs, tmp_path):
    lm, _, data = runs
    ckpt = load_checkpoint(lm)
    changed = tmp_path / "changed.txt"
    changed.write_text(TEXT.upper())
    config = apply_overrides(ckpt.config, [f"data.path={changed}"])
    warning = lm_eval_tokens(config, ckpt.tokenizer, ckpt, 16).warning
    assert warning.startswith(f"the run's data {changed} changed since training")


def test_an_encoder_decoder_scores_the_trainers_held_out_strings(runs):
    _, s2s, _ = runs
    ckpt = load_checkpoint(s2s)
    model = ckpt.new_model()
    got = seq2seq_eval_pairs(ckpt, model)
    assert got.pairs == Seq2SeqTask(ckpt.config, ckpt.tokenizers).val_pairs and got.skipped == {}
    assert got.what.startswith("the trainer's 8 held-out reverse strings")
    assert len(seq2seq_eval_pairs(ckpt, model, examples=5).pairs) == 5
    with pytest.raises(FastformerError, match="--split train needs --data FILE"):
        seq2seq_eval_pairs(ckpt, model, split="train")


def test_a_checkpoint_of_the_other_kind_is_refused_by_name(runs):
    lm, s2s, _ = runs
    assert checkpoint_kind(lm) == "lm" and checkpoint_kind(s2s) == "seq2seq"
    with pytest.raises(FastformerError, match=r"holds an encoder-decoder \(data.task=reverse\), not a language "
                                              r"model: use fastformer translate or eval with it"):
        load_model(s2s)
    with pytest.raises(FastformerError, match=r"holds a language model \(data.task=text\), not an encoder-decoder: "
                                              r"use fastformer generate with it"):
        load_checkpoint(lm, "seq2seq")
