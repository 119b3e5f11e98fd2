"""Gradient accumulation (train.grad_accum_steps): the config check, a step in micro-batches
against the one-batch step, runs against grad_accum_steps=1, and exact resume."""

import json
import os

import numpy as np
import pytest
from small_runs import TEXT, make_config

from fastformer.cli import main
from fastformer.data.pairs import make_batch
from fastformer.errors import FastformerError
from fastformer.models.config import LMConfig, Seq2SeqConfig
from fastformer.models.lm import TransformerLM
from fastformer.models.seq2seq import Seq2SeqTransformer
from fastformer.training.accumulate import accumulated_loss_and_grads, counted_tokens, split_batch
from fastformer.training.config import TrainConfig, apply_overrides, preset
from fastformer.training.optim import clip_grad_norm, learning_rate, make_optimizer
from fastformer.training.tasks import make_task
from fastformer.training.trainer import Trainer


# ------------------------------------------------------------------------------- config
@pytest.mark.parametrize("kwargs, message", [
    (dict(grad_accum_steps=0), r"^train\.grad_accum_steps must be an integer >= 1, got 0$"),
    (dict(grad_accum_steps=True), r"^train\.grad_accum_steps must be an integer >= 1, got True$"),
    (dict(grad_accum_steps=2.0), r"^train\.grad_accum_steps must be an integer >= 1, got 2\.0$"),
    (dict(batch_size=10, grad_accum_steps=3),
     r"^train\.batch_size=10 is not divisible by train\.grad_accum_steps=3: .* \(e\.g\. 9 or 12\)$"),
    (dict(batch_size=2, grad_accum_steps=3), r"^train\.batch_size=2 is not divisible .* \(e\.g\. 3\)$"),
])
def test_bad_values_are_refused(kwargs, message):
    with pytest.raises(FastformerError, match=message):
        TrainConfig(**kwargs)


def test_good_values_and_the_default():
    assert TrainConfig().grad_accum_steps == 1
    assert TrainConfig(batch_size=12, grad_accum_steps=3).grad_accum_steps == 3
    assert TrainConfig(batch_size=4, grad_accum_steps=4).grad_accum_steps == 4  # one row per micro-batch
    c = apply_overrides(preset("tiny"), ["train.grad_accum_steps=4"])
    assert c.train.grad_accum_steps == 4 and isinstance(c.train.grad_accum_steps, int)
    with pytest.raises(FastformerError, match=r"train\.grad_accum_steps must be int, got 'true'"):
        apply_overrides(preset("tiny"), ["train.grad_accum_steps=true"])


@pytest.mark.parametrize("value, message", [
    ("3", "train.batch_size=32 is not divisible by train.grad_accum_steps=3: "),
    ("0", "train.grad_accum_steps must be an integer >= 1, got 0"),
    ("false", "config key train.grad_accum_steps must be int, got 'false'"),
])
def test_cli_refuses_bad_values_with_one_line(tmp_path, capsys, value, message):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--set", f"train.grad_accum_steps={value}"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()  # refused before any work


# ------------------------------------------------------------ one step, float64 models
def lm_model():
    config = LMConfig(vocab_size=23, max_seq_len=12, d_model=16, n_heads=2, d_ff=32, n_layers=2)
    return TransformerLM(config, seed=1, dtype=np.float64)


def lm_batch(B=6, T=12):
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 23, size=(B, T + 1))
    return {"ids": ids[:, :-1], "targets": ids[:, 1:]}


def seq2seq_model():
    config = Seq2SeqConfig(src_vocab_size=13, tgt_vocab_size=13, max_src_len=9, max_tgt_len=10, d_model=16,
                           n_heads=2, d_ff=32, n_encoder_layers=1, n_decoder_layers=1)
    return Seq2SeqTransformer(config, seed=1, dtype=np.float64)


