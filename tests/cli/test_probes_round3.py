"""What the third probe round found, one test per finding: wrong successes now refused by name,
tracebacks now one line, files a user holds read."""

import json
import os

import numpy as np
import pytest
from conftest import copy_run, trained_run
from safetensors.numpy import load_file, save_file

import fastformer.cli.bench as bench_command
from fastformer import LMConfig, TransformerLM, use_backend
from fastformer.atomic import atomic_open
from fastformer.cli import main
from fastformer.data.pairs import read_pairs
from fastformer.data.tokenizer import ByteTokenizer, CharTokenizer
from fastformer.errors import FastformerError
from fastformer.kernels import process
from fastformer.models.hf import save_hf
from fastformer.training.checkpoint import checkpoint_dirs, load_checkpoint
from fastformer.training.config import ModelConfig, RunConfig, TrainConfig, load_config
from fastformer.training.finetune import init_config
from fastformer.training.trainer import Trainer

TEXT = "the cat sat on a mat while one dog ran to its red ball and every bird sang\n" * 40


def tiny():
    return RunConfig(model=ModelConfig(max_seq_len=16, d_model=16, n_heads=2, d_ff=32, n_layers=1),
                     train=TrainConfig(batch_size=4, seq_len=16, max_steps=2, warmup_steps=1, log_interval=1,
                                       eval_interval=2, eval_batches=1, checkpoint_interval=2))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("base") / "run")
    with use_backend("numpy"):
        return trained_run(run, tiny(), TEXT)


@pytest.fixture
def run(base, tmp_path):
    return copy_run(base, tmp_path)


def rehash(ckpt, name):
    """Record the new SHA-256 of checkpoint file `name` in its state.json (a hand edit done well)."""
    import hashlib

    path = os.path.join(ckpt, "state.json")
    with open(path) as f:
        state = json.load(f)
    with open(os.path.join(ckpt, name), "rb") as f:
        state["files"][name] = hashlib.sha256(f.read()).hexdigest()
    with open(path, "w") as f:
        json.dump(state, f)
    return state


def resume(run):
    with use_backend("numpy"):
        Trainer(None, run, resume=True, text=TEXT, verbose=False).close()


# ------------------------------------------------------------------------ hand-edited checkpoints
def test_an_out_of_range_integer_in_the_rng_state_is_one_line(run):
    ckpt = checkpoint_dirs(run)[-1]
    path = os.path.join(ckpt, "state.json")
    with open(path) as f:
        state = json.load(f)

    def huge(d):
        for k, v in d.items():
            if isinstance(v, dict):
                huge(v)
            elif isinstance(v, int) and not isinstance(v, bool):
                d[k] = 1 << 200

    huge(state["rng"]["data"])
    with open(path, "w") as f:
        json.dump(state, f)
    with pytest.raises(FastformerError, match="its rng states cannot be restored"):
        resume(run)


def test_an_empty_optimizer_step_counter_is_one_line(run):
    ckpt = checkpoint_dirs(run)[-1]
    path = os.path.join(ckpt, "optimizer.safetensors")
    state = load_file(path)
    state["t"] = np.zeros(0, dtype=np.int64)
    save_file(state, path)
    rehash(ckpt, "optimizer.safetensors")
    with pytest.raises(FastformerError, match=r"state 't' \(the step counter\) must hold one integer"):
        resume(run)


def test_bfloat16_tensors_in_a_checkpoint_are_one_line(run):
    ckpt = checkpoint_dirs(run)[-1]
    path = os.path.join(ckpt, "model.safetensors")
    with open(path, "rb") as f:
        raw = f.read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    for name, info in header.items():  # the same bytes read as twice as many bfloat16 halves
        if name != "__metadata__":
            info["dtype"], info["shape"] = "BF16", [*info["shape"][:-1], 2 * info["shape"][-1]]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + raw[8 + n:])
    rehash(ckpt, "model.safetensors")
    with pytest.raises(FastformerError, match="holds an unreadable safetensors file"):
        load_checkpoint(run)


