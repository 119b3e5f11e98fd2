"""`fastformer info`: exact parameter counts for every kind of config without allocating the model,
--set and --data, and `--params LOW-HIGH` listing model shapes in a budget."""

import re

import pytest

from fastformer import Seq2SeqTransformer, TransformerLM
from fastformer.cli import info as info_command
from fastformer.cli import main
from fastformer.models.config import LMConfig, Seq2SeqConfig, count_parameters
from fastformer.training.config import apply_overrides, load_config
from fastformer.training.tasks import make_task

PAIRS = ["I am here.\tJe suis là.", "You are here.\tTu es là.", "We run.\tNous courons.", "He is here.\tIl est là.",
         "I am cold.\tJ'ai froid.", "We are cold.\tNous avons froid.", "Run!\tCours !", "Who?\tQui ?"]
ENFR_YAML = """\
seq2seq: {max_src_len: 12, max_tgt_len: 13, d_model: 16, n_heads: 2, d_ff: 32, n_encoder_layers: 2,
          n_decoder_layers: 1, activation: relu}
data: {task: pairs, path: not-here.txt, val_fraction: 0.25, lowercase: true, tokenizer: word}
train: {batch_size: 4, seq_len: 16}
"""


def reported_count(out):
    return int(re.search(r"^([\d,]+) parameters:", out, re.M)[1].replace(",", ""))


@pytest.fixture
def pairs_config(tmp_path):
    data = tmp_path / "pairs.txt"
    data.write_text("\n".join(PAIRS * 2) + "\n", encoding="utf-8")
    cfg = tmp_path / "enfr.yaml"
    cfg.write_text(ENFR_YAML)
    return str(cfg), str(data)