def seq2seq_batch(lengths=(9, 8, 9, 3, 1, 2)):
    """Padded pairs whose rows count different numbers of targets (long rows first)."""
    rng = np.random.default_rng(3)
    src = [rng.integers(3, 13, size=max(1, n - 1)).tolist() for n in lengths]
    tgt = [rng.integers(3, 13, size=n).tolist() for n in lengths]
    return make_batch(src, tgt, pad_id=0, bos_id=1, eos_id=2)


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(b))


@pytest.mark.parametrize("kind", ["lm", "seq2seq"])
@pytest.mark.parametrize("k", [2, 3, 6])
def test_a_step_in_micro_batches_is_the_one_batch_step(backend, kind, k):
    model, batch = (lm_model(), lm_batch()) if kind == "lm" else (seq2seq_model(), seq2seq_batch())
    loss_full, _ = model.loss_and_grads(**batch)
    grad_full = model.flat.grad.copy()

    parts = split_batch(batch, k)
    counts = [counted_tokens(p["targets"]) for p in parts]
    assert len(parts) == k and sum(counts) == counted_tokens(batch["targets"])
    if kind == "seq2seq":
        assert len(set(counts)) > 1, counts  # the micro-batches really weigh differently
        mean_of_means = np.mean([model.loss_and_grads(**p)[0] for p in parts])
        assert abs(mean_of_means - loss_full) > 1e-3 * loss_full  # so the weighting is what is tested

    loss = accumulated_loss_and_grads(model, batch, k)
    assert abs(loss - loss_full) <= 1e-12 * loss_full
    assert rel_err(model.flat.grad, grad_full) <= 1e-12
    # the buffer given is the one accumulated in, and a second step gives the same again
    buffer = np.full_like(model.flat.grad, np.nan)
    assert accumulated_loss_and_grads(model, batch, k, buffer) == loss
    assert np.array_equal(buffer, model.flat.grad)


def test_one_micro_batch_is_the_models_own_call():
    model, batch = seq2seq_model(), seq2seq_batch()
    loss_full, _ = model.loss_and_grads(**batch)
    grad_full = model.flat.grad.copy()
    assert accumulated_loss_and_grads(model, batch, 1) == loss_full
    assert np.array_equal(model.flat.grad, grad_full)


def test_split_batch_rows():
    batch = seq2seq_batch()
    parts = split_batch(batch, 4)  # 6 rows: 1, 2, 1, 2
    assert [len(p["targets"]) for p in parts] == [1, 2, 1, 2]
    for name, a in batch.items():
        assert np.array_equal(np.concatenate([p[name] for p in parts]), a)
        assert all(np.shares_memory(p[name], a) for p in parts)  # views, no copies
    short = {name: a[:3] for name, a in batch.items()}  # the short last batch of an epoch of pairs
    assert [len(p["targets"]) for p in split_batch(short, 4)] == [1, 1, 1]
    model = seq2seq_model()
    loss_full, _ = model.loss_and_grads(**short)
    grad_full = model.flat.grad.copy()
    assert abs(accumulated_loss_and_grads(model, short, 4) - loss_full) <= 1e-12 * loss_full
    assert rel_err(model.flat.grad, grad_full) <= 1e-12


# ---------------------------------------------------------------------- through the trainer
def run(tmp_path, name, config, steps=None):
    trainer = Trainer(config, str(tmp_path / name), text=TEXT if config.kind == "lm" else None, verbose=False)
    return trainer, trainer.train(steps)


