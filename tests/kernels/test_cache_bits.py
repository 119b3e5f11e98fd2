"""The first process after an install (the kernels compiled in it) and every later one (the
kernels loaded from Numba's disk cache) train to the same bits.

Numba compiles the body of a `prange` loop into a library of its own, which the process that
compiles it runs, and links a copy of it into the kernel's library, which is what the disk cache
keeps; the copy goes through LLVM's optimisation again, and under fast-math that may reassociate
a sum differently (kernels/_jit.py: Kernel.jit compiles parallel kernels in a child process so
that every process runs the cached code).
"""

import glob
import hashlib
import os
import subprocess
import sys

import pytest

pytest.importorskip("numba")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# a few steps of a 2-layer model, big enough that layernorm, softmax, attention and cross-entropy
# run their parallel kernels (not the serial twins): those are the ones whose bits differed
TRAIN = ["train", "--preset", "tiny", "--seed", "3", "--max-steps", "2", "--set", "train.eval_interval=1000",
         "--set", "train.log_interval=1"]


def train(out, cache):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache), "FASTFORMER_BACKEND": "numba",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "fastformer.cli", *TRAIN, "--out", str(out)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (weights,) = glob.glob(os.path.join(out, "ckpt-*", "model.safetensors"))
    with open(weights, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_compiled_and_cached_kernels_train_to_the_same_bits(tmp_path):
    cache = tmp_path / "numba-cache"  # empty: every kernel compiles
    cold = train(tmp_path / "cold", cache)
    assert glob.glob(str(cache / "**" / "*.nbi"), recursive=True), "nothing was cached"
    warm = train(tmp_path / "warm", cache)  # every kernel loads from the cache
    assert cold == warm, "the weights trained with freshly compiled kernels differ from those with cached ones"
