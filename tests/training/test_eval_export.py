"""`fastformer eval` (loss, perplexity, bits per byte, accuracy), `fastformer export --format hf`
against transformers, and clear errors for bad input."""

import json
import math
import os

import numpy as np
import pytest

from fastformer import LMConfig, TransformerLM
from fastformer.cli import main
from fastformer.data.tokenizer import ByteTokenizer
from fastformer.errors import FastformerError
from fastformer.training.evaluate import evaluate_lm

TINY_YAML = """\
model: {max_seq_len: 16, d_model: 16, n_heads: 2, d_ff: 32, n_layers: 1}
train: {batch_size: 4, seq_len: 16, max_steps: 3, warmup_steps: 1, log_interval: 1, eval_interval: 3,
        eval_batches: 1, checkpoint_interval: 3}
"""
STORY = "Once upon a time a cat sat on a mat. The dog ran to the cat.\n\nThe end, said the bird.\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A byte-tokenizer run and a BPE run, each trained for 3 steps, with their text files."""
    d = tmp_path_factory.mktemp("runs")
    (d / "train.txt").write_text(STORY * 40, encoding="utf-8")
    (d / "val.txt").write_text(STORY.replace("cat", "bird") * 6, encoding="utf-8")
    (d / "tiny.yaml").write_text(TINY_YAML)
    out = {"dir": d}
    assert main(["train", "--config", str(d / "tiny.yaml"), "--data", str(d / "train.txt"), "--out",
                 str(d / "byte")]) == 0
    out["byte"] = str(d / "byte")
    if _has("tokenizers"):
        assert main(["tokenizer", "train", "--data", str(d / "train.txt"), "--vocab-size", "300", "--out",
                     str(d / "tok")]) == 0
        assert main(["prepare", "--data", str(d / "train.txt"), "--val-data", str(d / "val.txt"), "--tokenizer",
                     str(d / "tok"), "--out", str(d / "prep")]) == 0
        assert main(["train", "--config", str(d / "tiny.yaml"), "--data", str(d / "prep"), "--out",
                     str(d / "bpe")]) == 0
        out["bpe"] = str(d / "bpe")
    return out


def _has(module):
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def test_bits_per_byte_of_the_byte_tokenizer_is_loss_over_ln2():
    model = TransformerLM(LMConfig(vocab_size=259, max_seq_len=8, d_model=8, n_heads=2, d_ff=16, n_layers=1))
    ids = ByteTokenizer().encode(STORY * 3)
    m = evaluate_lm(model, ids, batch_size=3, seq_len=8, byte_lengths=ByteTokenizer().byte_lengths())
    n_windows = (len(ids) - 1) // 8
    assert m["tokens"] == m["bytes"] == n_windows * 8  # every complete window, one byte per target
    assert m["bits_per_byte"] == pytest.approx(m["loss"] / math.log(2))
    assert m["ppl"] == pytest.approx(math.exp(m["loss"])) and 0 <= m["acc"] <= 1
    assert evaluate_lm(model, ids, 3, 8, byte_lengths=ByteTokenizer().byte_lengths()) == m  # deterministic
    assert evaluate_lm(model, ids, 3, 8, max_batches=2)["tokens"] == 2 * 3 * 8


def test_eval_text_file_and_prepared_split_agree(runs, capsys):
    pytest.importorskip("tokenizers")
    d = runs["dir"]
    capsys.readouterr()
    assert main(["eval", "--checkpoint", runs["bpe"], "--data", str(d / "val.txt"), "--split", "all", "--json"]) == 0
    from_text = json.loads(capsys.readouterr().out)
    assert main(["eval", "--checkpoint", runs["bpe"], "--data", str(d / "prep"), "--json"]) == 0
    from_prepared = json.loads(capsys.readouterr().out)
    for key in ("loss", "ppl", "acc", "tokens", "bytes", "bits_per_byte"):
        assert from_text[key] == from_prepared[key], key
    assert from_text["bits_per_byte"] < from_text["loss"] / math.log(2)  # BPE tokens span several bytes
    assert main(["eval", "--checkpoint", runs["bpe"], "--data", str(d / "prep"), "--max-batches", "1"]) == 0
    assert "bits/byte" in capsys.readouterr().out
    # a prepared directory made by another tokenizer is refused
    assert main(["eval", "--checkpoint", runs["byte"], "--data", str(d / "prep")]) == 2
    assert "prepared with a bpe tokenizer of" in capsys.readouterr().err


