"""The encoder-decoder through the trainer, checkpoints and command line: exact resume, train ->
translate -> eval, pairs files with bad lines, config validation for the seq2seq keys."""

import json
import os

import numpy as np
import pytest

from fastformer import Seq2SeqTransformer, use_backend
from fastformer.cli import main
from fastformer.data.tokenizer import ByteTokenizer, CharTokenizer, WordTokenizer, load_tokenizer
from fastformer.errors import FastformerError
from fastformer.models.seq2seq import Seq2SeqConfig
from fastformer.training.checkpoint import checkpoint_dirs, load_checkpoint, load_model
from fastformer.training.config import DataConfig, RunConfig, TrainConfig, apply_overrides, load_config
from fastformer.training.trainer import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TINY_MODEL = dict(max_src_len=8, max_tgt_len=9, d_model=16, n_heads=2, d_ff=32, n_encoder_layers=1,
                  n_decoder_layers=1)
TINY_TRAIN = dict(batch_size=8, max_steps=6, warmup_steps=1, log_interval=1, eval_interval=3, eval_batches=1,
                  checkpoint_interval=100)

TINY_REVERSE_YAML = """\
seq2seq: {max_src_len: 8, max_tgt_len: 9, d_model: 16, n_heads: 2, d_ff: 32, n_encoder_layers: 1,
          n_decoder_layers: 1}
data: {task: reverse, max_len: 8, alphabet: lower}
train: {batch_size: 8, max_steps: 4, warmup_steps: 1, log_interval: 1, eval_interval: 2, eval_batches: 1,
        checkpoint_interval: 2}
"""


def reverse_config(dropout=0.0):
    return RunConfig(data=DataConfig(task="reverse", max_len=8),
                     seq2seq=Seq2SeqConfig(**TINY_MODEL, dropout=dropout), train=TrainConfig(**TINY_TRAIN))


def metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_sec"} for line in f]


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_reverse_task_resumes_bit_for_bit(tmp_path, dropout):
    config = reverse_config(dropout)
    full = Trainer(config, str(tmp_path / "full"), verbose=False)
    losses = full.train()
    part = Trainer(config, str(tmp_path / "part"), verbose=False)
    first = part.train(steps=2)
    del part
    resumed = Trainer(None, str(tmp_path / "part"), resume=True, verbose=False)
    assert resumed.step == 2 and isinstance(resumed.model, Seq2SeqTransformer)
    assert first + resumed.train() == losses  # exact float equality, every step
    assert np.array_equal(resumed.model.flat.data, full.model.flat.data)
    assert metrics(str(tmp_path / "part")) == metrics(str(tmp_path / "full"))
    evals = [r for r in metrics(str(tmp_path / "full")) if "val_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert {"val_loss", "val_acc", "val_exact", "val_bleu"} <= set(evals[0])

    ckpt = load_checkpoint(str(tmp_path / "full"))
    assert ckpt.state["model_kind"] == "seq2seq" and ckpt.config.kind == "seq2seq"
    assert {"src_tokenizer/tokenizer.json", "tgt_tokenizer/tokenizer.json"} <= set(ckpt.state["files"])
    assert ckpt.tokenizers["src"].chars == ckpt.tokenizers["tgt"].chars  # the task's alphabet
    assert ckpt.config.seq2seq.src_vocab_size == ckpt.tokenizers["src"].vocab_size  # followed the tokenizer
    with pytest.raises(FastformerError, match="holds an encoder-decoder .* use fastformer translate or eval"):
        load_model(str(tmp_path / "full"))


def test_the_data_stream_changes_with_the_seed_and_the_task(tmp_path):
    a = Trainer(reverse_config(), str(tmp_path / "a"), verbose=False).task.next_batch()
    b = Trainer(apply_overrides(reverse_config(), ["train.seed=1"]), str(tmp_path / "b"), verbose=False)
    c = Trainer(apply_overrides(reverse_config(), ["data.task=copy"]), str(tmp_path / "c"), verbose=False)
    assert not np.array_equal(a["src_ids"], b.task.next_batch()["src_ids"])
    copy = c.task.next_batch()
    assert np.array_equal(copy["src_ids"], a["src_ids"])  # the same strings ...
    assert not np.array_equal(copy["targets"], a["targets"])  # ... copied instead of reversed


def test_cli_train_translate_eval(tmp_path, capsys):
    cfg = tmp_path / "rev.yaml"
    cfg.write_text(TINY_REVERSE_YAML)
    run = str(tmp_path / "run")
    with use_backend("numpy"):
        assert main(["train", "--config", str(cfg), "--out", run, "--backend", "numpy"]) == 0
    out = capsys.readouterr().out
    assert "(seq2seq) on the reverse task" in out and "done: step 4" in out
    assert [os.path.basename(d) for d in checkpoint_dirs(run)] == ["ckpt-000002", "ckpt-000004"]
    assert main(["train", "--resume", "--out", run, "--max-steps", "5"]) == 0
    assert "done: step 5" in capsys.readouterr().out

    assert main(["translate", "--checkpoint", run, "--text", "abc", "--text", "hello"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(set(line) <= set("abcdefghijklmnopqrstuvwxyz") for line in lines)
    assert main(["translate", "--checkpoint", run, "--text", "abc", "--beam", "3", "--length-penalty", "0.6"]) == 0
    capsys.readouterr()
    sample = ["translate", "--checkpoint", run, "--text", "abc", "--text", "hello", "--temperature", "1.5",
              "--top-k", "5", "--top-p", "0.95", "--seed", "3"]
    assert main(sample) == 0
    sampled = capsys.readouterr().out
    assert len(sampled.splitlines()) == 2
    assert main(sample) == 0 and capsys.readouterr().out == sampled  # seeded
    assert main(["translate", "--checkpoint", run, "--text", "abc", "--text", "hello", "--temperature", "1",
                 "--top-k", "1"]) == 0
    assert capsys.readouterr().out.splitlines() == lines  # top-k 1 is greedy
    assert main(["translate", "--checkpoint", run, "--text", "abc", "--temperature", "1", "--beam", "2"]) == 2
    assert "beam search is deterministic" in capsys.readouterr().err
    # 10 > max_src_len 8: skipped (an empty line), not fatal to the others, reported by its line
    assert main(["translate", "--checkpoint", run, "--text", "abc", "--text", "abcdefghij", "--text", "hello"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [lines[0], "", lines[1]]
    assert err == ("fastformer translate: warning: line 2: 10 source tokens, more than the model's max_src_len=8: "
                   "skipped, its output line is empty (--truncate translates its first tokens)\n")
    assert main(["translate", "--checkpoint", run, "--text", "abcdefghij", "--truncate"]) == 0
    assert "line 1: 10 source tokens, more than the model's max_src_len=8: translated from its first 8" in \
        capsys.readouterr().err
    assert main(["translate", "--checkpoint", run, "--text", "abcdefghij", "--truncate"]) == 0
    assert main(["translate", "--checkpoint", run, "--text", "abcdefgh"]) == 0
    truncated, cut = capsys.readouterr().out.splitlines()
    assert truncated == cut

    assert main(["eval", "--checkpoint", run, "--json"]) == 0  # the trainer's held-out strings
    m = json.loads(capsys.readouterr().out)
    logged = [r for r in metrics(run) if "val_loss" in r][-1]
    assert m["examples"] == 8 and m["loss"] == pytest.approx(logged["val_loss"], rel=1e-6)  # trained on numpy
    assert (m["token_acc"], m["exact_match"]) == (logged["val_acc"], logged["val_exact"])
    assert main(["eval", "--checkpoint", run, "--split", "train"]) == 2
    assert "training strings are drawn fresh every step" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", run, "--examples", "20", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["examples"] == 20 and m["decoding"] == "greedy" and m["bleu_impl"] in ("sacrebleu", "fastformer")
    assert 0.0 <= m["exact_match"] <= 1.0 and 0.0 <= m["token_acc"] <= 1.0 and m["loss"] > 0
    assert main(["eval", "--checkpoint", run, "--examples", "20", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == m  # the same held-out strings every time
    assert main(["eval", "--checkpoint", run, "--examples", "20", "--beam", "2"]) == 0
    out = capsys.readouterr().out
    assert "exact match" in out and "(beam 2, weights fp32)" in out and "BLEU" in out and "scored 20 examples" in out
    assert main(["generate", "--checkpoint", run, "--prompt", "a"]) == 2
    assert "not a language model" in capsys.readouterr().err


def test_pairs_with_bad_lines_train_and_eval(tmp_path, capsys):
    lines = ["I am here.\tJe suis là.", "", "no tab on this line", "You are here.\tTu es là.",
             "one two three four five six seven eight nine ten\tun", "We run.\tNous courons.", "Hello.\t",
             "He is here.\tIl est là."]
    data = tmp_path / "pairs.txt"
    data.write_text("\n".join(lines * 3) + "\n", encoding="utf-8")
    run = str(tmp_path / "run")
    args = ["train", "--task", "pairs", "--data", str(data), "--out", run, "--max-steps", "3",
            "--set", "data.lowercase=true", "--set", "data.val_fraction=0.25", "--set", "train.batch_size=4",
            "--set", "train.eval_interval=3", "--set", "seq2seq.max_src_len=8", "--set", "seq2seq.max_tgt_len=8",
            "--set", "seq2seq.d_model=16", "--set", "seq2seq.n_heads=2", "--set", "seq2seq.d_ff=32",
            "--set", "seq2seq.n_encoder_layers=1", "--set", "seq2seq.n_decoder_layers=1"]
    with use_backend("numpy"):
        assert main(args) == 0
    out = capsys.readouterr().out
    # 3 copies: 3 empty lines, 3 without a tab, 3 with empty sides, 3 too long (10 source words > 8)
    assert "skipped: 3 empty line, 3 no tab, 3 empty side, 3 too long" in out
    ckpt = load_checkpoint(run)
    src, tgt = ckpt.tokenizers["src"], ckpt.tokenizers["tgt"]
    assert isinstance(src, WordTokenizer) and isinstance(tgt, WordTokenizer) and "là" in tgt.words

    assert main(["translate", "--checkpoint", run, "--text", "I am zebra."]) == 0  # unknown word -> <unk>
    assert main(["translate", "--checkpoint", run, "--text", "i am zebra."]) == 0  # the run lower-cased its data
    out, err = capsys.readouterr()
    upper, lower = out.splitlines()
    assert err.count("words outside the source vocabulary, read as <unk>: 'zebra' (line 1)") == 2
    assert upper == lower[:1].upper() + lower[1:]  # the source's capital comes back at the start
    assert main(["eval", "--checkpoint", run, "--data", str(data), "--split", "all"]) == 0
    out = capsys.readouterr().out
    assert "scored 12 examples: all pairs of" in out
    assert "skipped 3 empty line, 3 no tab, 3 empty side, 3 too long" in out
    assert main(["eval", "--checkpoint", run, "--json"]) == 0  # the run's validation pairs, as the trainer scores
    m = json.loads(capsys.readouterr().out)
    logged = [r for r in metrics(run) if "val_loss" in r][-1]
    assert m["data"].startswith("the trainer's validation pairs of") and m["examples"] == 4  # round(0.25 * 15)
    assert m["loss"] == pytest.approx(logged["val_loss"], rel=1e-6) and m["bleu"] == logged["val_bleu"]
    # the run's own file: --split val is the same 4 pairs, --split train the other 11, of which 3 too long
    assert main(["eval", "--checkpoint", run, "--data", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == m["loss"]
    assert main(["eval", "--checkpoint", run, "--data", str(data), "--split", "train", "--json"]) == 0
    train = json.loads(capsys.readouterr().out)
    assert train["examples"] == 8 and train["skipped"] == {"too long": 3}
    assert main(["eval", "--checkpoint", run, "--data", str(tmp_path / "missing.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, message", [
    (["data.task=translate"],
     r"data\.task 'translate' is not known: valid values are text, copy, reverse, sort, pairs"),
    (["data.task=reverse", "data.min_len=5", "data.max_len=3"], r"need 1 <= min_len <= max_len, got 5 and 3"),
    (["data.task=reverse", "data.max_len=80"], r"data\.max_len=80 needs seq2seq\.max_src_len >= 80"),
    (["data.task=sort", "data.alphabet=greek"], r"unknown alphabet name\(s\) \['greek'\]"),
    (["data.task=copy", "data.tokenizer=byte"], r"data\.tokenizer='byte' does not apply to data\.task=copy"),
    (["data.task=pairs", "data.path=p.txt", "data.tokenizer=bpe"], r"valid values are word, char"),
    (["data.val_fraction=0"], r"data\.val_fraction must lie in \(0, 1\) for data\.task=text"),
    (["data.max_pairs=0"], r"data\.max_pairs must be an integer >= 1 or null"),
    (["seq2seq.activation=tanh"], r"activation must be one of gelu, relu"),
    (["seq2seq.d_model=wide"], r"seq2seq\.d_model must be int, got 'wide'"),
    (["seq2seq.depth=3"], r"unknown config key seq2seq\.depth: valid keys of 'seq2seq' are \['src_vocab_size'"),
    (["data.lowercase=maybe"], r"data\.lowercase must be bool"),
])
def test_config_validation_of_the_seq2seq_keys(overrides, message):
    with pytest.raises(FastformerError, match=message):
        apply_overrides(RunConfig(), overrides)


def test_a_pairs_recipe_loads_without_a_path_and_training_asks_for_data(tmp_path, capsys):
    recipe = os.path.join(REPO, "experiments", "configs", "tiny_enfr.yaml")
    assert load_config(recipe).data.path is None  # the data path is given on the command line
    with pytest.raises(FastformerError, match=r"data\.task=pairs needs data\.path: .*\(--data\)"):
        Trainer(apply_overrides(RunConfig(), ["data.task=pairs"]), str(tmp_path / "run"))
    assert main(["train", "--config", recipe, "--out", str(tmp_path / "enfr")]) == 2
    assert "data.task=pairs needs data.path" in capsys.readouterr().err
    assert not (tmp_path / "enfr").exists()


def test_seq2seq_configs_round_trip_and_cli_refuses_presets(tmp_path, capsys):
    c = apply_overrides(RunConfig(), ["data.task=pairs", "data.path=p.txt", "data.val_fraction=0",
                                      "seq2seq.d_model=32"])
    assert c.kind == "seq2seq" and c.model_config().d_model == 32
    assert list(c.to_dict()) == ["seq2seq", "data", "train"]  # only the model section in use
    assert list(RunConfig().to_dict()) == ["model", "data", "train"]
    from fastformer.training.config import save_config

    save_config(c, str(tmp_path / "c.yaml"))
    assert load_config(str(tmp_path / "c.yaml")) == c
    for name in ("tiny_reverse", "tiny_enfr", "small_enfr"):
        cfg = load_config(os.path.join(REPO, "experiments", "configs", f"{name}.yaml"))
        assert cfg.kind == "seq2seq"
    assert main(["train", "--task", "reverse", "--preset", "tiny", "--out", str(tmp_path / "r")]) == 2
    assert "--preset sizes language models" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_every_tokenizer_kind_loads_through_one_registry(tmp_path):
    from fastformer.data.bpe import BPETokenizer

    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat. " * 50, encoding="utf-8")
    toks = {"byte": ByteTokenizer(), "char": CharTokenizer.from_text("the cat"),
            "word": WordTokenizer.build(["the cat sat"]), "bpe": BPETokenizer.train([str(text)], 300)}
    for kind, tok in toks.items():
        tok.save(str(tmp_path / kind))
        again = load_tokenizer(str(tmp_path / kind))
        assert again.kind == kind and type(again) is type(tok) and again.vocab_size == tok.vocab_size
        ids = again.encode("the cat")
        assert ids.dtype == np.int64 and again.decode(ids).replace(" ", "") == "thecat"
        assert again.byte_lengths().shape == (again.vocab_size,)


def test_unique_sources_keeps_the_first_translation_and_max_pairs_counts_after(tmp_path):
    from fastformer.training.tasks import Seq2SeqTask

    data = tmp_path / "p.txt"
    data.write_text("Run!\tCours !\nRun!\tCourez !\nWho?\tQui ?\nWow!\tÇa alors !\nFire!\tAu feu !\n", encoding="utf-8")
    config = apply_overrides(RunConfig(), ["data.task=pairs", f"data.path={data}", "data.val_fraction=0",
                                           "data.unique_sources=true", "data.max_pairs=3"])
    task = Seq2SeqTask(config)
    assert task.val_pairs == [("Run!", "Cours !"), ("Who?", "Qui ?"), ("Wow!", "Ça alors !")]  # val = train
    assert task.n_train == 3
