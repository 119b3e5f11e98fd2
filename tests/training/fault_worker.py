"""`fastformer ARGS...` with its checkpoint writes announced and slowed, for the kill -9 suite
(tests/training/test_kill_resume.py): `python fault_worker.py LOG SLEEP ARGS...`.

Before each step of a checkpoint write -- model.safetensors half written, optimizer.safetensors,
config.yaml, state.json, the rename into place, each pruned checkpoint renamed aside, and the
delete of one -- the worker appends that step's name to the file LOG and sleeps SLEEP seconds,
so that a test which waits for a name and then kills the process lands inside that step.
"""

import os
import sys
import time

from safetensors.numpy import save

import fastformer.atomic as atomic
import fastformer.training.checkpoint as checkpoint
from fastformer.cli import main

LOG, SLEEP = sys.argv[1], float(sys.argv[2])


def mark(name):
    with open(LOG, "a") as f:
        f.write(name + "\n")
    time.sleep(SLEEP)


def wrap(module, attr, name):
    real = getattr(module, attr)

    def slowed(*args, **kwargs):
        mark(name)
        return real(*args, **kwargs)

    setattr(module, attr, slowed)


def save_file(tensors, path, metadata=None):
    """safetensors' save_file, with a pause when half of model.safetensors is on disk."""
    data = save(tensors, metadata=metadata)
    with open(path, "wb") as f:
        if os.path.basename(path) == "model.safetensors":
            f.write(data[:len(data) // 2])
            f.flush()
            mark("model-half")
            data = data[len(data) // 2:]
        else:
            mark("optimizer")
        f.write(data)


checkpoint.save_file = save_file
wrap(checkpoint, "save_config", "config")
wrap(checkpoint, "write_json_atomic", "state")
wrap(checkpoint, "remove_dir", "prune")
wrap(atomic, "_finish_modes", "rename")
wrap(atomic.shutil, "rmtree", "rmtree")

sys.exit(main(sys.argv[3:]))
