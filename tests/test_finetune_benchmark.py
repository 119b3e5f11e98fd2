"""benchmarks/finetune_gpt2.py stays runnable: once at a tiny shape (its GPT-2 small default is
for a quiet machine). Nothing here checks a speed."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from fastformer import LMConfig, TransformerLM

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_finetune_benchmark_runs_both_sides_at_a_tiny_shape():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    shape = dict(layers=1, heads=2, width=32, context=32, vocab=300)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "finetune_gpt2.py"), *[f"--{k}={v}" for k, v in shape.items()],
           "--batch-size", "2", "--seq-len", "16", "--steps", "2", "--threads", "1", "--json"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    want = TransformerLM(LMConfig(vocab_size=300, max_seq_len=32, d_model=32, n_heads=2, d_ff=128,
                                  n_layers=1)).num_parameters()
    assert r["parameters"] == want
    assert [row["contender"] for row in r["results"]] == ["fastformer", "PyTorch"]
    for row in r["results"]:
        assert row["steps_per_s"] > 0 and row["peak_rss_gb"] > 0 and row["timed_steps"] == 1
