"""Bad-input probes of the `fastformer` command: each case is an argument list over a small tree
of fixtures (a tiny language-model run, a tiny encoder-decoder run, a prepared directory, a
Hugging Face export, corrupted copies of them) and what the command must do with it.

    python tests/cli/probes.py [--timeout S] [--class NAME] [-v]

runs every case in a child process (FASTFORMER_NUM_THREADS=1, address space capped so a memory
bomb cannot take the machine) and prints, by class, how many cases ended

    clean          as expected: exit 2 with one line on stderr, or exit 0 with a result
    traceback      a traceback, or a crash by signal (SIGABRT, SIGSEGV, SIGKILL...)
    hang           still running after the timeout
    wrong success  exit 0 where the input had to be refused (or refused where it had to work)
    data lost      a file outside the case's output directory changed or disappeared

tests/cli/test_probes.py runs the same cases in-process in the test suite.
"""

import argparse
import contextlib
import hashlib
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

TEXT = "To be, or not to be, that is the question.\n" * 40

TINY_YAML = """\
model: {max_seq_len: 32, d_model: 16, n_heads: 2, d_ff: 32, n_layers: 1}
train: {batch_size: 4, seq_len: 32, max_steps: 4, warmup_steps: 1, log_interval: 1, eval_interval: 2,
        eval_batches: 1, checkpoint_interval: 2}
"""

SEQ2SEQ_YAML = """\
seq2seq: {d_model: 16, n_heads: 2, d_ff: 32, n_encoder_layers: 1, n_decoder_layers: 1, max_src_len: 12,
          max_tgt_len: 13}
data: {task: reverse, max_len: 8}
train: {batch_size: 4, max_steps: 2, warmup_steps: 1, log_interval: 1, eval_interval: 2, eval_batches: 1,
        checkpoint_interval: 2}
"""

GPT2_CONFIG = {"model_type": "gpt2", "vocab_size": 259, "n_positions": 32, "n_embd": 16, "n_head": 2,
               "n_inner": 32, "n_layer": 1, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5}


def _cli(args):
    """Run the command in this process (fixture building): raises on failure."""
    from fastformer import use_backend
    from fastformer.cli import main

    with use_backend("numpy"), contextlib.redirect_stdout(io.StringIO()):
        if main(args):
            raise RuntimeError(f"fixture command {args} failed")


def _write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def _hf_variant(root, name, cfg):
    """A copy of the exported Hugging Face directory with its config.json replaced by `cfg`
    (a dict/list dumped as JSON, or raw str/bytes)."""
    d = os.path.join(root, name)
    shutil.copytree(os.path.join(root, "hf"), d)
    _write(os.path.join(d, "config.json"), cfg if isinstance(cfg, (str, bytes)) else json.dumps(cfg))
    return d


def _prep_variant(root, name, meta):
    d = os.path.join(root, name)
    shutil.copytree(os.path.join(root, "prep"), d)
    _write(os.path.join(d, "meta.json"), meta if isinstance(meta, (str, bytes)) else json.dumps(meta))
    return d


def _tok_variant(root, name, d):
    path = os.path.join(root, name, "tokenizer.json")
    _write(path, d if isinstance(d, (str, bytes)) else json.dumps(d))
    return os.path.dirname(path)


DEEP = "[" * 100_000 + "]" * 100_000


def _nan_weights(run):
    """Rewrite the newest checkpoint of `run` with every weight NaN (a run that diverged)."""
    import numpy as np

    from fastformer.training.checkpoint import load_checkpoint, save_checkpoint
    from fastformer.training.optim import make_optimizer

    ck = load_checkpoint(run)
    model = ck.new_model()
    model.flat.data[:] = np.nan
    opt = make_optimizer(model.flat, ck.config.train)
    opt.load_state_dict(ck.optimizer_state)
    save_checkpoint(run, ck.step, model, opt, ck.config, ck.tokenizers, ck.state["rng"],
                    extra={"data_sha256": ck.state.get("data_sha256")})


