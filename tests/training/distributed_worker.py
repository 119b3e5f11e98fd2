"""One rank of a test run, started by tests/training/test_distributed.py as
`mpiexec -n N python distributed_worker.py SPEC_JSON` (or plain `python` for one process).

SPEC: {"kind": "lm" | "seq2seq", "out": run dir, "result": .npz path written by rank 0,
"train": TrainConfig overrides, "dropout": float, "steps": int or null, "resume": bool,
"raise_on_rank": rank whose forward/backward raises at its second step, or null,
"rank0_writes_only": make every file write of ranks > 0 fail, "nan_on_rank": rank whose loss is NaN
at the third step, "perturb_rank": rank whose weights are moved after the start, "sigint_on_rank": rank
that receives SIGINT during its third step; every rank that
stops writes RESULT.stopped-rankR with its step and message}.
The .npz holds the losses, the last gradient (flat.grad) and the weights (flat.data) of rank 0.
"""

import builtins
import json
import os
import signal
import sys

import numpy as np
from small_runs import TEXT, make_config

import fastformer.training.trainer as trainer_module


def refuse_writes():
    """Every file write of this process raises (rank > 0 must write nothing)."""
    real_open = builtins.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            raise AssertionError(f"a rank other than 0 opened {file!r} for writing")
        return real_open(file, mode, *args, **kwargs)

    def no_save(*args, **kwargs):
        raise AssertionError("a rank other than 0 saved a checkpoint or config")

    builtins.open = guarded_open
    trainer_module.save_checkpoint = no_save
    trainer_module.save_config = no_save


def main(spec):
    config = make_config(spec["kind"], spec.get("dropout", 0.0), **spec.get("train", {}))
    comm = trainer_module.get_comm()
    if spec.get("rank0_writes_only") and comm.rank > 0:
        refuse_writes()
    trainer = trainer_module.Trainer(None if spec.get("resume") else config, spec["out"],
                                     resume=spec.get("resume", False),
                                     text=TEXT if spec["kind"] == "lm" else None, verbose=False)
    if spec.get("raise_on_rank") == comm.rank:
        real, calls = trainer.model.loss_and_grads, []

        def failing(**batch):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError(f"injected failure on rank {comm.rank}")
            return real(**batch)

        trainer.model.loss_and_grads = failing
    if spec.get("nan_on_rank") == comm.rank:  # this rank's loss turns NaN at the third step
        real_nan, nan_calls = trainer.model.loss_and_grads, []

        def nan_at_three(**batch):
            nan_calls.append(1)
            loss, grads = real_nan(**batch)
            return (float("nan") if len(nan_calls) == 3 else loss), grads

        trainer.model.loss_and_grads = nan_at_three
    if spec.get("sigint_on_rank") == comm.rank:  # Ctrl-C reaches this rank alone, during its third step
        real_int, int_calls = trainer.model.loss_and_grads, []

        def sigint_at_three(**batch):
            int_calls.append(1)
            if len(int_calls) == 3:
                os.kill(os.getpid(), signal.SIGINT)
            return real_int(**batch)

        trainer.model.loss_and_grads = sigint_at_three
    if spec.get("perturb_rank") == comm.rank:  # this rank's weights leave the others' after the broadcast
        trainer.model.flat.data[0] += 1e-3
    try:
        losses = trainer.train(spec.get("steps"))
    except (trainer_module.NonFiniteLossError, trainer_module.SyncError,
            trainer_module.TrainingInterrupted) as e:  # every rank: where it stopped
        with open(f"{spec['result']}.stopped-rank{comm.rank}", "w") as f:
            f.write(f"{trainer.step}\n{e}\n")
        sys.exit(1)
    if comm.rank == 0:
        np.savez(spec["result"], losses=np.array(losses), grad=trainer.model.flat.grad,
                 data=trainer.model.flat.data, size=comm.size)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
