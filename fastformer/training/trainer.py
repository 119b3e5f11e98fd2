"""The training loop: data, forward/backward, clipping, update, evaluation, logging and
checkpoints, for the CLI and for Python, for both kinds of model.

    trainer = Trainer(preset("tiny"), "runs/tiny")   # or Trainer(None, "runs/tiny", resume=True)
    losses = trainer.train()                          # one training loss per step

What is learnt comes from the run's task (fastformer.tasks): a language model on text
(data.task text) or an encoder-decoder on synthetic strings or translation pairs. The loop only
asks the task for batches, evaluations and its data position.

Everything random comes from the run's streams, all spawned from train.seed (fastformer.seeds);
the two that advance while training -- dropout (`model.rng`) and the data order (the task's
generator) -- are saved with each checkpoint, so a run stopped and resumed produces bit-for-bit
the losses and weights of the same run uninterrupted.
A step's batch may run forward/backward in train.grad_accum_steps micro-batches (training/accumulate.py),
each weighted by its counted tokens: the step's loss and gradient stay those of the whole batch.

Data parallel (`mpiexec -n N`, training/distributed.py): train.batch_size stays the global batch.
Every rank draws the same global batch from the one data generator and trains on its own contiguous
slice of B / N rows (in grad_accum_steps micro-batches), so the data order does not depend on N.
A rank's gradient and loss are weighted by its share n_r / N_total of the step's counted tokens and
summed over the ranks (an in-place all-reduce of the flat gradient buffer), which is the mean over
the whole global batch, padded pairs included; every rank then clips and updates identically.
Rank 0 broadcasts the weights and optimizer state at the start (and after a resume) and does all
the I/O (`self.is_main`): progress bar, metrics.jsonl, checkpoints, which gather every rank's
dropout state. Evaluation is split: each rank sums its share of the validation batches and rank 0
forms the metrics of all of them. One process is the same loop with `SingleProcess`, bit for bit the run without it.

Stopping: the first Ctrl-C (SIGINT) or SIGTERM during `train` lets the current step finish, writes
a checkpoint of it (atomically, as every checkpoint) and raises TrainingInterrupted; a second one
raises KeyboardInterrupt at once, leaving the last complete checkpoint as it was (a checkpoint
being written is a `.tmp` directory until its rename). With several ranks the signal reaches the
ranks at different moments (mpiexec passes Ctrl-C on to every rank; a second Ctrl-C makes it kill
them), so the ranks sum their requests after every step and all stop after the same one: every
rank takes part in the checkpoint, rank 0 writes it. A signal that was ignored when training
started (a job started in the background with `&`) stays ignored.

Learning-rate schedule and resume: the rate of a step is a function of the step and the run's
*current* train settings (lr, min_lr, schedule, warmup_steps, max_steps). A null min_lr is
lr / 10, resolved here (`step_lr`, by `TrainConfig.final_lr`): the run's config.yaml keeps the null,
`train` prints the rate the schedule ends at, and metrics.jsonl holds the rate of every logged step.
Resuming with another max_steps (or any of these) does not stretch the old schedule from where it
was: the resumed steps follow the schedule of the new settings, so a cosine or linear rate jumps to
the new curve at the resume step. The trainer warns when one of these settings changed, with the rate at the resume step
under the old and the new settings.
"""

import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
import warnings
import weakref
from contextlib import contextmanager

import numpy as np
from tqdm import tqdm

from fastformer import seeds
from fastformer.atomic import atomic_open
from fastformer.errors import FastformerError, check_bool, check_int
from fastformer.kernels import check_precision, use_precision
from fastformer.training.accumulate import accumulated_loss_and_grads, batch_rows, counted_tokens
from fastformer.training.checkpoint import (
    METRICS_FILE,
    check_run_dir,
    checkpoint_dirs,
    load_checkpoint,
    open_metrics,
    prune_checkpoints,
    read_metrics_lines,
    save_checkpoint,
    sweep_run_dir,
)
from fastformer.training.config import (
    MATMUL_PRECISION,
    RunConfig,
    check_training_memory,
    resolve_precision,
    save_config,
)
from fastformer.training.distributed import abort_on_error, get_comm
from fastformer.training.finetune import check_init_config, init_config, load_init_source
from fastformer.training.optim import clip_grad_norm, learning_rate, make_optimizer
from fastformer.training.runlock import lock_run_dir
from fastformer.training.tasks import make_task

