"""The trainer: exact resume, atomic and verified checkpoints, metrics, non-finite stop, data."""

import hashlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from fastformer.data.text import default_corpus, eval_batches, get_batch, split_ids
from fastformer.errors import FastformerError
from fastformer.training.checkpoint import checkpoint_dirs, latest_checkpoint, load_checkpoint, load_model
from fastformer.training.config import ModelConfig, RunConfig, TrainConfig
from fastformer.training.trainer import NonFiniteLossError, Trainer

WORDS = "the cat sat on a mat while one dog ran to its red ball and every bird sang".split()


def make_text(n_words=1500, seed=0):
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, size=n_words)) + " ünïcödé ✓\n"


TEXT = make_text()


def tiny_config(dropout=0.0, optimizer="adamw", **train):
    model = ModelConfig(max_seq_len=16, d_model=16, n_heads=2, d_ff=32, n_layers=1, dropout=dropout)
    t = dict(batch_size=4, seq_len=16, max_steps=8, lr=3e-3, min_lr=3e-4, warmup_steps=2, optimizer=optimizer,
             log_interval=1, eval_interval=4, eval_batches=2, checkpoint_interval=100, keep_checkpoints=2)
    t.update(train)
    return RunConfig(model=model, train=TrainConfig(**t))


def metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _bf16_here():
    from fastformer.kernels import get_ops

    return "bfloat16" in get_ops().matmul_precisions["float32"]


@pytest.mark.parametrize("dropout, optimizer, precision", [(0.0, "adamw", "fp32"), (0.2, "adamw", "fp32"),
                                                           (0.1, "sgd", "fp32"), (0.2, "adamw", "bf16")])
def test_resume_is_bit_for_bit(tmp_path, dropout, optimizer, precision):
    if precision == "bf16" and not _bf16_here():
        pytest.skip("this backend and CPU have no bfloat16 matrix products")
    config = tiny_config(dropout, optimizer, precision=precision)
    full = Trainer(config, str(tmp_path / "full"), text=TEXT, verbose=False)
    losses_full = full.train()
    assert len(losses_full) == 8

    part = Trainer(config, str(tmp_path / "part"), text=TEXT, verbose=False)
    losses_a = part.train(steps=3)  # stops mid-run (mid warm-up/decay) with a checkpoint
    assert os.path.basename(latest_checkpoint(str(tmp_path / "part"))) == "ckpt-000003"
    del part
    resumed = Trainer(None, str(tmp_path / "part"), resume=True, text=TEXT, verbose=False)
    assert resumed.step == 3
    losses_b = resumed.train()

    assert losses_a + losses_b == losses_full  # exact float equality, every step
    assert np.array_equal(resumed.model.flat.data, full.model.flat.data)
    assert resumed.model.rng.bit_generator.state == full.model.rng.bit_generator.state
    strip = lambda recs: [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in recs]  # noqa: E731
    assert strip(metrics(str(tmp_path / "part"))) == strip(metrics(str(tmp_path / "full")))


def test_bf16_changes_the_losses_a_little(tmp_path):
    # guards the bf16 case above: the products really are bfloat16 (and the run records it)
    if not _bf16_here():
        pytest.skip("this backend and CPU have no bfloat16 matrix products")
    a = Trainer(tiny_config(), str(tmp_path / "a"), text=TEXT, verbose=False).train(steps=3)
    b = Trainer(tiny_config(precision="bf16"), str(tmp_path / "b"), text=TEXT, verbose=False).train(steps=3)
    assert a != b and max(abs(x - y) for x, y in zip(a, b)) < 0.01 * a[0]
    assert load_checkpoint(str(tmp_path / "b")).config.train.precision == "bf16"


