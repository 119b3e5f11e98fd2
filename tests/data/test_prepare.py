"""Prepared corpora: streaming encode equals whole-file encode, meta.json, memory-mapped training
with exact resume, and the errors for broken directories."""

import json
import os

import numpy as np
import pytest

from fastformer.data.prepare import load_prepared, prepare, token_dtype
from fastformer.data.tokenizer import ByteTokenizer, CharTokenizer
from fastformer.errors import FastformerError
from fastformer.training.config import ModelConfig, RunConfig, TrainConfig
from fastformer.training.trainer import Trainer

pytest.importorskip("tokenizers")
from fastformer.data.bpe import BPETokenizer

# lines with trailing spaces, indented lines, blank lines, CRLF and non-ASCII: the places where
# cutting the text could change how the pre-tokenizer splits it
LINES = ["Once upon a time there was a cat.  ", "  It sat on a mat.", "", "\"Hello!\" said the dog.",
         "Ünïcödé ✓ 😀 and 42 numbers,\r", "'s not a line start", "\tTabbed.", "The end. "]


def corpus(n_lines=600, seed=0):
    rng = np.random.default_rng(seed)
    return "\n".join(rng.choice(LINES, size=n_lines)) + "\n"


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_bytes(corpus().encode("utf-8"))
    return str(path)


@pytest.fixture(scope="module")
def bpe(text_file):
    return BPETokenizer.train([text_file], vocab_size=320)


@pytest.mark.parametrize("kind", ["bpe", "byte", "char"])
def test_streaming_encode_equals_whole_file_encode(tmp_path, text_file, bpe, kind):
    text = corpus()
    tok = {"bpe": bpe, "byte": ByteTokenizer(), "char": CharTokenizer.from_text(text)}[kind]
    meta = prepare([text_file], tok, str(tmp_path), val_fraction=0.25, block_bytes=97)  # many small blocks
    data = load_prepared(str(tmp_path))
    assert isinstance(data.train, np.memmap) and data.train.dtype == np.uint16
    np.testing.assert_array_equal(np.concatenate([data.train, data.val]), tok.encode(text))
    s = meta["splits"]
    assert s["train"]["bytes"] + s["val"]["bytes"] == len(text.encode("utf-8"))
    assert s["val"]["bytes"] == pytest.approx(0.25 * len(text.encode("utf-8")), abs=100)  # cut at a line
    for split in ("train", "val"):  # the byte counts agree with the tokens' byte lengths
        assert tok.byte_lengths()[getattr(data, split)].sum() == s[split]["bytes"]
    assert meta["vocab_size"] == tok.vocab_size and meta["tokenizer_kind"] == kind
    assert meta["sources"][0]["bytes"] == os.path.getsize(text_file) and meta["sources"][0]["split"] == "train+val"
    assert sorted(os.listdir(tmp_path)) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]