def last_validation(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "val_loss" in r][-1]


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_eval_without_data_reproduces_the_trainers_last_validation(runs, kind, capsys):
    if kind not in runs:
        pytest.skip("tokenizers is not installed")
    capsys.readouterr()
    assert main(["eval", "--checkpoint", runs[kind], "--json"]) == 0
    m, logged = json.loads(capsys.readouterr().out), last_validation(runs[kind])
    assert m["loss"] == pytest.approx(logged["val_loss"], rel=1e-9, abs=0)
    assert m["bits_per_byte"] == pytest.approx(logged["val_bpb"], rel=1e-9, abs=0)
    assert m["acc"] == logged["val_acc"] and m["split"] == "val"
    assert m["windows"] == 4 and m["tokens"] == 4 * 16  # train.eval_batches=1 batch of 4 windows of 16
    # more batches: more of the same validation split, a different figure
    assert main(["eval", "--checkpoint", runs[kind], "--max-batches", "100", "--json"]) == 0
    more = json.loads(capsys.readouterr().out)
    assert more["windows"] == (more["split_tokens"] - 1) // 16 > 4 and more["loss"] != m["loss"]
    assert main(["eval", "--checkpoint", runs[kind]]) == 0
    said = capsys.readouterr().out.splitlines()
    assert said[0].startswith("scored the val split of the run's data") and "(the trainer's 1 batches of 4" in said[1]