def test_a_pairs_config_is_counted_with_the_vocabularies_training_builds(pairs_config, capsys):
    cfg, data = pairs_config
    assert main(["info", "--config", cfg, "--data", data]) == 0
    out = capsys.readouterr().out
    task = make_task(apply_overrides(load_config(cfg), [f"data.path={data}"]))
    trained = task.new_model(0).num_parameters()  # what `train` reports
    assert reported_count(out) == trained
    m = task.config.seq2seq
    assert f"vocabularies {m.src_vocab_size}/{m.tgt_vocab_size}" in out and m.src_vocab_size != 259
    assert "word vocabularies built from" in out
    # without the data the configured sizes are used, and the line says so
    assert main(["info", "--config", cfg]) == 0
    out = capsys.readouterr().out
    assert reported_count(out) == count_parameters(load_config(cfg).seq2seq)
    assert "vocabularies as configured: data.path not-here.txt is not here, give --data FILE" in out
    assert main(["info", "--config", cfg, "--data", data + ".missing"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("flags, expected", [
    (["--preset", "small"], lambda: LMConfig(max_seq_len=128, d_model=128, n_heads=4, d_ff=512, n_layers=2)),
    (["--preset", "tiny", "--set", "model.tie_embeddings=false", "--set", "model.n_layers=3"],
     lambda: LMConfig(max_seq_len=128, d_model=64, n_heads=2, d_ff=256, n_layers=3, tie_embeddings=False)),
    (["--set", "data.task=reverse", "--set", "seq2seq.positional=sinusoidal", "--set", "data.alphabet=digits"],
     lambda: Seq2SeqConfig(src_vocab_size=14, tgt_vocab_size=14, positions="sinusoidal")),  # 10 digits + 4
])
def test_info_counts_exactly_as_the_model_would(flags, expected, capsys):
    assert main(["info", *flags]) == 0
    cfg = expected()
    model = (TransformerLM if isinstance(cfg, LMConfig) else Seq2SeqTransformer)(cfg)
    assert reported_count(capsys.readouterr().out) == model.num_parameters()


def test_a_char_lm_takes_its_vocabulary_from_the_data(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("abcabc ddd\n" * 20, encoding="utf-8")
    assert main(["info", "--data", str(text), "--set", "data.tokenizer=char"]) == 0
    out = capsys.readouterr().out
    assert "vocabulary 10," in out  # 6 characters + 4 specials
    assert reported_count(out) == count_parameters(LMConfig(vocab_size=10, d_model=64, n_heads=2, d_ff=256,
                                                            n_layers=2))


def test_a_huge_config_is_sized_without_allocating(monkeypatch, capsys):
    def no_allocation(*args, **kwargs):
        raise AssertionError("info allocated a parameter buffer")

    monkeypatch.setattr("fastformer.nn.params.aligned_zeros", no_allocation)
    assert main(["info", "--set", "model.d_model=100000", "--set", "model.n_heads=1"]) == 0
    out = capsys.readouterr().out
    assert reported_count(out) == count_parameters(LMConfig(d_model=100_000, n_heads=1, d_ff=256, n_layers=2))
    assert "GB of float32 weights" in out


def budget_rows(out):
    return [tuple(row.split()) for row in out.splitlines() if re.match(r"^\s+\d+\s+[\d+]+\s+\d+\s+\d+\s+[\d,]+$", row)]


def test_params_lists_shapes_within_the_budget(capsys):
    assert main(["info", "--params", "2M-3M"]) == 0
    rows = budget_rows(capsys.readouterr().out)
    assert len(rows) >= 3
    counts = []
    for C, L, H, F, n in rows:
        cfg = LMConfig(max_seq_len=128, d_model=int(C), n_layers=int(L), n_heads=int(H), d_ff=int(F))
        counts.append(int(n.replace(",", "")))
        assert counts[-1] == count_parameters(cfg) and 2_000_000 <= counts[-1] <= 3_000_000
        assert int(F) == 4 * int(C) and 16 <= int(C) / int(L) <= 256
    assert counts == sorted(counts)


def test_params_keeps_the_keys_given_with_set(tmp_path, pairs_config, capsys):
    assert main(["info", "--params", "500k-1.5M", "--set", "model.n_layers=4", "--set", "model.d_ff=100"]) == 0
    rows = budget_rows(capsys.readouterr().out)
    assert rows and all(L == "4" and F == "100" for _, L, _, F, _ in rows)
    cfg, data = pairs_config
    assert main(["info", "--config", cfg, "--data", data, "--params", "100k-400k"]) == 0
    out = capsys.readouterr().out
    rows = budget_rows(out)
    vocab = make_task(apply_overrides(load_config(cfg), [f"data.path={data}"])).config.seq2seq
    for C, L, H, F, n in rows:
        enc, dec = map(int, L.split("+"))
        cfg_n = count_parameters(Seq2SeqConfig(src_vocab_size=vocab.src_vocab_size, tgt_vocab_size=vocab.tgt_vocab_size,
                                               max_src_len=12, max_tgt_len=13, d_model=int(C), n_heads=int(H),
                                               d_ff=int(F), n_encoder_layers=enc, n_decoder_layers=dec))
        assert enc == dec and cfg_n == int(n.replace(",", ""))
    assert rows and "seq2seq.n_encoder_layers=L" in out


@pytest.mark.parametrize("budget, message", [
    ("3M-2M", "needs 0 < LOW <= HIGH"), ("2M", "must be a range LOW-HIGH"), ("two-three", "must be a range"),
])
def test_bad_budgets_are_refused(budget, message, capsys):
    assert main(["info", "--params", budget]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.splitlines()) == 1


def test_parse_budget():
    assert info_command.parse_budget("500k-1.5M") == (500_000, 1_500_000)
    assert info_command.parse_budget("2e6-3000000") == (2_000_000, 3_000_000)
    assert info_command.parse_budget("1G-2g") == (10 ** 9, 2 * 10 ** 9)


def test_gpt2_small_is_124m(capsys):
    gpt2 = ["--set", "model.vocab_size=50257", "--set", "model.max_seq_len=1024", "--set", "model.d_model=768",
            "--set", "model.n_heads=12", "--set", "model.d_ff=3072", "--set", "model.n_layers=12"]
    assert main(["info", *gpt2]) == 0
    out = capsys.readouterr().out
    assert reported_count(out) == 124_439_808 and "vocabulary as configured" in out  # GPT-2 small's own count