def test_separate_validation_files_and_dtype(tmp_path, text_file):
    val = tmp_path / "val.txt"
    val.write_text("The dog sat.\nThe end.\n", encoding="utf-8")
    meta = prepare([text_file, text_file], ByteTokenizer(), str(tmp_path / "out"), val_files=[str(val)])
    data = load_prepared(str(tmp_path / "out"))
    assert data.val.tobytes() == np.frombuffer(val.read_bytes(), np.uint8).astype(np.uint16).tobytes()
    assert len(data.train) == 2 * os.path.getsize(text_file)  # files appended with nothing between
    assert [s["split"] for s in meta["sources"]] == ["train", "train", "val"]
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_prepare_input_errors(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine line\n\xff\xfe broken\n")
    with pytest.raises(FastformerError, match=r"bad.txt' is not UTF-8 text \(byte 10"):
        prepare([str(bad)], ByteTokenizer(), str(tmp_path / "out"))
    assert not any(f.endswith(".tmp") for f in os.listdir(tmp_path / "out"))  # temp files removed
    with pytest.raises(FastformerError, match="data file .*missing.txt' does not exist"):
        prepare([str(tmp_path / "missing.txt")], ByteTokenizer(), str(tmp_path / "out"))
    with pytest.raises(FastformerError, match="val-fraction must lie in"):
        prepare([str(bad)], ByteTokenizer(), str(tmp_path / "out"), val_fraction=1.0)


def test_broken_prepared_directories(tmp_path, text_file):
    out = tmp_path / "p"
    with pytest.raises(FastformerError, match="is not a prepared data directory: no meta.json"):
        load_prepared(str(tmp_path))
    prepare([text_file], ByteTokenizer(), str(out))
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text('{"dtype": "uint16", "vocab')
    with pytest.raises(FastformerError, match=r"meta.json is not valid JSON \(corrupt or truncated\)"):
        load_prepared(str(out))
    # parseable but malformed: each refused naming the file and the field
    splits = meta["splits"]
    for bad, message in ((json.dumps([meta]), "meta.json must hold a JSON object, got list"),
                         ("[" * 100_000 + "]" * 100_000, "meta.json is nested too deeply"),
                         (b"\xff\xfe", r"meta.json is not UTF-8 text \(byte 0"),
                         (json.dumps({**meta, "splits": []}), "meta.json: field 'splits' must be dict, got \\[\\]"),
                         (json.dumps({**meta, "dtype": ["uint16"]}), "meta.json: field 'dtype' must be str"),
                         (json.dumps({**meta, "vocab_size": "259"}), "meta.json: field 'vocab_size' must be int"),
                         (json.dumps({**meta, "splits": {**splits, "val": {**splits["val"], "tokens": 2.5}}}),
                          "meta.json split 'val': field 'tokens' must be int, got 2.5"),
                         (json.dumps({**meta, "splits": {**splits, "train": None}}),
                          "meta.json split 'train' must hold a JSON object, got NoneType"),
                         (json.dumps({**meta, "splits": {**splits, "val": {**splits["val"], "tokens": -5}}}),
                          "the val split holds -5 tokens")):
        (out / "meta.json").write_bytes(bad if isinstance(bad, bytes) else bad.encode())
        with pytest.raises(FastformerError, match=message):
            load_prepared(str(out))
    (out / "meta.json").write_text(json.dumps({**meta, "vocab_size": 300}))
    with pytest.raises(FastformerError, match="says vocab_size=300 but its tokenizer.json has 259 ids"):
        load_prepared(str(out))
    (out / "meta.json").write_text(json.dumps({**meta, "dtype": "float32"}))
    with pytest.raises(FastformerError, match="dtype 'float32' is not allowed"):
        load_prepared(str(out))
    (out / "meta.json").write_text(json.dumps(meta))
    with open(out / "val.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(FastformerError, match=r"val.bin should hold \d+ uint16 tokens .* found 10"):
        load_prepared(str(out))


def tiny(path, **data):
    model = ModelConfig(max_seq_len=16, d_model=16, n_heads=2, d_ff=32, n_layers=1)
    train = TrainConfig(batch_size=4, seq_len=16, max_steps=6, warmup_steps=1, log_interval=1, eval_interval=3,
                        eval_batches=2, checkpoint_interval=100)
    return RunConfig.from_dict({"data": {"path": path, **data}},
                               base=RunConfig(model=model, train=train))


def test_training_on_a_prepared_directory_resumes_exactly(tmp_path, text_file, bpe):
    prepare([text_file], bpe, str(tmp_path / "data"))
    config = tiny(str(tmp_path / "data"))
    full = Trainer(config, str(tmp_path / "full"), verbose=False)
    assert full.config.model.vocab_size == bpe.vocab_size  # the default vocab_size follows the tokenizer
    assert isinstance(full.task.train_ids, np.memmap)
    losses = full.train()
    part = Trainer(config, str(tmp_path / "part"), verbose=False)
    first = part.train(steps=2)
    resumed = Trainer(None, str(tmp_path / "part"), resume=True, verbose=False)
    assert first + resumed.train() == losses
    assert np.array_equal(resumed.model.flat.data, full.model.flat.data)
    assert resumed.task.tokenizers["tokenizer"].vocab_size == bpe.vocab_size


def test_prepared_directory_config_errors(tmp_path, text_file):
    prepare([text_file], ByteTokenizer(), str(tmp_path / "data"))
    with pytest.raises(FastformerError, match="data.tokenizer='char' but data.path .* is a prepared directory"):
        Trainer(tiny(str(tmp_path / "data"), tokenizer="char"), str(tmp_path / "r1"), verbose=False)
    config = tiny(str(tmp_path / "data"))
    config.model.vocab_size = 300
    with pytest.raises(FastformerError, match="model.vocab_size=300 but the byte tokenizer has 259 ids"):
        Trainer(config, str(tmp_path / "r2"), verbose=False)
    with pytest.raises(FastformerError, match="not a prepared data directory"):
        Trainer(tiny(str(tmp_path)), str(tmp_path / "r3"), verbose=False)


def test_char_tokenizer_run(tmp_path, text_file):
    trainer = Trainer(tiny(text_file, tokenizer="char"), str(tmp_path / "run"), verbose=False)
    tok = trainer.task.tokenizers["tokenizer"]
    assert tok.kind == "char" and trainer.config.model.vocab_size == tok.vocab_size
    trainer.train(steps=2)
    resumed = Trainer(None, str(tmp_path / "run"), resume=True, verbose=False)
    assert resumed.task.tokenizers["tokenizer"].chars == tok.chars and resumed.step == 2