def build_fixtures(root):
    """Make the fixture tree under `root` (a few seconds: two tiny training runs)."""
    _write(os.path.join(root, "data.txt"), TEXT)
    _write(os.path.join(root, "empty.txt"), "")
    _write(os.path.join(root, "latin1.txt"), "caf\xe9 na\xefve\n".encode("latin-1") * 50)
    _write(os.path.join(root, "tiny.yaml"), TINY_YAML)
    _write(os.path.join(root, "s2s.yaml"), SEQ2SEQ_YAML)
    _write(os.path.join(root, "latin1.yaml"), "train: {max_steps: 4}  # caf\xe9\n".encode("latin-1"))
    _write(os.path.join(root, "deep.yaml"), "model: " + "[" * 10_000 + "]" * 10_000 + "\n")
    _write(os.path.join(root, "list.yaml"), "- 1\n- 2\n")
    levels = ["&l0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 8)]
    _write(os.path.join(root, "bomb.yaml"), "model:\n  d_model: [" + ", ".join(levels) + "]\n")  # 9**8 leaves
    _write(os.path.join(root, "foreign", "notes.txt"), "my notes\n")  # a folder fastformer did not write
    _write(os.path.join(root, "foreign", "config.yaml"), "learning_rate: 3\n")
    _write(os.path.join(root, "foreign", "ckpt-1", "data.csv"), "a,b\n")
    _write(os.path.join(root, "pairs.tsv"), "hello\tolleh\nabc\tcba\n" * 5)
    data, cfg = os.path.join(root, "data.txt"), os.path.join(root, "tiny.yaml")
    _cli(["train", "--config", cfg, "--data", data, "--out", os.path.join(root, "lm")])
    _cli(["train", "--config", os.path.join(root, "s2s.yaml"), "--out", os.path.join(root, "s2s")])
    _cli(["export", "--checkpoint", os.path.join(root, "lm"), "--format", "hf", "--out", os.path.join(root, "hf")])
    _cli(["prepare", "--data", data, "--out", os.path.join(root, "prep")])
    # a run whose newest checkpoint holds NaN weights (and its Hugging Face export)
    shutil.copytree(os.path.join(root, "lm"), os.path.join(root, "nanrun"))
    _nan_weights(os.path.join(root, "nanrun"))
    _cli(["export", "--checkpoint", os.path.join(root, "nanrun"), "--format", "hf",
          "--out", os.path.join(root, "hfnan")])

    hf = GPT2_CONFIG
    for name, cfg in {"hf_list": [hf], "hf_eps_str": {**hf, "layer_norm_epsilon": "abc"},
                      "hf_badjson": "{\"model_type\": \"gpt2\", ", "hf_deep": DEEP,
                      "hf_binary": b"\xff\xfe\x00garbage", "hf_positions": {**hf, "n_positions": 10 ** 12},
                      "hf_inner": {**hf, "n_inner": 10 ** 10}, "hf_layers": {**hf, "n_layer": 10 ** 6},
                      "hf_vocab": {**hf, "vocab_size": 10 ** 9}, "hf_embd_str": {**hf, "n_embd": "16"},
                      "hf_layer_float": {**hf, "n_layer": 1.5}, "hf_eps_list": {**hf, "layer_norm_epsilon": [1]},
                      "hf_tie_str": {**hf, "tie_word_embeddings": "yes"},
                      "hf_flag_str": {**hf, "add_cross_attention": "no"},
                      "hf_model_type_list": {**hf, "model_type": ["gpt2"]},
                      "hf_act_list": {**hf, "activation_function": []},
                      "hf_inner_zero": {**hf, "n_inner": 0},
                      "hf_noscale": {**hf, "scale_attn_weights": False}}.items():
        _hf_variant(root, name, cfg)

    with open(os.path.join(root, "prep", "meta.json")) as f:
        meta = json.load(f)
    variants = {"prep_list": [meta], "prep_trunc": json.dumps(meta)[:40], "prep_deep": DEEP,
                "prep_dtype": {**meta, "dtype": "float32"}, "prep_dtype_bad": {**meta, "dtype": "nonsense"},
                "prep_tokens_str": {**meta, "splits": {**meta["splits"], "train": {**meta["splits"]["train"],
                                                                                   "tokens": "ten"}}},
                "prep_tokens_neg": {**meta, "splits": {**meta["splits"], "val": {**meta["splits"]["val"],
                                                                                 "tokens": -5}}},
                "prep_tokens_float": {**meta, "splits": {**meta["splits"], "val": {**meta["splits"]["val"],
                                                                                   "tokens": 2.5}}},
                "prep_splits_list": {**meta, "splits": []}, "prep_vocab_str": {**meta, "vocab_size": "259"},
                "prep_binary": b"\x00\xff\xfe"}
    for name, m in variants.items():
        _prep_variant(root, name, m)

    _tok_variant(root, "tok_wordlevel_sparse", {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": {"<pad>": 0, "<bos>": 1, "<eos>": 2, "a": 7, "b": 1000},
                  "unk_token": "<pad>"}})
    _tok_variant(root, "tok_char_ints", {"kind": "char", "specials": ["<pad>", "<bos>", "<eos>", "<unk>"],
                                         "vocab": [1, 2]})
    _tok_variant(root, "tok_deep", DEEP)
    _tok_variant(root, "tok_byte_list", [1, 2])
    _tok_variant(root, "tok_word_lower_str", {"kind": "word", "specials": ["<pad>", "<bos>", "<eos>", "<unk>"],
                                              "vocab": ["a"], "lowercase": "yes"})
    _tok_variant(root, "tok_bpe_model_list", {"model": {"type": "BPE", "vocab": [], "merges": []}})
    _tok_variant(root, "tok_kind_list", {"kind": ["char"]})