# ------------------------------------------------------------------------------ the Python API
@pytest.mark.parametrize("kwargs, message", [
    (dict(seed=-1), "seed must be an integer >= 0, got -1"),
    (dict(seed="abc"), "seed must be an integer >= 0, got 'abc'"),
    (dict(eos_id=40), r"eos_id must be an integer in \[0, 39\], got 40"),
    (dict(eos_id=-2), r"eos_id must be an integer in \[0, 39\], got -2"),
    (dict(eos_id=40, beam_size=2), r"eos_id must be an integer in \[0, 39\], got 40"),
])
def test_generate_refuses_a_bad_seed_or_eos_id_by_name(kwargs, message):
    model = TransformerLM(LMConfig(vocab_size=40, max_seq_len=16, d_model=16, n_heads=2, d_ff=32, n_layers=1))
    temperature = 0.0 if "beam_size" in kwargs else 1.0
    with pytest.raises(FastformerError, match=message):
        model.generate(np.array([1, 2, 3]), 4, temperature=temperature, **kwargs)


@pytest.mark.parametrize("tokenizer", [ByteTokenizer(), CharTokenizer.from_text("abc")], ids=["byte", "char"])
def test_text_with_a_lone_surrogate_is_refused_by_name(tokenizer):
    # what Python makes of a command-line argument whose bytes are not UTF-8
    with pytest.raises(FastformerError, match=r"lone surrogate \\udcff at character 1"):
        tokenizer.encode("a\udcffb")


def test_a_prompt_that_is_not_utf8_is_one_line(run, capsys):
    with use_backend("numpy"):  # restores the backend that --backend changes
        assert main(["generate", "--checkpoint", run, "--prompt", "the \udcff", "--max-new-tokens", "2",
                     "--backend", "numpy"]) == 2
    assert "lone surrogate" in capsys.readouterr().err