def test_auto_precision_is_decided_once_and_recorded(tmp_path, monkeypatch):
    """auto: bf16 where the backend runs it natively, else fp32; the run records the concrete value
    (so it resumes in it bit for bit), and the caller's config keeps "auto"."""
    from fastformer.kernels import get_ops, use_backend

    config = tiny_config(precision="auto", max_steps=1)
    native = get_ops().name != "numpy" and _bf16_here()
    run = Trainer(config, str(tmp_path / "here"), text=TEXT, verbose=False)
    assert run.config.train.precision == ("bf16" if native else "fp32") and config.train.precision == "auto"
    run.train()
    assert load_checkpoint(str(tmp_path / "here")).config.train.precision == run.config.train.precision
    with use_backend("numpy"):  # the reference's bfloat16 is a specification, not a speed-up
        assert Trainer(config, str(tmp_path / "ref"), text=TEXT, verbose=False).config.train.precision == "fp32"
    monkeypatch.setattr(get_ops(), "matmul_precisions", {"float32": ("float32",), "float64": ("float64",)})
    assert Trainer(config, str(tmp_path / "no-bf16"), text=TEXT, verbose=False).config.train.precision == "fp32"


def test_dropout_changes_the_losses(tmp_path):
    # guards the test above: with dropout the dropout generator really is in play
    a = Trainer(tiny_config(0.0), str(tmp_path / "a"), text=TEXT, verbose=False).train(steps=2)
    b = Trainer(tiny_config(0.2), str(tmp_path / "b"), text=TEXT, verbose=False).train(steps=2)
    assert a[0] != b[0]


def test_truncated_checkpoint_is_rejected_and_the_previous_one_loads(tmp_path):
    run = str(tmp_path / "run")
    trainer = Trainer(tiny_config(checkpoint_interval=2, max_steps=4), run, text=TEXT, verbose=False)
    trainer.train()
    older, newest = checkpoint_dirs(run)
    assert os.path.basename(older) == "ckpt-000002" and os.path.basename(newest) == "ckpt-000004"
    weights4 = {n: p.copy() for n, p in trainer.model.state_dict().items()}

    path = os.path.join(newest, "model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(FastformerError, match=r"model\.safetensors' is corrupt or truncated.*ckpt-000002"):
        load_checkpoint(run)
    with pytest.raises(FastformerError, match="corrupt or truncated"):
        Trainer(None, run, resume=True, text=TEXT, verbose=False)

    ckpt = load_checkpoint(older)
    assert ckpt.step == 2
    assert not np.array_equal(ckpt.weights["transformer.wte.weight"], weights4["transformer.wte.weight"])
    model, tok, cfg = load_model(older)
    assert cfg == trainer.config and tok.vocab_size == 259
    np.testing.assert_array_equal(model.state_dict()["transformer.wte.weight"], ckpt.weights["transformer.wte.weight"])


@pytest.mark.parametrize("name", ["optimizer.safetensors", "state.json", "config.yaml"])
def test_other_damaged_files_are_rejected(tmp_path, name):
    run = str(tmp_path / "run")
    Trainer(tiny_config(max_steps=2), run, text=TEXT, verbose=False).train()
    path = os.path.join(latest_checkpoint(run), name)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 3)
    with pytest.raises(FastformerError, match="corrupt"):
        load_checkpoint(run)


def test_half_written_checkpoint_is_ignored(tmp_path):
    run = str(tmp_path / "run")
    Trainer(tiny_config(max_steps=2), run, text=TEXT, verbose=False).train()
    # a run killed while writing leaves ckpt-000004.tmp (and no final directory)
    os.makedirs(os.path.join(run, "ckpt-000004.tmp"))
    with open(os.path.join(run, "ckpt-000004.tmp", "model.safetensors"), "wb") as f:
        f.write(b"\x00" * 10)
    assert load_checkpoint(run).step == 2


def test_keeps_only_the_newest_checkpoints(tmp_path):
    run = str(tmp_path / "run")
    Trainer(tiny_config(checkpoint_interval=1, keep_checkpoints=2, max_steps=5), run, text=TEXT, verbose=False).train()
    assert [os.path.basename(d) for d in checkpoint_dirs(run)] == ["ckpt-000004", "ckpt-000005"]
    assert not [n for n in os.listdir(run) if n.endswith(".tmp")]


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    run = str(tmp_path / "run")
    trainer = Trainer(tiny_config(checkpoint_interval=2), run, text=TEXT, verbose=False)
    trainer.train(steps=2)
    good = trainer.model.flat.data.copy()
    real = trainer.model.loss_and_grads
    monkeypatch.setattr(trainer.model, "loss_and_grads", lambda **batch: (float("nan"), real(**batch)[1]))
    with pytest.raises(NonFiniteLossError, match=r"step 3: loss=nan.*last good checkpoint is .*ckpt-000002"):
        trainer.train()
    assert np.array_equal(trainer.model.flat.data, good)  # the bad step did not update the weights
    assert [os.path.basename(d) for d in checkpoint_dirs(run)] == ["ckpt-000002"]
    assert load_checkpoint(run).step == 2


