"""Run config validation: unknown keys and wrong types fail up front, via --set, YAML and the CLI."""

import dataclasses
import os

import pytest
import yaml

from fastformer.cli import main
from fastformer.errors import FastformerError
from fastformer.training.config import (
    PRESETS,
    DataConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
    load_config,
    preset,
    save_config,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_overrides_apply_with_types():
    c = apply_overrides(preset("tiny"), ["train.lr=3e-4", "train.batch_size=8", "model.tie_embeddings=false",
                                         "data.path=corpus.txt", "model.dropout=0.1"])
    assert c.train.lr == 3e-4 and isinstance(c.train.lr, float)
    assert c.train.batch_size == 8 and c.model.tie_embeddings is False
    assert c.data.path == "corpus.txt" and c.model.dropout == 0.1
    assert apply_overrides(c, ["data.path=null"]).data.path is None
    assert preset("tiny").train.lr != 3e-4  # the base config is not modified


def test_unknown_key_lists_valid_keys():
    with pytest.raises(FastformerError, match=r"unknown config key train\.lrr.*'lr'.*'batch_size'|unknown config key "
                                         r"train\.lrr.*'batch_size'.*'lr'"):
        apply_overrides(preset("tiny"), ["train.lrr=1e-3"])
    with pytest.raises(FastformerError, match=r"unknown config section 'optim'.*'model', 'data', 'train'"):
        apply_overrides(preset("tiny"), ["optim.lr=1e-3"])
    with pytest.raises(FastformerError, match="must look like section.key=value"):
        apply_overrides(preset("tiny"), ["lr=1e-3"])


@pytest.mark.parametrize("item, message", [
    ("train.batch_size=1.5", r"train\.batch_size must be int, got '1\.5'"),
    ("train.lr=fast", r"train\.lr must be float, got 'fast'"),
    ("model.tie_embeddings=yes", r"model\.tie_embeddings must be bool"),
    ("train.optimizer=lion", r"valid values are sgd, adam, adamw"),
    ("train.seq_len=256", r"exceeds model\.max_seq_len=128"),
    ("model.n_heads=3", r"d_model=64 must be divisible by n_heads=3"),
])
def test_bad_values_are_rejected(item, message):
    with pytest.raises(FastformerError, match=message):
        apply_overrides(preset("tiny"), [item])


def test_yaml_round_trip_and_partial_files(tmp_path):
    c = apply_overrides(preset("small"), ["train.lr=5e-4", "data.val_fraction=0.2"])
    save_config(c, str(tmp_path / "c.yaml"))
    assert load_config(str(tmp_path / "c.yaml")) == c
    (tmp_path / "p.yaml").write_text("train:\n  lr: 1e-3\n  max_steps: 7\n")  # YAML reads 1e-3 as text
    p = load_config(str(tmp_path / "p.yaml"), base=preset("medium"))
    assert p.train.lr == 1e-3 and p.train.max_steps == 7 and p.model == preset("medium").model


@pytest.mark.parametrize("text, message", [
    ("train:\n  lrr: 0.1\n", r"unknown config key train\.lrr: valid keys of 'train' are \['seed'"),
    ("model:\n  d_model: wide\n", r"model\.d_model must be int, got 'wide'"),
    ("model:\n  d_model: 64.0\n", r"model\.d_model must be int, got 64\.0"),
    ("trainer:\n  lr: 0.1\n", r"unknown config section\(s\) \['trainer'\]"),
    ("train: [1, 2]\n", r"section 'train' must be a mapping"),
    ("train: {lr: [\n", r"not valid YAML"),
])
def test_bad_yaml_is_rejected(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(FastformerError, match=message) as e:
        load_config(str(path))
    assert "bad.yaml" in str(e.value)


def test_config_files_match_presets():
    for name in PRESETS:
        assert load_config(os.path.join(REPO, "experiments", "configs", f"{name}.yaml")) == preset(name)
    tinystories = load_config(os.path.join(REPO, "experiments", "configs", "tinystories_bpe.yaml"))
    assert tinystories.model == preset("small").model and tinystories.data.path is None  # --data gives it
    p = preset("tiny")
    assert (p.train.batch_size, p.train.seq_len, p.model.d_model, p.model.n_heads, p.model.d_ff,
            p.model.n_layers) == (32, 128, 64, 2, 256, 2)


def test_unknown_preset():
    with pytest.raises(FastformerError, match="valid presets are tiny, small, medium"):
        preset("huge")


def test_cli_rejects_bad_config_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--set", "train.lrr=1"]) == 2
    assert "unknown config key train.lrr" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  n_layers: two\n")
    assert main(["train", "--out", str(out), "--config", str(bad)]) == 2
    assert "model.n_layers must be int" in capsys.readouterr().err
    assert not out.exists()  # nothing was created: the config failed before any work


def test_run_config_sections_are_typed():
    with pytest.raises(FastformerError, match="sections"):
        RunConfig.from_dict(["model"])
    assert yaml.safe_load(yaml.safe_dump(RunConfig().to_dict()))["train"]["optimizer"] == "adamw"


@pytest.mark.parametrize("make, message", [
    (lambda: TrainConfig(batch_size=True), "train.batch_size must be an integer >= 1, got True"),
    (lambda: TrainConfig(max_steps=2.0), r"train.max_steps must be an integer >= 1, got 2\.0"),
    (lambda: TrainConfig(seed=-1), "train.seed must be an integer >= 0, got -1"),
    (lambda: TrainConfig(lr="fast"), "train.lr must be a finite number >= 0, got 'fast'"),
    (lambda: TrainConfig(min_lr=float("inf")), "train.min_lr must be a finite number >= 0, got inf"),
    (lambda: TrainConfig(beta2=1.0), r"train.beta2 must be a number in \[0, 1\), got 1\.0"),
    (lambda: TrainConfig(grad_clip=float("nan")), "train.grad_clip must be a finite number >= 0, got nan"),
    (lambda: DataConfig(lowercase="yes"), "data.lowercase must be True or False, got 'yes'"),
    (lambda: DataConfig(path=3), "data.path must be a str or null, got 3"),
    (lambda: DataConfig(task="pairs", path="p.txt", max_pairs=2.5), "data.max_pairs must be an integer >= 1 or null"),
    (lambda: DataConfig(val_fraction="0.1"), r"data.val_fraction must be a number in \[0, 1\), got '0.1'"),
    (lambda: RunConfig(train={"lr": 1e-3}), "RunConfig.train must be a TrainConfig, got dict"),
])
def test_configs_built_in_python_are_checked_too(make, message):
    with pytest.raises(FastformerError, match=message):
        make()


def test_checked_values_come_back_as_python_numbers():
    import numpy as np

    t = TrainConfig(batch_size=np.int64(8), lr=1)
    assert type(t.batch_size) is int and type(t.lr) is float
    assert yaml.safe_load(yaml.safe_dump(dataclasses.asdict(t)))["batch_size"] == 8


def test_the_old_name_of_seq2seq_positions_is_still_read(tmp_path):
    """seq2seq.positional is seq2seq.positions, as the language model names it; configs and
    checkpoints written before the rename still load, and are written back with the new name."""
    path = tmp_path / "old.yaml"
    path.write_text("seq2seq: {positional: sinusoidal}\ndata: {task: reverse}\n")
    config = load_config(str(path))
    assert config.seq2seq.positions == "sinusoidal"
    assert apply_overrides(RunConfig(), ["seq2seq.positional=sinusoidal"]).seq2seq.positions == "sinusoidal"
    from fastformer.models.config import Seq2SeqConfig

    assert Seq2SeqConfig.from_dict({"positional": "sinusoidal"}).positions == "sinusoidal"
    save_config(config, str(tmp_path / "new.yaml"))
    saved = yaml.safe_load((tmp_path / "new.yaml").read_text())["seq2seq"]
    assert saved["positions"] == "sinusoidal" and "positional" not in saved


def test_each_kind_is_answered_by_its_config_and_one_table():
    from fastformer.training.tasks import KINDS, make_task

    for task in ("text", "reverse", "pairs"):
        config = RunConfig(data=DataConfig(task=task))
        assert type(config.model_config()) is KINDS[config.kind].config
        assert config.model_config().kind == config.kind
    run = make_task(RunConfig(data=DataConfig(task="reverse")))
    assert type(run) is KINDS["seq2seq"].task and type(run.new_model(0)) is KINDS["seq2seq"].model


def alias_bomb(levels=8, width=6):
    """A YAML flow sequence whose last element has width**levels leaves, built from aliases."""
    items = ["&l0 [" + ", ".join(["x"] * width) + "]"]
    items += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]" for i in range(1, levels + 1)]
    return "[" + ", ".join(items) + "]"


@pytest.mark.parametrize("template", ["model:\n  d_model: {bomb}\n", "model: {bomb}\n", "train:\n  schedule: {bomb}\n"])
def test_a_yaml_alias_bomb_is_named_in_a_short_line(tmp_path, template):
    path = tmp_path / "bomb.yaml"
    path.write_text(template.format(bomb=alias_bomb()))  # 1.7 million leaves: never formatted whole
    with pytest.raises(FastformerError, match="bomb.yaml") as e:
        load_config(str(path))
    assert len(str(e.value)) < 1000


# ------------------------------------------------------------------ min_lr: at most lr, null is lr / 10
def test_min_lr_above_lr_is_refused_naming_both():
    with pytest.raises(FastformerError, match=r"^train.min_lr=0.002 is above train.lr=0.001: .*null for lr / 10$"):
        TrainConfig(lr=1e-3, min_lr=2e-3)
    with pytest.raises(FastformerError, match=r"train.min_lr=0.01 is above train.lr=0.005"):
        apply_overrides(preset("tiny"), ["train.min_lr=1e-2"])
    assert TrainConfig(lr=1e-3, min_lr=1e-3).final_lr() == 1e-3  # equal: a schedule that stays at lr


def test_a_null_min_lr_is_a_tenth_of_lr_and_follows_it():
    from fastformer.training.trainer import step_lr

    c = apply_overrides(preset("tiny"), ["train.lr=3e-4"])  # the tiny preset's end rate no longer trips it
    t = c.train
    assert t.min_lr is None and t.final_lr() == 3e-4 / 10
    assert step_lr(t, t.max_steps) == pytest.approx(3e-5, rel=1e-12)
    assert yaml.safe_load(yaml.safe_dump(c.to_dict()))["train"]["min_lr"] is None  # config.yaml keeps the null
    assert apply_overrides(c, ["train.min_lr=1e-5"]).train.final_lr() == 1e-5


def test_runs_with_the_old_explicit_min_lr_keep_their_schedule(tmp_path):
    """A config.yaml written before min_lr could be null holds the preset's value; it loads as it
    was, and the presets' lr / 10 is that value to the bit, so old and new runs share every rate."""
    from fastformer.training.trainer import step_lr

    for name, old in (("tiny", 5e-4), ("small", 2e-4), ("medium", 1e-4)):
        new = preset(name)
        d = new.to_dict()
        d["train"]["min_lr"] = old
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(d))
        t = load_config(str(path)).train
        assert t.min_lr == old == new.train.final_lr()
        assert [step_lr(t, s) for s in range(0, t.max_steps + 1, 97)] == \
               [step_lr(new.train, s) for s in range(0, t.max_steps + 1, 97)]


def test_cli_lowers_the_tiny_presets_lr_and_refuses_min_lr_above_it(tmp_path, capsys):
    out = tmp_path / "low"
    assert main(["train", "--preset", "tiny", "--set", "train.lr=3e-4", "--max-steps", "1", "--set",
                 "train.eval_batches=1", "--out", str(out)]) == 0
    assert "lr 0.0003 -> 3e-05 (lr / 10) cosine" in capsys.readouterr().out
    assert load_config(str(out / "config.yaml")).train.min_lr is None
    bad = tmp_path / "bad"
    assert main(["train", "--preset", "tiny", "--set", "train.lr=3e-4", "--set", "train.min_lr=1e-3",
                 "--out", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.min_lr=0.001 is above train.lr=0.0003" in err, err
    assert not bad.exists()