def test_an_out_path_that_is_not_utf8_is_printed_escaped(tmp_path, capsys, monkeypatch):
    (tmp_path / "t.txt").write_text(TEXT)
    out = str(tmp_path / "tok\udcff")  # the bytes b"tok\xff"
    assert main(["tokenizer", "train", "--kind", "char", "--data", str(tmp_path / "t.txt"), "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "tok\\udcff" in printed
    printed.encode("utf-8")  # a strict UTF-8 stdout can write it


# ------------------------------------------------------------------------ environment and options
@pytest.mark.parametrize("value", ["\u00b2", "\u0663", "9" * 20, "0"])
def test_a_thread_count_that_is_not_a_small_ascii_integer_is_refused(monkeypatch, value):
    monkeypatch.setenv("FASTFORMER_NUM_THREADS", value)
    with pytest.raises(FastformerError, match=r"FASTFORMER_NUM_THREADS must be an integer in \[1, 4096\]"):
        process.num_threads()


def test_a_parameter_budget_past_float_range_is_one_line(capsys):
    assert main(["info", "--params", "1e400-2e400"]) == 2
    assert "LOW and HIGH must be below 1e15 parameters" in capsys.readouterr().err


def test_out_of_memory_is_one_line(monkeypatch, capsys):
    def out_of_memory(args):
        raise MemoryError

    monkeypatch.setattr(bench_command, "main", out_of_memory)
    assert main(["bench", "--preset", "tiny"]) == 2
    assert capsys.readouterr().err == "fastformer bench: error: out of memory: make the model, batch or sequence " \
                                      "smaller\n"


def test_ctrl_c_while_the_commands_load_is_one_line(monkeypatch, capsys):
    import fastformer.cli as cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert main(["info"]) == 130
    assert capsys.readouterr().err == "\nfastformer: interrupted\n"


def test_a_deeply_nested_hugging_face_config_is_one_line(tmp_path):
    hf = tmp_path / "hf"
    save_hf(TransformerLM(LMConfig(vocab_size=40, max_seq_len=16, d_model=16, n_heads=2, d_ff=32, n_layers=1)),
            str(hf))
    (hf / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(FastformerError, match="nested too deeply"):
        init_config(str(hf))


# ----------------------------------------------------------------------------------- files
def test_a_config_from_process_substitution_is_read(tmp_path):
    r, w = os.pipe()  # what bash's <(cat tiny.yaml) passes: /dev/fd/N, a pipe
    os.write(w, b"train:\n  max_steps: 7\n")
    os.close(w)
    try:
        assert load_config(f"/dev/fd/{r}").train.max_steps == 7
    finally:
        os.close(r)
    os.mkfifo(tmp_path / "fifo.yaml")  # any other FIFO could block for good: refused by what it is
    with pytest.raises(FastformerError, match="is not a regular file"):
        load_config(str(tmp_path / "fifo.yaml"))


def test_a_legal_long_output_name_is_written(tmp_path):
    path = tmp_path / ("x" * 250)
    with atomic_open(str(path)) as f:
        f.write("ok")
    assert path.read_text() == "ok" and os.listdir(tmp_path) == ["x" * 250]


def test_an_unbalanced_quote_in_a_csv_pairs_file_is_refused_by_line(tmp_path):
    path = tmp_path / "pairs.csv"
    rows = [f"source {i},target {i}" for i in range(3000)]
    rows[1000] = '"source 1000,target 1000'  # the quote opens a field that never closes
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(FastformerError, match="line 1001: a quoted field runs on to line"):
        read_pairs(str(path))
    path.write_text('a,"' + "x" * 200_000 + '\n')  # past the csv module's field limit
    with pytest.raises(FastformerError, match="pairs file .* line 1"):
        read_pairs(str(path))


def test_truncation_or_padding_in_a_tokenizer_json_is_turned_off(tmp_path):
    pytest.importorskip("tokenizers")
    from fastformer.data.bpe import BPETokenizer

    (tmp_path / "t.txt").write_text(TEXT)
    tok = BPETokenizer.train([str(tmp_path / "t.txt")], vocab_size=300)
    tok.save(str(tmp_path / "tok"))
    path = tmp_path / "tok" / "tokenizer.json"
    d = json.loads(path.read_text())
    d["truncation"] = {"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}
    d["padding"] = {"strategy": {"Fixed": 64}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
                    "pad_type_id": 0, "pad_token": "<pad>"}
    path.write_text(json.dumps(d))
    again = BPETokenizer.from_file(str(path))
    np.testing.assert_array_equal(again.encode(TEXT), tok.encode(TEXT))
    assert len(again.encode(TEXT)) > 64



def test_a_prepared_directory_of_another_bpe_tokenizer_of_the_same_size_is_refused(tmp_path):
    pytest.importorskip("tokenizers")
    from fastformer.data.bpe import BPETokenizer
    from fastformer.data.prepare import prepare
    from fastformer.data.text import load_training_data
    from fastformer.training.config import DataConfig

    (tmp_path / "a.txt").write_text(TEXT)
    (tmp_path / "b.txt").write_text("zebras quietly yodel under xylophones, jumping over vexed quokkas\n" * 40)
    a, b = (BPETokenizer.train([str(tmp_path / f"{n}.txt")], vocab_size=280) for n in "ab")
    assert a.vocab_size == b.vocab_size
    prepare([str(tmp_path / "a.txt")], a, str(tmp_path / "prep"), progress=False)
    data = DataConfig(path=str(tmp_path / "prep"))
    assert load_training_data(data, 16, tokenizer=BPETokenizer.from_file(str(tmp_path / "prep" / "tokenizer.json")))
    with pytest.raises(FastformerError, match="was made by another bpe tokenizer than the run's"):
        load_training_data(data, 16, tokenizer=b)


def test_logits_that_turn_nan_midway_stop_the_generation_by_name():
    from fastformer.generation.sampling import sample_tokens

    def step(ids):
        return np.full((1, 5), np.nan)  # finite first logits, NaN from the second token on

    steps = sample_tokens(step, np.zeros((1, 5)), 4, temperature=1.0, rng=np.random.default_rng(0))
    assert next(steps).shape == (1,)
    with pytest.raises(FastformerError, match="logits became NaN at new token 2"):
        next(steps)


def padded_model_dir(tmp_path):
    """A Hugging Face directory of a model with 300 ids and the byte tokenizer's 259, the padding
    ids getting nearly all the mass."""
    model = TransformerLM(LMConfig(vocab_size=300, max_seq_len=16, d_model=16, n_heads=2, d_ff=32, n_layers=1,
                                   tie_embeddings=False))
    sd = model.state_dict()
    sd["transformer.ln_f.weight"][:] = 0
    sd["transformer.ln_f.bias"][:] = 1  # every position's last hidden state is all ones
    sd["lm_head.weight"][:] = 0
    sd["lm_head.weight"][ByteTokenizer.vocab_size:] = 1  # the padding rows get nearly all the mass
    model.load_state_dict(sd)
    save_hf(model, str(tmp_path / "hf"))
    ByteTokenizer().save(str(tmp_path / "hf"))
    return str(tmp_path / "hf")


@pytest.mark.parametrize("search", [["--temperature", "1", "--seed", "0"], ["--beam", "3"]])
def test_a_model_padded_past_its_tokenizer_samples_only_the_tokenizer_ids(tmp_path, capsys, search):
    path = padded_model_dir(tmp_path)
    with use_backend("numpy"):
        assert main(["generate", "--checkpoint", path, "--prompt", "ab", "--max-new-tokens", "8", *search,
                     "--backend", "numpy"]) == 0
    assert capsys.readouterr().out.startswith("ab")