def test_metrics_lines(tmp_path):
    run = str(tmp_path / "run")
    Trainer(tiny_config(log_interval=2, eval_interval=4, max_steps=8), run, text=TEXT, verbose=False).train()
    recs = metrics(run)
    assert [r["step"] for r in recs] == [2, 4, 6, 8]
    for r in recs:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec"} <= set(r)
        assert r["tokens_per_sec"] > 0 and r["grad_norm"] > 0 and math.isfinite(r["loss"])
    evals = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in evals] == [4, 8]
    for r in evals:
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
        assert 0.0 <= r["val_acc"] <= 1.0


def test_loss_falls_and_eval_is_deterministic(tmp_path):
    trainer = Trainer(tiny_config(max_steps=40, lr=1e-2, warmup_steps=0), str(tmp_path / "run"), text=TEXT,
                      verbose=False)
    before = trainer.evaluate()
    assert trainer.evaluate() == before  # the same windows, no randomness
    losses = trainer.train()
    after = trainer.evaluate()
    assert np.mean(losses[-5:]) < losses[0] - 1.5
    assert after["val_loss"] < before["val_loss"] - 1.5 and after["val_acc"] > before["val_acc"]


def test_refuses_to_overwrite_a_run(tmp_path):
    run = str(tmp_path / "run")
    Trainer(tiny_config(max_steps=1), run, text=TEXT, verbose=False).train()
    with pytest.raises(FastformerError, match="already holds checkpoints"):
        Trainer(tiny_config(max_steps=1), run, text=TEXT, verbose=False)
    with pytest.raises(FastformerError, match="no checkpoint in"):
        Trainer(None, str(tmp_path / "empty"), resume=True, text=TEXT, verbose=False)


def test_batches_and_split():
    ids = np.arange(1000)
    train, val = split_ids(ids, 0.1, 16)
    assert len(train) == 900 and len(val) == 100 and val[0] == 900
    x, y = get_batch(train, 8, 16, np.random.default_rng(0))
    assert x.shape == y.shape == (8, 16) and np.array_equal(y, x + 1)  # y is x shifted by one token
    x2, _ = get_batch(train, 8, 16, np.random.default_rng(0))
    assert np.array_equal(x, x2)
    wins = [x for x, _ in eval_batches(val, 2, 16, 10)]
    starts = np.concatenate([w[:, 0] for w in wins])
    assert len(starts) == 6 and np.all(np.diff(starts) >= 16)  # non-overlapping windows
    with pytest.raises(FastformerError, match="validation split has 10 tokens"):
        split_ids(np.arange(100), 0.1, 16)


def test_default_corpus_is_real_text():
    text = default_corpus()
    assert len(text) > 200_000 and text == default_corpus()
    assert "Help on module json" in text and "Return" in text


def test_default_corpus_is_the_same_in_every_process():
    # signature defaults whose repr holds a memory address, and libraries that patch the
    # standard library (transformers adds methods to logging.Logger), once made it differ
    show = "; import hashlib; print(hashlib.sha256({}.encode()).hexdigest())"
    api = "from fastformer.data.text import default_corpus" + show.format("default_corpus()")
    fallback = "from fastformer.data import stdlib_corpus" + show.format("stdlib_corpus.build()")
    patched = ("import logging; f = lambda self: None; f.__doc__ = 'Added by another library.'; "
               "logging.Logger.extra_method = f; " + api)
    digests = {subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONHASHSEED=seed),
                              capture_output=True, text=True, check=True).stdout
               for code, seed in ((api, "1"), (api, "2"), (fallback, "3"), (patched, "4"))}
    assert digests == {hashlib.sha256(default_corpus().encode()).hexdigest() + "\n"}