@dataclass
class Case:
    cls: str  # the class of the probe table
    name: str
    args: list  # argv after "fastformer"; "{R}" is the fixture root, "{O}" the case's own output directory
    expect: str = "refuse"  # refuse: exit 2, one line | ok: exit 0 | fail: exit 1 or 2, one line
    env: dict = field(default_factory=dict)
    copy: str = None  # copy this fixture directory to {O} first (commands that write into a run)


def _cases():
    R, O = "{R}", "{O}"  # noqa: E741 -- the fixture root and the output directory, as in the argument lists
    lm, s2s, data = f"{R}/lm", f"{R}/s2s", f"{R}/data.txt"
    tiny = ["train", "--config", f"{R}/tiny.yaml", "--data", data, "--out", O]
    gen = ["generate", "--checkpoint", lm, "--prompt", "To", "--max-new-tokens", "4"]
    ev = ["eval", "--checkpoint", lm, "--data", data]
    tr = ["translate", "--checkpoint", s2s, "--text", "abc"]
    c = []
    add = lambda cls, name, args, expect="refuse", **kw: c.append(Case(cls, name, args, expect, **kw))  # noqa: E731

    # ------------------------------------------------------------ memory bombs
    add("memory", "tokenizer vocab 1e9", ["tokenizer", "train", "--data", data, "--vocab-size", "1000000000",
                                          "--out", O])
    add("memory", "tokenizer vocab 2**31", ["tokenizer", "train", "--data", data, "--vocab-size", str(2 ** 31),
                                            "--out", O])
    for name in ("positions", "inner", "layers", "vocab"):
        add("memory", f"HF config {name} huge (generate)", ["generate", "--checkpoint", f"{R}/hf_{name}",
                                                            "--prompt", "To", "--max-new-tokens", "2"])
    add("memory", "HF n_positions 1e12 (eval)", ["eval", "--checkpoint", f"{R}/hf_positions", "--data", data])
    add("memory", "HF n_layer 1e6 (export)", ["export", "--checkpoint", f"{R}/hf_layers", "--format", "hf",
                                              "--out", O])
    for key, value in (("train.batch_size", 100000), ("model.d_model", 100000), ("model.vocab_size", 10 ** 9),
                       ("model.n_layers", 10 ** 6), ("model.max_seq_len", 10 ** 9), ("model.d_ff", 10 ** 10)):
        heads = ["--set", "model.n_heads=1"] if key == "model.d_model" else []
        add("memory", f"train {key}={value}", tiny + ["--set", f"{key}={value}"] + heads)
    add("memory", "seq2seq max_src_len 1e9", ["train", "--config", f"{R}/s2s.yaml", "--out", O,
                                              "--set", "seq2seq.max_src_len=1000000000"])
    add("memory", "seq2seq d_ff 1e10", ["train", "--config", f"{R}/s2s.yaml", "--out", O,
                                        "--set", "seq2seq.d_ff=10000000000"])
    add("memory", "eval batch_size 1e7 (as many windows as the text has)", ev + ["--batch-size", "10000000"],
        expect="ok")
    add("memory", "generate max-new-tokens 1e12 (stops at <eos>)", gen[:-1] + ["1000000000000"], expect="ok")
    add("memory", "generate beam 1e6", gen + ["--beam", "1000000"])
    add("memory", "translate beam 1e6", tr + ["--beam", "1000000"])
    add("memory", "eval seq2seq examples 1e9", ["eval", "--checkpoint", s2s, "--examples", "1000000000"])

    # ------------------------------------------------------- malformed files
    for name in ("list", "eps_str", "badjson", "deep", "binary", "embd_str", "layer_float", "eps_list", "tie_str",
                 "flag_str", "model_type_list", "act_list", "inner_zero"):
        add("malformed", f"HF config.json {name}", ["generate", "--checkpoint", f"{R}/hf_{name}", "--prompt", "To",
                                                    "--max-new-tokens", "2"])
    add("malformed", "HF config.json list (eval)", ["eval", "--checkpoint", f"{R}/hf_list", "--data", data])
    for name in ("list", "trunc", "deep", "dtype", "dtype_bad", "tokens_str", "tokens_neg", "tokens_float",
                 "splits_list", "vocab_str", "binary"):
        add("malformed", f"meta.json {name} (eval)", ev[:-1] + [f"{R}/prep_{name}"])
    add("malformed", "meta.json list (train)", ["train", "--config", f"{R}/tiny.yaml", "--data", f"{R}/prep_list",
                                                "--out", O])
    for name in ("wordlevel_sparse", "char_ints", "deep", "byte_list", "word_lower_str", "bpe_model_list",
                 "kind_list"):
        add("malformed", f"tokenizer.json {name} (prepare)", ["prepare", "--data", data, "--tokenizer",
                                                               f"{R}/tok_{name}", "--out", O])
    add("malformed", "tokenizer.json wordlevel sparse (train)", tiny + ["--tokenizer", f"{R}/tok_wordlevel_sparse"])
    add("malformed", "BPE training on non-UTF-8", ["tokenizer", "train", "--data", f"{R}/latin1.txt",
                                                   "--vocab-size", "300", "--out", O])
    add("malformed", "char training on non-UTF-8", ["tokenizer", "train", "--kind", "char", "--data",
                                                    f"{R}/latin1.txt", "--out", O])
    add("malformed", "non-UTF-8 --config", ["train", "--config", f"{R}/latin1.yaml", "--out", O])
    add("malformed", "deeply nested --config", ["train", "--config", f"{R}/deep.yaml", "--out", O])
    add("malformed", "--config that is a list", ["train", "--config", f"{R}/list.yaml", "--out", O])
    add("malformed", "non-UTF-8 --config (info)", ["info", "--config", f"{R}/latin1.yaml"])
    add("malformed", "train on non-UTF-8 data", ["train", "--config", f"{R}/tiny.yaml", "--data", f"{R}/latin1.txt",
                                                 "--out", O])
    add("malformed", "eval on non-UTF-8 data", ev[:-1] + [f"{R}/latin1.txt"])
    add("malformed", "eval --batch-size -1", ev + ["--batch-size", "-1"])
    add("malformed", "eval --seq-len -1", ev + ["--seq-len", "-1"])
    add("malformed", "eval --max-batches -1", ev + ["--max-batches", "-1"])
    add("malformed", "seq2seq eval --data DIR", ["eval", "--checkpoint", s2s, "--data", R])
    add("malformed", "seq2seq eval --batch-size -1", ["eval", "--checkpoint", s2s, "--batch-size", "-1"])
    add("malformed", "seq2seq eval --examples -1", ["eval", "--checkpoint", s2s, "--examples", "-1"])
    add("malformed", "seq2seq eval --data non-UTF-8", ["eval", "--checkpoint", s2s, "--data", f"{R}/latin1.txt"])
    add("malformed", "prepare --val-fraction nan", ["prepare", "--data", data, "--val-fraction", "nan", "--out", O])

    # ------------------------------------------------------- wrong success
    add("wrong success", "train --data ''", tiny[:4] + ["", "--out", O])
    add("wrong success", "train --tokenizer ''", tiny + ["--tokenizer", ""])
    add("wrong success", "train --preset ''", ["train", "--preset", "", "--data", data, "--max-steps", "1",
                                               "--out", O])
    add("wrong success", "train --config ''", ["train", "--config", "", "--data", data, "--max-steps", "1",
                                               "--out", O])
    add("wrong success", "info --preset ''", ["info", "--preset", ""])
    add("wrong success", "info --config ''", ["info", "--config", ""])
    add("wrong success", "generate --stop ''", gen + ["--stop", ""])
    add("wrong success", "prepare --dataset ''", ["prepare", "--dataset", "", "--out", O])
    add("wrong success", "train --backend ''", tiny + ["--backend", ""])
    add("wrong success", "generate --backend ''", gen + ["--backend", ""])
    add("wrong success", "eval --backend ''", ev + ["--backend", ""])
    add("wrong success", "translate --backend ''", tr + ["--backend", ""])
    add("wrong success", "eval --batch-size 0", ev + ["--batch-size", "0"])
    add("wrong success", "eval --seq-len 0", ev + ["--seq-len", "0"])
    add("wrong success", "eval --max-batches 0", ev + ["--max-batches", "0"])
    add("wrong success", "eval --seq-len 1e6 (beyond the context)", ev + ["--seq-len", "1000000"])
    add("wrong success", "seq2seq eval --examples 0", ["eval", "--checkpoint", s2s, "--examples", "0"])
    add("wrong success", "seq2seq eval --batch-size 0", ["eval", "--checkpoint", s2s, "--batch-size", "0"])
    add("wrong success", "eval --length-penalty nan", ["eval", "--checkpoint", s2s, "--length-penalty", "nan"])
    add("wrong success", "LM eval --beam 3 (applies to seq2seq)", ev + ["--beam", "3"])
    add("wrong success", "LM eval --examples 5 (applies to seq2seq)", ev + ["--examples", "5"])
    add("wrong success", "seq2seq eval --seq-len 5 (applies to LMs)", ["eval", "--checkpoint", s2s, "--seq-len", "5"])
    add("wrong success", "seq2seq eval --split train (applies to prepared)", ["eval", "--checkpoint", s2s,
                                                                              "--split", "train"])
    for key, value in (("grad_clip", "nan"), ("min_lr", "inf"), ("lr", "nan"), ("lr", "inf"), ("weight_decay", "inf"),
                       ("eps", "nan"), ("grad_clip", "inf")):
        add("wrong success", f"--set train.{key}={value}", tiny + ["--set", f"train.{key}={value}"])
    add("wrong success", "--set model.dropout=nan", tiny + ["--set", "model.dropout=nan"])
    add("wrong success", "--set data.val_fraction=nan", tiny + ["--set", "data.val_fraction=nan"])
    for base, name, extra in ((tr, "translate", ["--beam", "2", "--length-penalty", "nan"]),
                              (tr, "translate", ["--beam", "2", "--length-penalty", "inf"]),
                              (tr, "translate", ["--temperature", "nan"]),
                              (tr, "translate", ["--temperature", "1", "--top-p", "nan"]),
                              (gen, "generate", ["--temperature", "nan"]), (gen, "generate", ["--temperature", "inf"]),
                              (gen, "generate", ["--top-p", "nan"]), (gen, "generate", ["--repetition-penalty", "nan"]),
                              (gen, "generate", ["--beam", "2", "--length-penalty", "nan"])):
        add("wrong success", f"{name} {' '.join(extra)}", base + extra)
    add("wrong success", "generate --length-penalty without --beam", gen + ["--length-penalty", "2"])
    add("wrong success", "generate --max-new-tokens -1", gen[:-1] + ["-1"])
    add("wrong success", "generate --top-k with --beam", gen + ["--beam", "2", "--top-k", "3"])
    add("wrong success", "tokenizer train on an empty file", ["tokenizer", "train", "--data", f"{R}/empty.txt",
                                                              "--vocab-size", "300", "--out", O])
    add("wrong success", "char tokenizer train on an empty file", ["tokenizer", "train", "--kind", "char", "--data",
                                                                   f"{R}/empty.txt", "--out", O])
    add("wrong success", "prepare an empty file", ["prepare", "--data", f"{R}/empty.txt", "--out", O])
    add("wrong success", "--resume with --tokenizer char", ["train", "--resume", "--out", O, "--tokenizer", "char"],
        copy="lm")
    add("wrong success", "--resume with --data", ["train", "--resume", "--out", O, "--data", f"{R}/latin1.txt"],
        copy="lm")
    add("wrong success", "--resume --max-steps below the step", ["train", "--resume", "--out", O, "--max-steps", "2"],
        copy="lm")
    add("valid", "--resume --max-steps at the step (says there is nothing to train)",
        ["train", "--resume", "--out", O, "--max-steps", "4"], copy="lm", expect="ok")
    nangen = ["generate", "--checkpoint", f"{R}/nanrun", "--prompt", "To", "--max-new-tokens", "4"]
    add("wrong success", "generate from NaN weights", nangen + ["--temperature", "0"], expect="fail")
    add("wrong success", "generate from NaN weights (sampling)",
        ["generate", "--checkpoint", f"{R}/nanrun", "--prompt", "To", "--max-new-tokens", "4"], expect="fail")
    add("wrong success", "generate --beam from NaN weights",
        ["generate", "--checkpoint", f"{R}/nanrun", "--prompt", "To", "--max-new-tokens", "4", "--beam", "2"],
        expect="fail")
    add("wrong success", "eval of NaN weights", ["eval", "--checkpoint", f"{R}/nanrun", "--data", data], expect="fail")
    add("wrong success", "eval of NaN weights (HF dir)", ["eval", "--checkpoint", f"{R}/hfnan", "--data", data],
        expect="fail")
    add("wrong success", "generate from NaN weights (HF dir)",
        ["generate", "--checkpoint", f"{R}/hfnan", "--prompt", "To", "--max-new-tokens", "4"], expect="fail")
    add("wrong success", "plot into a non-PNG name", ["plot", lm, "--out", f"{O}/loss.txt"])
    add("wrong success", "HF config.json scale_attn_weights=false", ["generate", "--checkpoint", f"{R}/hf_noscale",
                                                                     "--prompt", "To", "--max-new-tokens", "2"])
    add("hang", "YAML alias bomb in --config", ["train", "--config", f"{R}/bomb.yaml", "--out", O])
    add("data loss", "train --out a folder fastformer did not write",
        ["train", "--config", f"{R}/tiny.yaml", "--data", data, "--out", f"{R}/foreign"])
    add("wrong success", "prepare --val-fraction 1", ["prepare", "--data", data, "--val-fraction", "1", "--out", O])

    # ------------------------------------------------------- valid inputs still work
    add("valid", "train the tiny config", tiny, expect="ok")
    add("valid", "generate greedy", gen + ["--temperature", "0"], expect="ok")
    add("valid", "eval the LM", ev + ["--batch-size", "2", "--seq-len", "8"], expect="ok")
    add("valid", "eval the LM on a prepared dir", ev[:-1] + [f"{R}/prep"], expect="ok")
    add("valid", "eval --split train of a text file", ev + ["--split", "train", "--seq-len", "8"], expect="ok")
    add("valid", "eval the seq2seq run on a pairs file", ["eval", "--checkpoint", s2s, "--data", f"{R}/pairs.tsv"],
        expect="ok")
    add("valid", "eval the seq2seq run", ["eval", "--checkpoint", s2s, "--examples", "4"], expect="ok")
    add("valid", "translate", tr, expect="ok")
    add("valid", "tokenizer train bpe", ["tokenizer", "train", "--data", data, "--vocab-size", "300", "--out", O],
        expect="ok")
    add("valid", "resume to a longer run", ["train", "--resume", "--out", O, "--max-steps", "5"], copy="lm",
        expect="ok")
    add("valid", "generate from the HF export", ["generate", "--checkpoint", f"{R}/hf", "--prompt", "To",
                                                 "--max-new-tokens", "3"], expect="ok")
    add("valid", "info --config", ["info", "--config", f"{R}/tiny.yaml"], expect="ok")
    return c


