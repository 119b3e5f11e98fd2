"""Corruption fuzzing of the files fastformer reads back: a run's config.yaml, tokenizer.json
(byte, char, word and BPE), a prepared directory's meta.json and a Hugging Face config.json.
Random truncations, byte flips, values of the wrong type and deep nesting must end in a
FastformerError naming the file, or in a loaded object that is whole (it encodes, its arrays have
the sizes it claims) -- never in another exception.

CI runs a few examples per file; FASTFORMER_FUZZ_EXAMPLES=500 runs many more.
"""

import json
import os
import shutil
import tempfile
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastformer import FastformerError, TransformerLM
from fastformer.data.bpe import BPETokenizer
from fastformer.data.prepare import load_prepared, prepare
from fastformer.data.tokenizer import ByteTokenizer, CharTokenizer, WordTokenizer, load_tokenizer
from fastformer.models.config import LMConfig
from fastformer.models.hf import save_hf
from fastformer.training.config import RunConfig, load_config, preset, save_config

EXAMPLES = int(os.environ.get("FASTFORMER_FUZZ_EXAMPLES", "15"))
TEXT = "To be, or not to be, that is the question.\n" * 30
ODD_VALUES = [None, "abc", "", [], {}, [1], -1, 0, 1.5, True, 10 ** 12, "nan", "1e-3", {"a": 1}]


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """{name: (directory, file name)} of one good file of each kind."""
    root = tmp_path_factory.mktemp("originals")
    (root / "text.txt").write_text(TEXT)
    out = {}
    save_config(preset("tiny"), str(root / "config.yaml"))
    out["config.yaml"] = (root, "config.yaml")
    for name, tok in {"byte": ByteTokenizer(), "char": CharTokenizer.from_text(TEXT),
                      "word": WordTokenizer.build([TEXT]), "bpe": BPETokenizer.train(str(root / "text.txt"), 280)
                      }.items():
        tok.save(str(root / name))
        out[f"tokenizer.json ({name})"] = (root / name, "tokenizer.json")
    prepare([str(root / "text.txt")], ByteTokenizer(), str(root / "prep"), progress=False)
    out["meta.json"] = (root / "prep", "meta.json")
    save_hf(TransformerLM(LMConfig(max_seq_len=16, d_model=8, n_heads=2, d_ff=16, n_layers=1)), str(root / "hf"))
    ByteTokenizer().save(str(root / "hf"))
    out["HF config.json"] = (root / "hf", "config.json")
    return out


def _paths(value, prefix=()):
    """Every key path into a parsed JSON/YAML value."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value[:20]):
            yield from _paths(v, prefix + (i,))


def _replace(value, path, new):
    if not path:
        return new
    value = value.copy() if isinstance(value, (dict, list)) else value
    value[path[0]] = _replace(value[path[0]], path[1:], new)
    return value


@st.composite
def corruption(draw, raw, parse, dump):
    """A corrupted copy of the bytes `raw` (a file that parses with `parse` and is written back
    with `dump`)."""
    kind = draw(st.sampled_from(["truncate", "flip", "type", "nest"]))
    if kind == "truncate":
        return raw[:draw(st.integers(0, len(raw) - 1))]
    if kind == "flip":
        data = bytearray(raw)
        for _ in range(draw(st.integers(1, 3))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
        return bytes(data)
    if kind == "type":
        value = parse(raw)
        path = draw(st.sampled_from(list(_paths(value))))
        return dump(_replace(value, path, draw(st.sampled_from(ODD_VALUES))))
    depth = draw(st.sampled_from([50, 1000, 100_000]))
    return ("[" * depth + "]" * depth).encode() if draw(st.booleans()) else \
        ('{"a": ' * depth + "1" + "}" * depth).encode()


def _yaml(raw):
    import yaml

    return yaml.safe_load(raw.decode())


def _yaml_dump(value):
    import yaml

    return yaml.safe_dump(value).encode()


def _json_dump(value):
    return json.dumps(value).encode()


def load_and_check(name, directory):
    """Load the (possibly corrupted) file as fastformer does, and check what loads is whole."""
    if name == "config.yaml":
        config = load_config(os.path.join(directory, "config.yaml"))
        assert isinstance(config, RunConfig) and RunConfig.from_dict(config.to_dict()) == config
    elif name.startswith("tokenizer.json"):
        tok = load_tokenizer(directory)
        ids = tok.encode("To be, or not", bos=True, eos=True)
        assert ids.dtype == np.int64 and ((0 <= ids) & (ids < tok.vocab_size)).all()
        assert isinstance(tok.decode(ids), str) and len(tok.byte_lengths()) == tok.vocab_size
    elif name == "meta.json":
        data = load_prepared(directory)
        for split in ("train", "val"):
            assert len(getattr(data, split)) == data.meta["splits"][split]["tokens"] >= 1
        assert data.train.max() < data.tokenizer.vocab_size
    else:
        model = TransformerLM.from_pretrained(directory)
        assert model.forward(np.array([[1, 2, 3]])).shape == (1, 3, model.config.vocab_size)


@pytest.mark.parametrize("name", ["config.yaml", "tokenizer.json (byte)", "tokenizer.json (char)",
                                  "tokenizer.json (word)", "tokenizer.json (bpe)", "meta.json", "HF config.json"])
def test_a_corrupted_file_is_refused_or_loads_whole(originals, name):
    directory, fname = originals[name]
    with open(os.path.join(directory, fname), "rb") as f:
        raw = f.read()
    parse, dump = (_yaml, _yaml_dump) if fname.endswith(".yaml") else (lambda b: json.loads(b.decode()), _json_dump)

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(corruption(raw, parse, dump))
    def check(bad):
        work = tempfile.mkdtemp()
        try:
            target = os.path.join(work, "d")
            shutil.copytree(directory, target)
            with open(os.path.join(target, fname), "wb") as f:
                f.write(bad)
            with mock.patch("fastformer.errors.available_memory", return_value=1 << 30, create=True):
                try:
                    load_and_check(name, target)
                except FastformerError as e:
                    message = str(e)
                    assert target in message or fname in message, f"the refusal does not name the file: {e}"
        finally:
            shutil.rmtree(work, ignore_errors=True)

    check()
