"""`fastformer ARGS...` failing at optimizer step STEP in this process, for the MPI fault suite
(tests/training/test_distributed.py): `python rank_fault.py STEP KIND ARGS...`. KIND `error`: the
step's forward/backward raises a FastformerError (bad input met mid-run); `eio`: it raises an
OSError (a failed read); `enospc`: the checkpoint of that step fails to write (a full disk).
Started for one rank of an MPMD job (`mpiexec -n 1 fastformer ... : -n 1 python rank_fault.py ...`)."""

import errno
import sys

import fastformer.training.trainer as trainer
from fastformer.cli import main
from fastformer.errors import FastformerError

STEP, KIND = int(sys.argv[1]), sys.argv[2]
steps = []


def wrap(attr, fail):
    real = getattr(trainer, attr)

    def failing(*args, **kwargs):
        fail(*args)
        return real(*args, **kwargs)

    setattr(trainer, attr, failing)


def forward_backward(*args):
    steps.append(1)
    if len(steps) == STEP and KIND == "error":
        raise FastformerError(f"injected failure at step {STEP}")
    if len(steps) == STEP and KIND == "eio":
        raise OSError(errno.EIO, "Input/output error", "injected.bin")


def checkpoint(run_dir, step, *args):
    if step == STEP and KIND == "enospc":
        raise OSError(errno.ENOSPC, "No space left on device", f"{run_dir}/ckpt-{step:06d}.tmp")


wrap("accumulated_loss_and_grads", forward_backward)
wrap("save_checkpoint", checkpoint)
sys.exit(main(sys.argv[3:]))