SCHEDULE_KEYS = ("lr", "min_lr", "schedule", "warmup_steps", "max_steps")  # what the rate of a step depends on


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became inf/nan; the run stopped before updating the weights."""


class SyncError(FastformerError):
    """Data parallel: the ranks' weights differ (train.check_sync_interval); every rank raises it."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM stopped training after a step, and a checkpoint of that step was
    written: `step`, `checkpoint` (its directory; None on ranks other than 0), `signal` (its name)."""

    def __init__(self, step, checkpoint, signame):
        super().__init__(f"training stopped by {signame} at step {step}; checkpoint {checkpoint}")
        self.step, self.checkpoint, self.signal = step, checkpoint, signame


def step_lr(t, step):
    """The learning rate of optimizer step `step` (0-based) under TrainConfig `t`."""
    return learning_rate(step, lr=t.lr, schedule=t.schedule, warmup_steps=t.warmup_steps, max_steps=t.max_steps,
                         min_lr=t.final_lr())


class _StopRequest:
    """Set by the first SIGINT/SIGTERM while training (`signame`); a second raises KeyboardInterrupt."""

    signame = None

    def handle(self, signum, frame):
        if self.signame is not None:
            raise KeyboardInterrupt
        self.signame = signal.Signals(signum).name


@contextmanager
def stop_on_signals():
    """Within the block, SIGINT and SIGTERM only ask the training loop to stop (yields the
    _StopRequest). Signals another handler already owns, or that are ignored, are left alone;
    so is everything outside the main thread, where no handler can be installed."""
    stop, installed = _StopRequest(), {}
    if threading.current_thread() is threading.main_thread():
        for sig, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
            if signal.getsignal(sig) is default:
                installed[sig] = signal.signal(sig, stop.handle)
    try:
        yield stop
    finally:
        for sig, old in installed.items():
            signal.signal(sig, old)


def fit_columns(fields, width=None, sep=" | "):
    """`fields` joined by `sep` into lines of at most `width` columns (default: the terminal's,
    80 when output is not a terminal), continuation lines indented by two spaces. A field is
    never split, so one longer than the width has a line of its own."""
    width = width or shutil.get_terminal_size((80, 24)).columns
    lines, line = [], ""
    for f in fields:
        if line and len(line) + len(sep) + len(f) > width:
            lines.append(line)
            line = "  " + f
        else:
            line = f"{line}{sep}{f}" if line else f
    return "\n".join(lines + [line])


class Trainer:
    """Trains the model of a RunConfig on its task, writing metrics and checkpoints to `out_dir`.

    Args:
        config: a RunConfig; with resume=True it may be None (the checkpoint's config is used).
        out_dir: the run directory (created if needed).
        resume: continue from the newest checkpoint in out_dir.
        text: language models: train on this str instead of config.data.path (a text file or a
            directory written by `fastformer prepare`) or the embedded default corpus.
        verbose: progress bar (when stderr is a terminal) and one printed line per evaluation.
        comm: the communicator (training/distributed.py); None: `get_comm()`, MPI when started
            by an MPI launcher, else one process.
        init_from: fine-tuning (training/finetune.py): start from the weights and tokenizer(s) of
            this Hugging Face GPT-2 directory or fastformer checkpoint/run directory, with a fresh
            optimizer at step 0; config None takes its config (`finetune.init_config`).
    """

    def __init__(self, config, out_dir, resume=False, text=None, verbose=True, comm=None, init_from=None):
        self.comm = comm = get_comm() if comm is None else comm
        self._release = None
        with abort_on_error(comm):
            try:
                self._init(config, out_dir, resume, text, verbose, init_from)
            except BaseException:
                self.close()
                raise

    def close(self):
        """Release the run directory's lock (also released when the process ends)."""
        if self._release is not None:
            self._release()  # a weakref.finalize: runs once, here or when the Trainer is collected

    def _init(self, config, out_dir, resume, text, verbose, init_from):
        comm = self.comm
        self.out_dir, self.verbose, self.is_main = out_dir, check_bool("verbose", verbose), comm.rank == 0
        if config is not None and not isinstance(config, RunConfig):
            raise FastformerError(f"Trainer needs a RunConfig, got {type(config).__name__}")
        if init_from is not None and check_bool("resume", resume):
            raise FastformerError("init_from starts a new run from another model's weights and resume continues "
                                  "this run: give one of them")
        if self.is_main:  # the one writer of the run directory: lock it, then sweep what a killed run left
            if not resume:  # a folder fastformer did not make is refused before anything is written in it
                check_run_dir(out_dir)
            self._release = weakref.finalize(self, lock_run_dir(out_dir).release)
            if resume:
                check_run_dir(out_dir, resume=True)  # a directory without a checkpoint is not swept
            sweep_run_dir(out_dir)
        ckpt, tokenizers, self.init_from = None, None, init_from
        if init_from is not None:
            base = init_config(init_from)
            config = config or base
            check_init_config(init_from, base, config)
            tokenizers, init_weights = load_init_source(init_from)
        if check_bool("resume", resume):
            ckpt = load_checkpoint(out_dir)
            config, tokenizers = config or ckpt.config, ckpt.tokenizers
            self.init_from = ckpt.state.get("init_from")
            if config.model_config() != ckpt.config.model_config():
                raise FastformerError(f"cannot resume {ckpt.path}: its model config {ckpt.config.model_config()} "
                                      f"differs from the requested {config.model_config()}")
            if ckpt.step > config.train.max_steps:  # before anything in the run directory is rewritten
                raise FastformerError(f"the run in {out_dir!r} is at step {ckpt.step}, past train.max_steps="
                                      f"{config.train.max_steps}: give --max-steps above {ckpt.step} to continue it")
            _warn_schedule_change(ckpt.config.train, config.train, ckpt.step)
        elif checkpoint_dirs(out_dir):
            raise FastformerError(f"run directory {out_dir!r} already holds checkpoints: resume it (--resume) "
                                  f"or choose another output directory")
        if config is None:
            raise FastformerError("Trainer needs a RunConfig (or resume=True with a checkpoint to read it from)")
        if config.train.precision == "auto":  # made concrete once, so the run resumes in it bit for bit
            config = dataclasses.replace(config, train=dataclasses.replace(
                config.train, precision=resolve_precision(config.train.precision)))
        t = config.train
        if t.batch_size % (t.grad_accum_steps * comm.size):
            raise FastformerError(
                f"train.batch_size={t.batch_size} is not divisible by train.grad_accum_steps={t.grad_accum_steps} "
                f"x {comm.size} ranks: the global batch is a per-rank micro-batch x grad_accum_steps x ranks; "
                f"choose a batch_size that is a multiple of {t.grad_accum_steps * comm.size}")
        check_precision(MATMUL_PRECISION[t.precision])  # a CPU without bfloat16 refuses bf16 now, not mid-run

        # data: the task's tokenizers (a resumed run's own), its batches and validation data;
        # the model's vocabulary sizes follow the tokenizers
        self.task = make_task(config, text=text, tokenizers=tokenizers)
        self.config = cfg = self.task.config
        check_training_memory(cfg, comm.size)  # before the model and optimizer allocate a byte

        # model and optimizer (the model takes its init and dropout streams of t.seed, fastformer.seeds)
        self.model = self.task.new_model(t.seed)
        if comm.rank:  # rank 0 keeps the model's own dropout stream; the others their own
            self.model.rng = seeds.dropout_stream(t.seed, comm.rank)
        self.optimizer = make_optimizer(self.model.flat, t)
        self.step = 0
        if init_from is not None:  # fine-tuning: the source's weights, the fresh optimizer and streams
            self.model.load_state_dict(init_weights)
            del init_weights  # the flat buffer holds them now
        if ckpt is not None:
            self._restore(ckpt)
        if comm.size > 1:  # every rank starts from rank 0's weights and optimizer state
            comm.bcast(self.model.flat.data)
            state = self.optimizer.state_dict()
            for a in state.values():
                comm.bcast(a)
            self.optimizer.load_state_dict(state)

        if self.is_main:
            self._trim_metrics()  # first: a metrics log that is not a file refuses the run before any write
            save_config(cfg, os.path.join(out_dir, "config.yaml"))
            prune_checkpoints(out_dir, cfg.train.keep_checkpoints)  # a prune a killed run had not finished

    # ---------------------------------------------------------------- state
    def _rng_states(self):
        """The generators' states (rank 0's dropout and the data; with several ranks every rank's
        dropout too, gathered on rank 0). Every rank calls it; only rank 0's return is complete."""
        dropout = self.model.rng.bit_generator.state
        states = {"dropout": dropout, "data": self.task.state_dict()}
        if self.comm.size > 1:
            states["dropout_ranks"] = self.comm.gather(dropout)
        return states

    def _restore(self, ckpt):
        self.model.load_state_dict(ckpt.weights)
        self.optimizer.load_state_dict(ckpt.optimizer_state)
        rng, rank, size = ckpt.state["rng"], self.comm.rank, self.comm.size
        ranks = rng.get("dropout_ranks") or [rng["dropout"]]
        try:  # the generator states of state.json (its shape is checked by load_checkpoint)
            if len(ranks) == size:
                self.model.rng.bit_generator.state = ranks[rank]
            elif rank == 0:
                self.model.rng.bit_generator.state = rng["dropout"]
                warnings.warn(f"checkpoint {ckpt.path} was written by {len(ranks)} process(es), this run has "
                              f"{size}: the data order is the same, the dropout masks of ranks other than 0 "
                              f"are not those of the original run", stacklevel=3)
            self.task.load_state_dict(rng["data"])
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise FastformerError(f"checkpoint file {os.path.join(ckpt.path, 'state.json')!r} is corrupt: its rng "
                                  f"states cannot be restored ({type(e).__name__}: {e})") from None
        self.step = ckpt.step
        if ckpt.state.get("data_sha256") != self.task.fingerprint:
            warnings.warn(f"the training data differs from the one checkpoint {ckpt.path} was trained on; "
                          f"the resumed run will not repeat the original data order", stacklevel=3)

    def _trim_metrics(self):
        """Drop metrics lines past the current step (left by a run that died after its last checkpoint)."""
        path = os.path.join(self.out_dir, METRICS_FILE)
        if not os.path.lexists(path):
            return
        lines = read_metrics_lines(path)
        keep = [raw for raw, record in lines if record is not None and record["step"] <= self.step]
        if len(keep) != len(lines):
            with atomic_open(path, "wb") as f:  # a new file replaces the old one: a failed write loses no line
                f.writelines(keep)

    # ------------------------------------------------------------- evaluate
    def evaluate(self):
        """The task's validation metrics, {"val_loss": ..., ...} (see fastformer.tasks). With
        several ranks every rank must call it: each evaluates its share of the batches and rank 0
        gets the metrics of all of them (the others None)."""
        parts = self.comm.gather(self.task.eval_sums(self.model, (self.comm.rank, self.comm.size)))
        return self.task.metrics(parts) if self.is_main else None

    # ---------------------------------------------------------------- train
    def train(self, steps=None):
        """Run updates until train.max_steps, or for at most `steps` more. Ends with a checkpoint.

        Returns the training loss of every step run, in order. Raises NonFiniteLossError (with the
        last good checkpoint left as it was) if the loss or gradient norm stops being finite; with
        several ranks every rank raises it at the same step, and any other exception on one rank
        ends the whole job (training/distributed.abort_on_error).
        """
        if steps is not None:
            check_int("steps", steps, minimum=0)
        t, model, flat, comm = self.config.train, self.model, self.model.flat, self.comm
        end = t.max_steps if steps is None else min(t.max_steps, self.step + steps)
        grad_acc = np.empty_like(flat.grad) if t.grad_accum_steps > 1 else None  # sum over micro-batches
        losses, tokens, t_log = [], 0, time.perf_counter()
        bar = tqdm(total=t.max_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (self.verbose and self.is_main and sys.stderr.isatty()))
        with abort_on_error(comm, passthrough=(NonFiniteLossError, SyncError, TrainingInterrupted)), \
                stop_on_signals() as stop:
            try:
                while self.step < end:
                    lr = step_lr(t, self.step)
                    # data: the next batch of the task (LM windows, or padded source/target pairs);
                    # the global batch, the same on every rank
                    batch = self.task.next_batch()
                    # forward and backward: the batch's mean loss, its gradient into the flat buffer
                    # (in train.grad_accum_steps micro-batches, weighted by their counted tokens;
                    # with several ranks, this rank's rows, then summed over the ranks)
                    # (train.precision: the matrix products in float32 or with bfloat16 products)
                    with use_precision(MATMUL_PRECISION[t.precision]):
                        if comm.size == 1:
                            loss = accumulated_loss_and_grads(model, batch, t.grad_accum_steps, grad_acc)
                        else:
                            loss = self._data_parallel_loss_and_grads(batch_rows(batch, comm.rank, comm.size),
                                                                      grad_acc)
                    # clip the global gradient norm; a non-finite loss or norm stops before the update
                    # (the same numbers on every rank, so every rank stops at this step)
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
                    tokens += counted_tokens(batch["targets"])  # predicted tokens (padding is -100)
                    bar.update(1)
                    # log, evaluate (split over the ranks, the metrics on rank 0), checkpoint
                    record = None
                    if self.step % t.log_interval == 0 or self.step % t.eval_interval == 0 or self.step == end:
                        elapsed = time.perf_counter() - t_log
                        record = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                                  "tokens_per_sec": tokens / max(elapsed, 1e-9)}
                        tokens, t_log = 0, time.perf_counter()
                        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_sec']:.0f}")
                    if self.step % t.eval_interval == 0 or self.step == t.max_steps:
                        record.update(self.evaluate() or {})
                    if record is not None:
                        self._log(record)
                    saved = None
                    if self.step % t.checkpoint_interval == 0 or self.step == end:
                        saved = self._checkpoint()
                    # data parallel: every rank must still hold the same weights
                    if t.check_sync_interval and comm.size > 1 and self.step % t.check_sync_interval == 0:
                        self._check_sync()
                    # Ctrl-C or SIGTERM: a checkpoint of this step, then stop (every rank after the
                    # same step: a request on any rank is every rank's)
                    requested = stop.signame is not None
                    if comm.size > 1:
                        requested = comm.allreduce_scalar(int(requested)) > 0
                    if requested and self.step < end:
                        saved = saved or self._checkpoint()
                        raise TrainingInterrupted(self.step, saved, stop.signame or "a signal to another rank")
            finally:
                bar.close()
        return losses

    def _check_sync(self):
        """Compare a checksum of the weights with rank 0's on every rank; FastformerError on every
        rank (the same step) when any rank differs."""
        data = self.model.flat.data
        mine = np.array([np.sum(data, dtype=np.float64), np.dot(data, data)], dtype=np.float64)
        ref = self.comm.bcast(mine.copy())
        drifted = self.comm.allreduce_scalar(int(not np.array_equal(mine, ref)))
        if drifted:
            raise SyncError(f"the ranks' weights drifted apart at step {self.step}: {drifted} of "
                            f"{self.comm.size} ranks differ from rank 0 (train.check_sync_interval); "
                            f"the ranks must run the same fastformer, NumPy and kernels")

    def _data_parallel_loss_and_grads(self, part, grad_acc):
        """This rank's rows' loss and gradient over the global batch's N_total counted tokens,
        summed over the ranks: the global batch's mean loss and its gradient in flat.grad."""
        comm, grad = self.comm, self.model.flat.grad
        n = counted_tokens(part["targets"])
        total = comm.allreduce_scalar(n)
        if n:
            loss = accumulated_loss_and_grads(self.model, part, self.config.train.grad_accum_steps, grad_acc,
                                              total=total)
        else:  # no counted target in this rank's rows (or no rows): it adds nothing
            grad[...] = 0
            loss = 0.0
        comm.allreduce_sum(grad)
        return comm.allreduce_scalar(float(loss))

    # ----------------------------------------------- logging and checkpoints
    def _log(self, record):
        """Append one metrics line (and print a line on evaluation steps). Rank 0 only."""
        if not self.is_main:
            return
        with open_metrics(os.path.join(self.out_dir, METRICS_FILE), os.O_WRONLY | os.O_APPEND | os.O_CREAT) as f:
            f.write((json.dumps(record) + "\n").encode("utf-8"))
        if self.verbose and "val_loss" in record:
            fields = [f"step {record['step']}/{self.config.train.max_steps}", f"loss {record['loss']:.4f}"]
            fields += [f"{k} {v:.4f}" for k, v in record.items() if k.startswith("val_")]
            fields += [f"lr {record['lr']:.2e}", f"{record['tokens_per_sec']:,.0f} tok/s"]
            tqdm.write(fit_columns(fields))

    def _checkpoint(self):
        """Write RUN/ckpt-<step> atomically: every rank hands over its dropout state, rank 0 writes."""
        rng_states = self._rng_states()
        if not self.is_main:
            return None
        return save_checkpoint(self.out_dir, self.step, self.model, self.optimizer, self.config,
                               self.task.tokenizers, rng_states,
                               extra={"data_sha256": self.task.fingerprint, "init_from": self.init_from},
                               keep=self.config.train.keep_checkpoints)


def _warn_schedule_change(old, new, step):
    """Warn when a resumed run's schedule settings differ from its checkpoint's (module docstring)."""
    def shown(t, k):
        return f"null (lr / 10 = {t.final_lr():g})" if getattr(t, k) is None else getattr(t, k)

    changed = [f"train.{k} {shown(old, k)} -> {shown(new, k)}" for k in SCHEDULE_KEYS
               if getattr(old, k) != getattr(new, k)]
    if changed:
        warnings.warn(f"resuming at step {step} with {', '.join(changed)}: the learning rate follows the schedule "
                      f"of the new settings from here, {step_lr(old, step):.2e} -> {step_lr(new, step):.2e} at "
                      f"step {step} (it is not the old schedule stretched)", stacklevel=4)
