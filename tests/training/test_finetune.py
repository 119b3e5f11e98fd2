"""Fine-tuning (`train --init-from DIR`): from a locally saved, randomly initialised Hugging Face
GPT2LMHeadModel or from another run's checkpoint -- its config, tokenizer and weights, a fresh
optimizer at step 0; --set changes what leaves the weights' shapes alone and is refused otherwise."""

import json
import os

import numpy as np
import pytest
from small_runs import TEXT

from fastformer.cli import main
from fastformer.data.bpe import GPT2_SPECIAL, BPETokenizer
from fastformer.data.tokenizer import ByteTokenizer, load_tokenizer
from fastformer.errors import FastformerError
from fastformer.training.checkpoint import load_checkpoint, load_model
from fastformer.training.config import apply_overrides
from fastformer.training.export import hf_tokenizer
from fastformer.training.finetune import init_config
from fastformer.training.trainer import Trainer

SMALL = ["--set", "train.batch_size=4", "--set", "train.seq_len=16", "--set", "train.warmup_steps=1",
         "--set", "train.log_interval=1", "--set", "train.eval_interval=3", "--set", "train.eval_batches=1"]


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text(TEXT)
    return str(path)


@pytest.fixture
def hf_dir(tmp_path):
    """A randomly initialised GPT2LMHeadModel saved with save_pretrained, and a tokenizer.json."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=259, n_positions=32, n_embd=16, n_head=2, n_layer=2, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    path = tmp_path / "gpt2-tiny"
    model.save_pretrained(path)
    hf_tokenizer(ByteTokenizer()).save(str(path / "tokenizer.json"))
    return str(path), {k: v.detach().numpy() for k, v in model.state_dict().items()}, model


def test_init_from_a_hugging_face_gpt2_directory(hf_dir, data, tmp_path, capsys):
    import torch

    path, hf_weights, hf_model = hf_dir
    trainer = Trainer(None, str(tmp_path / "direct"), text=TEXT, init_from=path, verbose=False)
    assert trainer.step == 0 and trainer.optimizer.t == 0 and not trainer.optimizer.state_dict()["exp_avg"].any()
    c = trainer.config.model
    assert (c.vocab_size, c.max_seq_len, c.d_model, c.n_layers, c.d_ff) == (259, 32, 16, 2, 64)
    for name, value in trainer.model.state_dict().items():
        np.testing.assert_array_equal(value, hf_weights[name], err_msg=name)
    ids = np.random.default_rng(1).integers(0, 259, size=(2, 32))
    with torch.no_grad():
        want = hf_model(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(trainer.model.forward(ids), want, atol=1e-4)

    # the command: overrides that leave the shapes alone apply
    run = str(tmp_path / "ft")
    code = main(["train", "--init-from", path, "--data", data, "--out", run, "--max-steps", "3",
                 "--set", "model.dropout=0.1", "--set", "train.lr=1e-4", *SMALL])
    out = capsys.readouterr().out
    assert code == 0 and f"weights from {path}" in out and "done: step 3" in out
    ckpt = load_checkpoint(run)
    assert ckpt.step == 3 and ckpt.config.model.dropout == 0.1 and ckpt.config.train.lr == 1e-4
    assert ckpt.state["init_from"] == path and ckpt.tokenizer.kind == "bpe"
    moved = [n for n, w in ckpt.weights.items() if not np.array_equal(w, hf_weights[n])]
    assert moved  # it trained
    # and the fine-tuned run resumes as any run
    assert main(["train", "--resume", "--out", run, "--max-steps", "4"]) == 0
    assert load_checkpoint(run).step == 4


def test_init_from_another_run_takes_its_config_tokenizer_and_weights(data, tmp_path, capsys):
    src = str(tmp_path / "src")
    assert main(["train", "--data", data, "--tokenizer", "char", "--out", src, "--max-steps", "4",
                 "--set", "model.max_seq_len=16", "--set", "model.d_model=16", "--set", "model.n_heads=2",
                 "--set", "model.d_ff=32", "--set", "model.n_layers=1", *SMALL]) == 0
    source = load_checkpoint(src)
    other = tmp_path / "other.txt"
    other.write_text("a bird sang to the dog on the mat\n" * 100)
    trainer = Trainer(apply_overrides(init_config(src), [f"data.path={other}", "train.max_steps=2"]),
                      str(tmp_path / "ft"), init_from=src, verbose=False)
    assert trainer.step == 0 and trainer.optimizer.t == 0
    assert trainer.config.model == source.config.model and trainer.config.data.path == str(other)
    tok = trainer.task.tokenizers["tokenizer"]
    assert tok.kind == "char" and tok.chars == source.tokenizer.chars  # the source's, not one built from other.txt
    for name, value in trainer.model.state_dict().items():
        np.testing.assert_array_equal(value, source.weights[name], err_msg=name)
    trainer.train()
    assert load_checkpoint(str(tmp_path / "ft")).step == 2
    # from the command line too, and the train settings of the source run carry over
    capsys.readouterr()
    assert main(["train", "--init-from", src, "--data", str(other), "--out", str(tmp_path / "ft2"),
                 "--max-steps", "2"]) == 0
    ft = load_checkpoint(str(tmp_path / "ft2"))
    assert ft.config.train.batch_size == 4 and ft.config.model == source.config.model
    model, tokenizer, _ = load_model(str(tmp_path / "ft2"))
    assert tokenizer.chars == source.tokenizer.chars


@pytest.mark.parametrize("extra, match", [
    (["--set", "model.d_model=32"], r"model\.d_model=32 differs from its 16; the weights fix the model's shape, "
                                    r"so of the model settings only model\.dropout may change"),
    (["--set", "model.positions=sinusoidal"], r"model\.positions=sinusoidal differs from its learned"),
    (["--preset", "small"], r"--init-from takes the model and its tokenizer from .*: drop --preset"),
    (["--tokenizer", "byte"], r"drop --tokenizer"),
    (["--task", "reverse"], r"holds a language model, but data\.task=reverse trains an encoder-decoder"),
])
def test_changes_the_weights_cannot_take_are_refused(hf_dir, data, tmp_path, capsys, extra, match):
    path = hf_dir[0]
    code = main(["train", "--init-from", path, "--data", data, "--out", str(tmp_path / "r"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert __import__("re").search(match, err), err
    assert not os.path.exists(tmp_path / "r")


def test_bad_sources_are_refused(hf_dir, tmp_path, capsys):
    path = hf_dir[0]
    with pytest.raises(FastformerError, match="is not a directory"):
        init_config(str(tmp_path / "missing"))
    os.remove(os.path.join(path, "tokenizer.json"))
    with pytest.raises(FastformerError, match="has no tokenizer.json: fine-tuning needs the model's tokenizer"):
        Trainer(None, str(tmp_path / "r"), text=TEXT, init_from=path, verbose=False)
    with pytest.raises(FastformerError, match="give one of them"):
        Trainer(None, str(tmp_path / "r"), init_from=path, resume=True)
    code = main(["train", "--resume", "--init-from", path, "--out", str(tmp_path / "r")])
    assert code == 2 and "drop --preset/--config/--seed/--task/--init-from" in capsys.readouterr().err


def test_gpt2s_own_tokenizer_is_read_with_endoftext_as_its_special(tmp_path):
    tk = pytest.importorskip("tokenizers")
    base = hf_tokenizer(ByteTokenizer())  # byte-level BPE without merges
    d = json.loads(base.to_str())
    d["added_tokens"] = [{"id": 256, "content": GPT2_SPECIAL, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}]
    d["model"]["vocab"] = {k: v for k, v in d["model"]["vocab"].items() if v < 256}
    d["model"]["vocab"][GPT2_SPECIAL] = 256
    (tmp_path / "tokenizer.json").write_text(json.dumps(d))
    tok = load_tokenizer(str(tmp_path))
    assert isinstance(tok, BPETokenizer) and tok.vocab_size == 257
    assert tok.pad_id == tok.bos_id == tok.eos_id == 256 and tok.special_tokens == {GPT2_SPECIAL: 256}
    ids = tok.encode("hi there", eos=True)
    assert ids[-1] == 256 and tok.decode(ids) == "hi there"
    assert tk.Tokenizer.from_str(json.dumps(d)).get_vocab_size() == 257