CASES = _cases()


def snapshot(root, skip):
    """{relative path: sha256} of every file under root except those under `skip`."""
    out = {}
    for d, dirs, names in os.walk(root):
        dirs[:] = [x for x in dirs if os.path.join(d, x) != skip]
        for n in names:
            p = os.path.join(d, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def expand(case, root, out):
    return [a.replace("{R}", root).replace("{O}", out) for a in case.args]


def judge(case, code, err, changed):
    """The column of the probe table for one finished case."""
    lines = [line for line in err.splitlines() if line.strip()]
    if code is None:
        return "hang"
    if "Traceback (most recent call last)" in err or code < 0 or code not in (0, 1, 2, 130):
        return "traceback"
    if changed:
        return "data lost"
    if case.expect == "ok":
        return "clean" if code == 0 else "wrong success"
    if code == 0:
        return "wrong success"
    if case.expect == "refuse" and code != 2:
        return "wrong success"
    return "clean" if len(lines) == 1 else "traceback"


COLUMNS = ("clean", "traceback", "hang", "wrong success", "data lost")


def _limit_memory():
    limit = 6 << 30  # 6 GiB of address space: a memory bomb fails instead of taking the machine
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def run_case_subprocess(case, root, timeout):
    out = os.path.join(root, "out", str(CASES.index(case)))
    shutil.rmtree(out, ignore_errors=True)
    if case.copy:
        shutil.copytree(os.path.join(root, case.copy), out)
    before = snapshot(root, os.path.join(root, "out"))
    env = dict(os.environ, FASTFORMER_NUM_THREADS="1", FASTFORMER_BACKEND="numpy", **case.env)
    try:
        proc = subprocess.run([sys.executable, "-m", "fastformer.cli", *expand(case, root, out)], cwd=root, env=env,
                              capture_output=True, text=True, timeout=timeout, preexec_fn=_limit_memory)
        code, err = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as e:
        code, err = None, (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
    changed = snapshot(root, os.path.join(root, "out")) != before
    return judge(case, code, err, changed), code, err


def run_case_inprocess(case, root, memory=2 << 30):
    """Run one case by calling the CLI's main() in this process, with the memory the checks see
    fixed at `memory` bytes; returns (verdict, exit status, stderr)."""
    from unittest import mock

    from fastformer import use_backend
    from fastformer.cli import main

    out = os.path.join(root, "out", str(CASES.index(case)))
    shutil.rmtree(out, ignore_errors=True)
    if case.copy:
        shutil.copytree(os.path.join(root, case.copy), out)
    before = snapshot(root, os.path.join(root, "out"))
    err = io.StringIO()
    with use_backend("numpy"), mock.patch("fastformer.errors.available_memory", return_value=memory), \
            contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code = main(expand(case, root, out))
        except SystemExit as e:  # argparse
            code = e.code
        except BaseException as e:  # noqa: B036 -- whatever escapes main is the finding
            code, err = 1, io.StringIO(f"Traceback (most recent call last):\n{type(e).__name__}: {e}")
    changed = snapshot(root, os.path.join(root, "out")) != before
    return judge(case, code, err.getvalue(), changed), code, err.getvalue()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--timeout", type=float, default=60)
    p.add_argument("--class", dest="cls")
    p.add_argument("--root", help="reuse (or build) the fixture tree here")
    p.add_argument("-v", action="store_true", help="print every case that is not clean")
    args = p.parse_args(argv)
    root = args.root or tempfile.mkdtemp(prefix="ff-probes-")
    if not os.path.isdir(os.path.join(root, "lm")):
        build_fixtures(root)
    table, t0 = {}, time.time()
    for case in CASES:
        if args.cls and case.cls != args.cls:
            continue
        verdict, code, err = run_case_subprocess(case, root, args.timeout)
        row = table.setdefault(case.cls, dict.fromkeys(COLUMNS, 0))
        row[verdict] += 1
        if args.v and verdict != "clean":
            last = (err.strip().splitlines() or [""])[-1][:160]
            print(f"{verdict:>13} | {case.cls}: {case.name} | exit {code} | {last}", flush=True)
    print(f"\n{'class':<15}{'tried':>7}" + "".join(f"{c:>15}" for c in COLUMNS))
    total = dict.fromkeys(COLUMNS, 0)
    for cls, row in table.items():
        print(f"{cls:<15}{sum(row.values()):>7}" + "".join(f"{row[c]:>15}" for c in COLUMNS))
        for c in COLUMNS:
            total[c] += row[c]
    print(f"{'all':<15}{sum(total.values()):>7}" + "".join(f"{total[c]:>15}" for c in COLUMNS))
    print(f"({time.time() - t0:.0f} s; fixtures in {root})")


if __name__ == "__main__":
    main()
