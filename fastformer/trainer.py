"""The training loop: data, forward/backward, clipping, update, evaluation, logging and
checkpoints, for the CLI and for Python.

    trainer = Trainer(preset("tiny"), "runs/tiny")   # or Trainer(None, "runs/tiny", resume=True)
    losses = trainer.train()                          # one training loss per step

Everything random comes from explicit generators saved with each checkpoint -- the weight
initialisation and dropout (`model.rng`) and the data order (`data_rng`) -- so a run stopped and
resumed produces bit-for-bit the losses and weights of the same run uninterrupted. Gradients
live in the model's one flat buffer, the unit a data-parallel version would all-reduce; logging
and checkpointing sit together in `_log` / `_checkpoint`, behind `self.is_main`, the one place a
multi-process run would guard to rank 0.
"""

import json
import math
import os
import sys
import time
import warnings

import numpy as np
from tqdm import tqdm

from .checkpoint import checkpoint_dirs, load_checkpoint, save_checkpoint
from .config import match_tokenizer, save_config
from .data import get_batch, load_training_data
from .evaluate import evaluate_lm
from .model import TransformerLM
from .optim import clip_grad_norm, learning_rate, make_optimizer

METRICS_FILE = "metrics.jsonl"


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became inf/nan; the run stopped before updating the weights."""


class Trainer:
    """Trains a TransformerLM on a text corpus, writing metrics and checkpoints to `out_dir`.

    Args:
        config: a RunConfig; with resume=True it may be None (the checkpoint's config is used).
        out_dir: the run directory (created if needed).
        resume: continue from the newest checkpoint in out_dir.
        text: train on this str instead of config.data.path / the embedded default corpus.
    The data is a text file or a directory written by `fastformer prepare` (config.data.path).
        verbose: progress bar (when stderr is a terminal) and one printed line per evaluation.
    """

    def __init__(self, config, out_dir, resume=False, text=None, verbose=True):
        self.out_dir, self.verbose, self.is_main = out_dir, verbose, True
        ckpt = None
        if resume:
            ckpt = load_checkpoint(out_dir)
            config = config or ckpt.config
            if config.model != ckpt.config.model:
                raise ValueError(f"cannot resume {ckpt.path}: its model config {ckpt.config.model} differs "
                                 f"from the requested {config.model}")
        elif checkpoint_dirs(out_dir):
            raise ValueError(f"run directory {out_dir!r} already holds checkpoints: resume it (--resume) "
                             f"or choose another output directory")
        if config is None:
            raise ValueError("Trainer needs a RunConfig (or resume=True with a checkpoint to read it from)")
        t = config.train

        # data: the tokenizer and the train/validation token streams (text is encoded once;
        # a prepared directory is memory-mapped); model.vocab_size follows the tokenizer
        self.tokenizer, self.train_ids, self.val_ids, self.data_sha256 = load_training_data(
            config.data, t.seq_len, text=text, tokenizer=ckpt.tokenizer if ckpt else None)
        self.config = cfg = match_tokenizer(config, self.tokenizer)
        self.byte_lengths = self.tokenizer.byte_lengths()  # (V,) for bits per byte
        self.data_rng = np.random.default_rng(np.random.SeedSequence(t.seed).spawn(3)[2])

        # model and optimizer (the model seeds its own init and dropout generators from t.seed)
        self.model = TransformerLM(cfg.model, seed=t.seed)
        self.optimizer = make_optimizer(self.model.flat, t)
        self.step = 0
        if ckpt is not None:
            self._restore(ckpt)

        if self.is_main:
            os.makedirs(out_dir, exist_ok=True)
            save_config(cfg, os.path.join(out_dir, "config.yaml"))
            self._trim_metrics()

    # ---------------------------------------------------------------- state
    def _rng_states(self):
        return {"dropout": self.model.rng.bit_generator.state, "data": self.data_rng.bit_generator.state}

    def _restore(self, ckpt):
        self.model.load_state_dict(ckpt.weights)
        self.optimizer.load_state_dict(ckpt.optimizer_state)
        self.model.rng.bit_generator.state = ckpt.state["rng"]["dropout"]
        self.data_rng.bit_generator.state = ckpt.state["rng"]["data"]
        self.step = ckpt.step
        if ckpt.state.get("data_sha256") != self.data_sha256:
            warnings.warn(f"the training text differs from the one checkpoint {ckpt.path} was trained on; "
                          f"the resumed run will not repeat the original data order", stacklevel=3)

    def _trim_metrics(self):
        """Drop metrics lines past the current step (left by a run that died after its last checkpoint)."""
        path = os.path.join(self.out_dir, METRICS_FILE)
        if not os.path.exists(path):
            return
        with open(path, encoding="utf-8") as f:
            lines = [ln for ln in f if ln.strip()]
        keep = []
        for ln in lines:
            try:
                if json.loads(ln)["step"] <= self.step:
                    keep.append(ln)
            except (ValueError, KeyError):
                pass  # a line cut by a crash
        if len(keep) != len(lines):
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(keep)

    # ------------------------------------------------------------- evaluate
    def evaluate(self):
        """Validation loss, perplexity, next-token accuracy and bits per byte over fixed windows."""
        t = self.config.train
        m = evaluate_lm(self.model, self.val_ids, t.batch_size, t.seq_len, t.eval_batches, self.byte_lengths)
        return {"val_loss": m["loss"], "val_ppl": m["ppl"], "val_acc": m["acc"], "val_bpb": m["bits_per_byte"]}

    # ---------------------------------------------------------------- train
    def train(self, steps=None):
        """Run updates until train.max_steps, or for at most `steps` more. Ends with a checkpoint.

        Returns the training loss of every step run, in order. Raises NonFiniteLossError (with the
        last good checkpoint left as it was) if the loss or gradient norm stops being finite.
        """
        t, model, flat = self.config.train, self.model, self.model.flat
        end = t.max_steps if steps is None else min(t.max_steps, self.step + steps)
        losses, tokens, t_log = [], 0, time.perf_counter()
        bar = tqdm(total=t.max_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (self.verbose and sys.stderr.isatty()))
        try:
            while self.step < end:
                lr = learning_rate(self.step, lr=t.lr, schedule=t.schedule, warmup_steps=t.warmup_steps,
                                   max_steps=t.max_steps, min_lr=t.min_lr)
                # data: B random windows from the training split
                x, y = get_batch(self.train_ids, t.batch_size, t.seq_len, self.data_rng)
                # forward and backward: loss and gradients into the flat buffer
                loss, _ = model.loss_and_grads(x, y)
                # clip the global gradient norm; a non-finite loss or norm stops before the update
                grad_norm = clip_grad_norm(flat.grad, t.grad_clip)
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    raise NonFiniteLossError(
                        f"training stopped at step {self.step + 1}: loss={loss}, grad_norm={grad_norm} "
                        f"(lr={lr:.3g}). The weights were not updated; the last good checkpoint is "
                        f"{(checkpoint_dirs(self.out_dir) or ['none'])[-1]}. Try a lower train.lr or "
                        f"train.grad_clip.")
                # update
                self.optimizer.step(lr)
                self.step += 1
                losses.append(loss)
                tokens += x.size
                bar.update(1)
                # log, evaluate, checkpoint
                record = None
                if self.step % t.log_interval == 0 or self.step % t.eval_interval == 0 or self.step == end:
                    elapsed = time.perf_counter() - t_log
                    record = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                              "tokens_per_sec": tokens / max(elapsed, 1e-9)}
                    tokens, t_log = 0, time.perf_counter()
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_sec']:.0f}")
                if self.step % t.eval_interval == 0 or self.step == t.max_steps:
                    record.update(self.evaluate())
                if record is not None:
                    self._log(record)
                if self.step % t.checkpoint_interval == 0 or self.step == end:
                    self._checkpoint()
        finally:
            bar.close()
        return losses

    # ----------------------------------------------- logging and checkpoints
    def _log(self, record):
        """Append one metrics line (and print a line on evaluation steps). Rank 0 only."""
        if not self.is_main:
            return
        with open(os.path.join(self.out_dir, METRICS_FILE), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.verbose and "val_loss" in record:
            tqdm.write(f"step {record['step']:>6} | loss {record['loss']:.4f} | val_loss {record['val_loss']:.4f} "
                       f"| val_ppl {record['val_ppl']:.2f} | val_bpb {record['val_bpb']:.3f} | val_acc {record['val_acc']:.3f} "
                       f"| lr {record['lr']:.2e} | {record['tokens_per_sec']:.0f} tok/s")

    def _checkpoint(self):
        """Write RUN/ckpt-<step> atomically. Rank 0 only."""
        if not self.is_main:
            return None
        return save_checkpoint(self.out_dir, self.step, self.model, self.optimizer, self.config,
                               self.tokenizer, self._rng_states(), extra={"data_sha256": self.data_sha256},
                               keep=self.config.train.keep_checkpoints)