def metrics(path):
    with open(os.path.join(path, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_sec"} for line in f]


@pytest.mark.parametrize("kind", ["lm", "seq2seq"])
def test_a_run_in_micro_batches_follows_the_run_without(tmp_path, kind):
    # float32: the two sum the same terms in another order, so the losses agree to rounding, which
    # ten Adam steps carry forward; 1e-6 relative is a few float32 ulps (eps = 1.2e-7)
    _, one = run(tmp_path, "one", make_config(kind))
    acc, two = run(tmp_path, "two", make_config(kind, grad_accum_steps=2))
    assert acc.model.flat.dtype == np.float32 and len(two) == len(one) == 10
    np.testing.assert_allclose(two, one, rtol=1e-6)
    assert two != one  # the micro-batches did run: not the same float operations
    # the metrics stay per optimizer step: one line per step, the loss of the whole batch
    recs = metrics(str(tmp_path / "two"))
    assert [r["step"] for r in recs] == list(range(1, 11)) and [r["loss"] for r in recs] == two


@pytest.mark.parametrize("kind", ["lm", "seq2seq"])
def test_each_forward_backward_runs_on_batch_size_over_k_rows(tmp_path, kind, monkeypatch):
    config = make_config(kind, grad_accum_steps=4, max_steps=2)
    trainer = Trainer(config, str(tmp_path / "run"), text=TEXT if kind == "lm" else None, verbose=False)
    rows, real = [], trainer.model.loss_and_grads

    def counting(**batch):
        rows.append(len(batch["targets"]))
        return real(**batch)

    monkeypatch.setattr(trainer.model, "loss_and_grads", counting)
    trainer.train()
    B = config.train.batch_size
    assert rows == [B // 4] * 8  # 2 steps of 4 micro-batches


@pytest.mark.parametrize("kind", ["lm", "seq2seq"])
def test_micro_batches_see_the_examples_of_the_same_steps(tmp_path, kind, monkeypatch):
    seen = {1: [], 2: []}
    for k, batches in seen.items():
        trainer = Trainer(make_config(kind, grad_accum_steps=k, max_steps=3), str(tmp_path / f"k{k}"),
                          text=TEXT if kind == "lm" else None, verbose=False)

        def recording(real=trainer.task.next_batch, batches=batches):
            batches.append(real())
            return batches[-1]

        monkeypatch.setattr(trainer.task, "next_batch", recording)
        trainer.train()
    assert len(seen[1]) == len(seen[2]) == 3
    for a, b in zip(seen[1], seen[2]):
        assert a.keys() == b.keys() and all(np.array_equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("kind", ["lm", "seq2seq"])
def test_one_step_of_accumulation_is_the_loop_without_it_bit_for_bit(tmp_path, kind):
    # the training loop as it was before train.grad_accum_steps, written out: k=1 must stay this
    config = make_config(kind, dropout=0.1, max_steps=6)
    trainer, losses = run(tmp_path, "run", config)
    t, task = config.train, make_task(config, text=TEXT if kind == "lm" else None)
    model = task.new_model(t.seed)
    optimizer = make_optimizer(model.flat, t)
    expected = []
    for step in range(t.max_steps):
        lr = learning_rate(step, lr=t.lr, schedule=t.schedule, warmup_steps=t.warmup_steps,
                           max_steps=t.max_steps, min_lr=t.final_lr())
        loss, _ = model.loss_and_grads(**task.next_batch())
        clip_grad_norm(model.flat.grad, t.grad_clip)
        optimizer.step(lr)
        expected.append(loss)
    assert losses == expected  # exact float equality, every step
    assert np.array_equal(trainer.model.flat.data, model.flat.data)
    assert trainer.model.rng.bit_generator.state == model.rng.bit_generator.state


@pytest.mark.parametrize("kind", ["lm", "seq2seq"])
def test_resume_with_micro_batches_is_bit_for_bit(tmp_path, kind):
    config = make_config(kind, dropout=0.2, grad_accum_steps=2, max_steps=8)
    full, losses = run(tmp_path, "full", config)
    _, first = run(tmp_path, "part", config, steps=3)
    resumed = Trainer(None, str(tmp_path / "part"), resume=True, text=TEXT if kind == "lm" else None, verbose=False)
    assert resumed.step == 3 and resumed.config.train.grad_accum_steps == 2  # kept in the checkpoint's config
    assert first + resumed.train() == losses  # exact float equality, every step
    assert np.array_equal(resumed.model.flat.data, full.model.flat.data)
    assert resumed.model.rng.bit_generator.state == full.model.rng.bit_generator.state
    assert resumed.task.state_dict() == full.task.state_dict()
    assert metrics(str(tmp_path / "part")) == metrics(str(tmp_path / "full"))