def test_eval_of_a_text_file_splits_it_as_training_does(runs, capsys):
    d, run = runs["dir"], runs["byte"]
    capsys.readouterr()
    n = len((d / "train.txt").read_bytes())  # byte tokenizer: one token per byte
    n_val = round(0.1 * n)
    scored = {}
    for split in ("val", "train", "all"):
        assert main(["eval", "--checkpoint", run, "--data", str(d / "train.txt"), "--split", split, "--json"]) == 0
        scored[split] = json.loads(capsys.readouterr().out)
    assert [scored[s]["split_tokens"] for s in ("val", "train", "all")] == [n_val, n - n_val, n]
    assert all(scored[s]["windows"] == (scored[s]["split_tokens"] - 1) // 16 for s in scored)
    # the default is the val split, and the run's own file split as training did gives the trainer's windows
    assert main(["eval", "--checkpoint", run, "--data", str(d / "train.txt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == scored["val"]["loss"]
    assert main(["eval", "--checkpoint", run, "--data", str(d / "train.txt"), "--max-batches", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(last_validation(run)["val_loss"], rel=1e-9)
    assert main(["eval", "--checkpoint", run, "--data", str(d / "train.txt")]) == 0
    said = capsys.readouterr().out.splitlines()
    assert said[0] == (f"scored the val split of {d / 'train.txt'} (its last 10%, as training splits it; "
                       f"--split all scores the whole file):")
    windows = (n_val - 1) // 16
    assert said[1] == f"  {windows} windows of 16 tokens = {windows * 16} of its {n_val} (evenly spread)"


def test_eval_split_refusals(runs, capsys):
    capsys.readouterr()
    assert main(["eval", "--checkpoint", runs["byte"], "--split", "all"]) == 2
    assert "--split all applies to a text file" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", runs["byte"], "--examples", "3"]) == 2
    assert "--examples applies to an encoder-decoder" in capsys.readouterr().err
    if "bpe" in runs:
        assert main(["eval", "--checkpoint", runs["bpe"], "--data", str(runs["dir"] / "prep"), "--split", "all"]) == 2
        assert "the prepared directory" in capsys.readouterr().err


def test_eval_says_when_the_runs_data_moved_or_changed(tmp_path, capsys):
    data = tmp_path / "train.txt"
    data.write_text(STORY * 40, encoding="utf-8")
    (tmp_path / "tiny.yaml").write_text(TINY_YAML)
    run = str(tmp_path / "run")
    assert main(["train", "--config", str(tmp_path / "tiny.yaml"), "--data", str(data), "--out", run]) == 0
    capsys.readouterr()
    data.write_text(STORY.upper() * 40, encoding="utf-8")
    assert main(["eval", "--checkpoint", run]) == 0
    err = capsys.readouterr().err
    assert err.startswith("fastformer eval: warning: the run's data") and "changed since training" in err
    data.unlink()
    assert main(["eval", "--checkpoint", run]) == 2
    err = capsys.readouterr().err
    assert "trained on" in err and "which is not here" in err and "--data" in err and err.count("\n") == 1


def _hf_check(export_dir, model, tokenizer, text):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel.from_pretrained(export_dir, local_files_only=True).eval()
    ids = tokenizer.encode(text)[None, :16]
    with torch.no_grad():
        np.testing.assert_allclose(hf(torch.tensor(ids)).logits.numpy(), model.forward(ids), atol=1e-4)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(export_dir, "tokenizer.json"))
    assert fast(text)["input_ids"] == tokenizer.encode(text).tolist()
    auto = transformers.AutoTokenizer.from_pretrained(export_dir, local_files_only=True)
    assert auto(text)["input_ids"] == tokenizer.encode(text).tolist()
    assert auto.eos_token_id == tokenizer.eos_id and auto.pad_token_id == tokenizer.pad_id


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_export_hf_loads_in_transformers(runs, tmp_path, kind, capsys):
    if kind not in runs:
        pytest.skip("tokenizers is not installed")
    from fastformer.training.checkpoint import load_model

    out = str(tmp_path / "hf")
    assert main(["export", "--checkpoint", runs[kind], "--format", "hf", "--out", out]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    capsys.readouterr()
    model, tokenizer, _ = load_model(runs[kind])
    _hf_check(out, model, tokenizer, "Once upon a time, ünïcödé ✓\n\nthe END.")
    # fastformer reads the exported directory back, tokenizer included
    _, tokenizer2, _ = load_model(out)
    np.testing.assert_array_equal(tokenizer2.encode("a cat ✓"), tokenizer.encode("a cat ✓"))
    assert main(["generate", "--checkpoint", out, "--prompt", "Once", "--temperature", "0",
                 "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("Once")
    # a non-empty output directory and an unknown format are refused
    assert main(["export", "--checkpoint", runs[kind], "--format", "hf", "--out", out]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert main(["export", "--checkpoint", runs[kind], "--format", "onnx", "--out", str(tmp_path / "x")]) == 2
    assert "unknown export format 'onnx': valid formats are hf" in capsys.readouterr().err


def test_char_tokenizer_exports_an_equivalent_hf_tokenizer(tmp_path):
    pytest.importorskip("tokenizers")
    from fastformer.data.tokenizer import CharTokenizer
    from fastformer.training.export import export_hf

    tok = CharTokenizer.from_text(STORY + "é✓😀")
    model = TransformerLM(LMConfig(vocab_size=tok.vocab_size, max_seq_len=16, d_model=8, n_heads=2, d_ff=16,
                                   n_layers=1), seed=1)
    export_hf(model, tok, str(tmp_path / "hf"))
    _hf_check(str(tmp_path / "hf"), model, tok, "The cat, é✓😀 and an unseen Z\n")


def test_bad_input_errors(runs, tmp_path, capsys):
    d = runs["dir"]
    capsys.readouterr()
    # an unknown tokenizer file
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text('{"kind": "sentencepiece"}')
    assert main(["prepare", "--data", str(d / "train.txt"), "--tokenizer", str(tmp_path / "tok"), "--out",
                 str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "kind 'sentencepiece'; known kinds are ['bpe', 'byte', 'char', 'word']" in err
    assert main(["prepare", "--data", str(d / "train.txt"), "--tokenizer", "wordpiece", "--out",
                 str(tmp_path / "p")]) == 2
    assert "--tokenizer 'wordpiece' is neither 'byte' nor a directory" in capsys.readouterr().err
    # ids beyond the vocabulary
    from fastformer.training.checkpoint import load_model

    model, tokenizer, _ = load_model(runs["byte"])
    with pytest.raises(ValueError, match=r"ids must lie in \[0, vocab_size=259\)"):
        model.generate(np.array([1, 2, 259]), 3)
    with pytest.raises(FastformerError, match="token id 300 is outside"):
        tokenizer.decode([1, 300])
    # an empty prompt
    assert main(["generate", "--checkpoint", runs["byte"], "--prompt", ""]) == 2
    assert "--prompt is empty" in capsys.readouterr().err
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        model.generate(np.zeros(0, dtype=np.int64), 3)
    # a checkpoint of another architecture
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 16}))
    (other / "model.safetensors").write_bytes(b"\0" * 16)
    for cmd in (["generate", "--checkpoint", str(other), "--prompt", "x"], ["eval", "--checkpoint", str(other),
                                                                             "--data", str(d / "val.txt")]):
        assert main(cmd) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "model_type must be 'gpt2' (GPT-2 architecture), got 'llama'" in err
    # a prepared directory whose meta.json is missing
    assert main(["eval", "--checkpoint", runs["byte"], "--data", str(tmp_path)]) == 2
    assert "is not a prepared data directory: no meta.json" in capsys.readouterr().err
