"""The recipes in experiments/configs/ and scripts/tinystories.py: data paths come from the
command line, the Shakespeare recipe is nanoGPT's CPU model, and the TinyStories script picks the
default backend and fails in one line without its data."""

import glob
import json
import os
import subprocess
import sys

from fastformer.kernels import _resolve
from fastformer.training.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "experiments", "configs", "*.yaml")))
RECIPES = ("shakespeare_char", "tinystories_bpe", "tiny_reverse", "tiny_enfr", "small_enfr")
SCRIPT = os.path.join(REPO, "scripts", "tinystories.py")


def test_no_recipe_bakes_in_a_data_path():
    names = {os.path.splitext(os.path.basename(p))[0] for p in CONFIGS}
    assert set(RECIPES) <= names
    for path in CONFIGS:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        assert "shared/data" not in text, path
        assert load_config(path).data.path is None, path


def test_shakespeare_char_is_nanogpts_cpu_model():
    c = load_config(os.path.join(REPO, "experiments", "configs", "shakespeare_char.yaml"))
    m, t = c.model, c.train
    assert (m.n_layers, m.n_heads, m.d_model, m.d_ff, m.max_seq_len, m.dropout) == (4, 4, 128, 512, 64, 0.0)
    assert (t.batch_size, t.seq_len, t.max_steps, t.lr, t.min_lr) == (12, 64, 2000, 1e-3, 1e-4)
    assert (c.data.tokenizer, c.data.val_fraction) == ("char", 0.1)


def run_script(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("FASTFORMER_BACKEND", None)
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_tinystories_without_its_data_says_so_in_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    r = run_script(tmp_path / "nowhere", "--out", out)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("tinystories.py: error: ") and "tinystories_train_10k_lines.txt" in r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


def test_tinystories_end_to_end_on_a_few_stories_uses_the_default_backend(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    story = "Once upon a time, a little cat sat in the sun. It was happy.\n"
    (data / "tinystories_train_10k_lines.txt").write_text(
        "\n" + "".join(f"{story * (1 + i % 3)}<|endoftext|>\n" for i in range(60)) + "cut off", encoding="utf-8")
    (data / "tinystories_valid_sample.txt").write_text((story + "\n") * 20, encoding="utf-8")
    out = tmp_path / "out"
    r = run_script(data, "--out", out, "--max-steps", 2, "--vocab-size", 300, "--new-tokens", 4)
    assert r.returncode == 0, r.stderr
    with open(out / "report.json") as f:
        report = json.load(f)
    assert report["backend"] == _resolve("auto").name  # numba when it imports
    assert report["steps"] == 2 and len(report["samples"]) == 3
    assert "normalised: 60 training stories" in r.stdout
    assert os.path.isfile(out / "run" / "ckpt-000002" / "model.safetensors")
    r = run_script(data, "--out", out)  # the run is there: refused, in one line
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "already exists" in r.stderr
