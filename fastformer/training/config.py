"""Run configuration: the model, data and training dataclasses, presets, YAML files and
`--set section.key=value` overrides.

A RunConfig has four sections -- `model` (LMConfig), `seq2seq` (Seq2SeqConfig), `data`, `train` --
and is written as YAML with one mapping per section. `data.task` picks the kind of model: "text"
trains the language model of `model`; "copy", "reverse", "sort" (synthetic strings) and "pairs"
(a file of translation pairs) train the encoder-decoder of `seq2seq`. Only the section of the
model in use is written out. Loading a file, applying an override or building a preset checks
every key and type up front, so a typo fails before any work with a message listing the valid
keys. Fields left out of a file keep their defaults.
"""

import dataclasses
import typing
from dataclasses import dataclass, field

import yaml

from fastformer.atomic import atomic_open
from fastformer.data.pairs import TASKS as SYNTHETIC_TASKS
from fastformer.data.pairs import parse_alphabet
from fastformer.errors import (
    FastformerError,
    check_bool,
    check_choice,
    check_input_file,
    check_int,
    check_memory,
    check_number,
    is_int,
    read_utf8,
    short_repr,
)
from fastformer.models.config import LMConfig, Seq2SeqConfig, count_parameters, training_memory
from fastformer.training.optim import OPTIMIZERS, SCHEDULES

MATMUL_PRECISION = {"fp32": "float32", "bf16": "bfloat16"}  # train.precision -> the kernels' name
PRECISION_CHOICES = (*MATMUL_PRECISION, "auto")  # auto: resolved when a run starts (resolve_precision)


def resolve_precision(precision):
    """train.precision with "auto" made concrete: bf16 where the selected backend runs bfloat16
    products natively on this CPU, else fp32. Other values are returned as they are."""
    if precision != "auto":
        return precision
    from fastformer.kernels import fastest_precision

    return "bf16" if fastest_precision() == "bfloat16" else "fp32"

ModelConfig = LMConfig
# data.task -> the section of the model it trains: "text" the language model of `model`, every
# other task the encoder-decoder of `seq2seq`. The one place a task picks its model kind; the
# section's config class names the kind (models/config.py).
TASK_SECTIONS = {"text": "model", **{task: "seq2seq" for task in (*SYNTHETIC_TASKS, "pairs")}}
TASKS = tuple(TASK_SECTIONS)
PAIR_TOKENIZERS = ("word", "char")


@dataclass
class DataConfig:
    task: str = "text"  # text | copy | reverse | sort | pairs
    path: typing.Optional[str] = None  # text: UTF-8 text file or prepared directory, None: the embedded
    #                                    corpus; pairs: the source<TAB>target (or .csv) file
    val_fraction: float = 0.1  # text: the last fraction of the tokens; pairs: a seeded random fraction
    #                            of the pairs (0: evaluate on the training pairs)
    tokenizer: typing.Optional[str] = None  # text: byte | char | a tokenizer directory (None: byte, or a
    #                                         prepared directory's own); pairs: word (None) | char
    min_len: int = 1  # copy/reverse/sort: shortest string
    max_len: int = 16  # copy/reverse/sort: longest string
    alphabet: str = "letters+digits+punctuation"  # copy/reverse/sort: names joined by +, see data/pairs.parse_alphabet
    lowercase: bool = False  # pairs: lower-case both sides
    unique_sources: bool = False  # pairs: keep only the first pair of each source sentence (a source
    #                               with several translations cannot be reproduced exactly)
    max_pairs: typing.Optional[int] = None  # pairs: use only the first N pairs of the file (after the above)
    min_freq: int = 1  # pairs, word tokenizer: keep words seen at least this often in training

    def __post_init__(self):
        if self.task not in TASKS:
            raise FastformerError(f"data.task {self.task!r} is not known: valid values are {', '.join(TASKS)}")
        for name in ("path", "tokenizer"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise FastformerError(f"data.{name} must be a str or null, got {getattr(self, name)!r}")
        # only pairs may evaluate on the training data (memorisation)
        self.val_fraction = vf = check_number("data.val_fraction", self.val_fraction, low=0, high=1, high_open=True)
        if vf == 0 and self.task != "pairs":
            raise FastformerError(f"data.val_fraction must lie in (0, 1) for data.task={self.task}, got {vf}")
        if self.path == "":  # None is the default corpus; an empty name is a mistake, not a request for it
            raise FastformerError("data.path is empty: give a text file or prepared directory, or leave it unset "
                                  "for the embedded default corpus")
        if self.tokenizer == "":  # a directory is checked when the tokenizer is loaded
            raise FastformerError("data.tokenizer is empty: valid values are byte, char or a tokenizer directory")
        self.min_len = check_int("data.min_len", self.min_len)
        self.max_len = check_int("data.max_len", self.max_len)
        self.min_freq = check_int("data.min_freq", self.min_freq)
        for name in ("lowercase", "unique_sources"):
            setattr(self, name, check_bool(f"data.{name}", getattr(self, name)))
        if self.task in SYNTHETIC_TASKS:
            if self.min_len > self.max_len:
                raise FastformerError(f"data.min_len and data.max_len need 1 <= min_len <= max_len, got "
                                      f"{self.min_len} and {self.max_len}")
            parse_alphabet(self.alphabet)
            if self.tokenizer is not None:
                raise FastformerError(f"data.tokenizer={self.tokenizer!r} does not apply to data.task={self.task}: "
                                      f"its strings are tokenized per character of data.alphabet; leave it unset")
        if self.task == "pairs":  # data.path is checked where the pairs are read: a recipe leaves it to --data
            if self.tokenizer not in (None, *PAIR_TOKENIZERS):
                raise FastformerError(f"data.tokenizer={self.tokenizer!r} for data.task=pairs: valid values are "
                                      f"{', '.join(PAIR_TOKENIZERS)} (built from the training pairs)")
        if self.max_pairs is not None and not (is_int(self.max_pairs) and self.max_pairs >= 1):
            raise FastformerError(f"data.max_pairs must be an integer >= 1 or null, got {self.max_pairs!r}")


@dataclass
class TrainConfig:
    seed: int = 0  # seeds weights, dropout, data order and held-out data (fastformer.seeds)
    batch_size: int = 32  # B, windows (or pairs) per optimizer step: the global batch
    grad_accum_steps: int = 1  # micro-batches per step: the step's batch runs forward/backward in this
    #                            many slices of batch_size / grad_accum_steps rows (less activation memory,
    #                            the same examples, loss and gradient; training/accumulate.py)
    seq_len: int = 128  # T, tokens per window (at most model.max_seq_len)
    max_steps: int = 2000  # optimizer updates in the whole run (the schedule's length)
    optimizer: str = "adamw"  # sgd | adam | adamw
    lr: float = 1e-3  # peak learning rate
    min_lr: typing.Optional[float] = None  # learning rate at the end of a decaying schedule, at most lr;
    #                                        null: lr / 10 (nanoGPT's rule), so it follows lr
    schedule: str = "cosine"  # constant | cosine | linear (after warm-up)
    warmup_steps: int = 100  # linear warm-up from lr / warmup_steps to lr
    weight_decay: float = 0.1  # on 2-D weights only (AdamW decoupled; SGD/Adam as L2)
    beta1: float = 0.9  # Adam/AdamW first-moment decay
    beta2: float = 0.99  # Adam/AdamW second-moment decay
    eps: float = 1e-8  # Adam/AdamW denominator guard
    momentum: float = 0.9  # SGD momentum
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    log_interval: int = 10  # steps between metrics.jsonl lines
    eval_interval: int = 250  # steps between evaluations (and the last step)
    eval_batches: int = 8  # validation batches per evaluation
    checkpoint_interval: int = 250  # steps between checkpoints (and the last step)
    keep_checkpoints: int = 2  # newest checkpoints kept in the run directory
    check_sync_interval: int = 0  # data parallel: steps between comparing a checksum of the weights across
    #                               ranks (a drift stops the run); 0 turns it off
    precision: str = "fp32"  # fp32 | bf16 | auto: the matrix products of the forward and backward (bf16:
    #                          bfloat16 products, float32 sums, on a CPU with AVX-512 BF16; weights, optimizer
    #                          and the other math stay float32; auto: bf16 where it runs natively, else fp32,
    #                          decided when the run starts and recorded as that)

    def __post_init__(self):
        for name in ("batch_size", "grad_accum_steps", "seq_len", "max_steps", "log_interval", "eval_interval",
                     "eval_batches", "checkpoint_interval", "keep_checkpoints"):
            setattr(self, name, check_int(f"train.{name}", getattr(self, name)))
        if self.batch_size % self.grad_accum_steps:
            k, below = self.grad_accum_steps, self.batch_size // self.grad_accum_steps * self.grad_accum_steps
            near = " or ".join(str(m) for m in (below, below + k) if m > 0)
            raise FastformerError(f"train.batch_size={self.batch_size} is not divisible by train.grad_accum_steps="
                                  f"{k}: a step's batch is split into {k} micro-batches of equal size; choose a "
                                  f"batch_size that is a multiple of {k} (e.g. {near})")
        for name in ("warmup_steps", "seed", "check_sync_interval"):
            setattr(self, name, check_int(f"train.{name}", getattr(self, name), minimum=0))
        for name in ("lr", "weight_decay", "eps", "grad_clip"):
            setattr(self, name, check_number(f"train.{name}", getattr(self, name), low=0, finite=True))
        if self.min_lr is not None:
            self.min_lr = check_number("train.min_lr", self.min_lr, low=0, finite=True)
            if self.min_lr > self.lr:
                raise FastformerError(f"train.min_lr={self.min_lr!r} is above train.lr={self.lr!r}: a schedule decays "
                                      f"from lr down to min_lr; give a min_lr <= lr, or null for lr / 10")
        for name in ("beta1", "beta2", "momentum"):
            setattr(self, name, check_number(f"train.{name}", getattr(self, name), low=0, high=1, high_open=True))
        if self.optimizer not in OPTIMIZERS:
            raise FastformerError(f"train.optimizer {self.optimizer!r} is not known: "
                                  f"valid values are {', '.join(OPTIMIZERS)}")
        check_choice("train.precision", self.precision, PRECISION_CHOICES)
        if self.schedule not in SCHEDULES:
            raise FastformerError(f"train.schedule {self.schedule!r} is not known: "
                                  f"valid values are {', '.join(SCHEDULES)}")

    def final_lr(self):
        """The rate a decaying schedule ends at: min_lr, or lr / 10 when min_lr is null."""
        return self.lr / 10 if self.min_lr is None else self.min_lr


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "seq2seq": Seq2SeqConfig}


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seq2seq: Seq2SeqConfig = field(default_factory=Seq2SeqConfig)

    def __post_init__(self):
        for name, klass in SECTIONS.items():
            if not isinstance(getattr(self, name), klass):
                raise FastformerError(f"RunConfig.{name} must be a {klass.__name__}, got "
                                      f"{type(getattr(self, name)).__name__}")
        if self.model_config().trains_on_windows and self.train.seq_len > self.model.max_seq_len:
            raise FastformerError(f"train.seq_len={self.train.seq_len} exceeds model.max_seq_len="
                                  f"{self.model.max_seq_len}: the model has no positions beyond it")
        d, s = self.data, self.seq2seq
        if d.task in SYNTHETIC_TASKS and (d.max_len > s.max_src_len or d.max_len + 1 > s.max_tgt_len):
            raise FastformerError(f"data.max_len={d.max_len} needs seq2seq.max_src_len >= {d.max_len} and "
                                  f"seq2seq.max_tgt_len >= {d.max_len + 1} (<bos> + target), got {s.max_src_len} "
                                  f"and {s.max_tgt_len}")

    @property
    def kind(self):
        """The model the run trains: "lm" (data.task text) or "seq2seq" (its config's kind)."""
        return self.model_config().kind

    @property
    def model_section(self):
        """The name of the section configuring the model in use: "model" or "seq2seq"."""
        return TASK_SECTIONS[self.data.task]

    def model_config(self):
        """The LMConfig or Seq2SeqConfig of the model in use."""
        return getattr(self, self.model_section)

    def to_dict(self):
        """{section: {key: value}} of the model section in use, data and train."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in (self.model_section, "data", "train")}

    @classmethod
    def from_dict(cls, d, base=None):
        """A RunConfig from {section: {key: value}}; missing keys come from `base` (default:
        the defaults). Unknown sections/keys and wrong types raise FastformerError."""
        if not isinstance(d, dict):
            raise FastformerError(f"a run config must be a mapping with sections {list(SECTIONS)}, "
                                  f"got {type(d).__name__}")
        unknown = [k for k in d if k not in SECTIONS]
        if unknown:
            raise FastformerError(f"unknown config section(s) {short_repr(unknown)}: valid sections are "
                                  f"{list(SECTIONS)}")
        base = base or cls()
        merged = {name: dataclasses.asdict(getattr(base, name)) for name in SECTIONS}
        for section, values in d.items():
            if values is None:
                continue
            if not isinstance(values, dict):
                raise FastformerError(f"config section {section!r} must be a mapping of keys to values, "
                                      f"got {short_repr(values)}")
            renamed = getattr(SECTIONS[section], "renamed", {})  # a model section's older key names
            for key, value in values.items():
                key = renamed.get(key, key)
                merged[section][key] = _coerce(section, key, value)
        return cls(**{name: klass(**merged[name]) for name, klass in SECTIONS.items()})


def _field_types(section):
    return typing.get_type_hints(SECTIONS[section])


def _coerce(section, key, value):
    """Check `value` against the declared type of section.key; strings (from --set or a YAML
    value such as 1e-3, which YAML reads as text) are parsed. Returns the typed value."""
    types = _field_types(section)
    if key not in types:
        raise FastformerError(f"unknown config key {section}.{key}: valid keys of {section!r} are {list(types)}")
    t = types[key]
    optional = typing.get_origin(t) is typing.Union and type(None) in typing.get_args(t)
    if optional:
        t = [a for a in typing.get_args(t) if a is not type(None)][0]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
    bad = FastformerError(f"config key {section}.{key} must be {t.__name__}"
                          f"{' or null' if optional else ''}, got {short_repr(value)}")
    if t is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise bad
    if t is int:
        if is_int(value):
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise bad from None
        raise bad
    if t is float:
        if is_int(value) or isinstance(value, float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if t is str:
        if isinstance(value, str):
            return value
        raise bad
    raise AssertionError(f"config field {section}.{key} has an unsupported type {t}")


def apply_overrides(config, overrides):
    """A new RunConfig with each "section.key=value" of `overrides` applied (validated)."""
    d = {}
    for item in overrides:
        if not isinstance(item, str) or "=" not in item or "." not in item.split("=", 1)[0]:
            raise FastformerError(f"override {item!r} must look like section.key=value, e.g. train.lr=1e-3 "
                                  f"(sections: {list(SECTIONS)})")
        name, value = item.split("=", 1)
        section, key = name.strip().split(".", 1)
        if section not in SECTIONS:
            raise FastformerError(f"unknown config section {section!r} in override {item!r}: valid sections "
                                  f"are {list(SECTIONS)}")
        d.setdefault(section, {})[key] = value.strip()
    return RunConfig.from_dict(d, base=config)


PRESETS = {
    # name: (model sizes, training length and rate); all with batch 32, seq_len 128, context 128.
    # tiny trains in under two minutes on 2 cores with the Numba kernels. train.min_lr is left null
    # (lr / 10), so `--set train.lr=...` moves the end of the schedule with it.
    "tiny": (dict(d_model=64, n_heads=2, d_ff=256, n_layers=2),
             dict(max_steps=2000, lr=5e-3, warmup_steps=50, eval_interval=250,
                  checkpoint_interval=500)),
    "small": (dict(d_model=128, n_heads=4, d_ff=512, n_layers=2),
              dict(max_steps=3000, lr=2e-3, warmup_steps=100, eval_interval=250, checkpoint_interval=250)),
    "medium": (dict(d_model=256, n_heads=8, d_ff=1024, n_layers=4),
               dict(max_steps=5000, lr=1e-3, warmup_steps=200, eval_interval=250,
                    checkpoint_interval=500)),
}


def preset(name):
    """The RunConfig of a named preset: tiny, small or medium."""
    if name not in PRESETS:
        raise FastformerError(f"unknown preset {name!r}: valid presets are {', '.join(PRESETS)}")
    model, train = PRESETS[name]
    return RunConfig(model=ModelConfig(max_seq_len=128, **model),
                     train=TrainConfig(batch_size=32, seq_len=128, **train))


def match_tokenizer(config, tokenizer, field="vocab_size"):
    """The config with the model's `field` (vocab_size; src_vocab_size or tgt_vocab_size for
    seq2seq) equal to the tokenizer's vocab_size. The default (259, the byte tokenizer's) follows
    the tokenizer; any other value that differs is an error."""
    section = config.model_section
    model = getattr(config, section)
    v = getattr(model, field)
    if v == tokenizer.vocab_size:
        return config
    if v == getattr(type(model), field):
        return dataclasses.replace(config, **{section: dataclasses.replace(model, **{field: tokenizer.vocab_size})})
    raise FastformerError(f"{section}.{field}={v} but the {tokenizer.kind} tokenizer has {tokenizer.vocab_size} ids: "
                          f"drop {section}.{field} (it follows the tokenizer) or set it to {tokenizer.vocab_size}")


def check_training_memory(config, ranks=1):
    """Refuse, before anything is allocated, a run whose estimated memory per process (weights,
    gradients, the optimizer's state and a micro-batch's activations; models.config.training_memory)
    exceeds what the machine has available. Returns the estimate in bytes."""
    t, m = config.train, config.model_config()
    rows = max(t.batch_size // (t.grad_accum_steps * ranks), 1)  # a micro-batch of one rank
    copies = 2 + (1 if t.optimizer == "sgd" else 2) + (t.grad_accum_steps > 1)  # + the accumulation buffer
    seq_len = t.seq_len if m.trains_on_windows else None
    shape = f"{rows} x {seq_len} tokens" if seq_len else f"{rows} pairs of {m.max_src_len}/{m.max_tgt_len} tokens"
    return check_memory(f"training a model of {count_parameters(m):,} parameters on micro-batches of {shape}",
                        training_memory(m, rows, seq_len, copies),
                        "make the model, train.batch_size or train.seq_len smaller, or raise train.grad_accum_steps")


def load_config(path, base=None):
    """A RunConfig from a YAML file (sections model or seq2seq, data, train; missing keys from `base`)."""
    check_input_file(path, "config file")
    text = read_utf8(path, "config file")
    try:
        d = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise FastformerError(f"config file {path!r} is not valid YAML: {e}") from None
    except RecursionError:
        raise FastformerError(f"config file {path!r} is nested too deeply to be a run config") from None
    try:
        return RunConfig.from_dict(d or {}, base=base)
    except FastformerError as e:
        raise FastformerError(f"config file {path!r}: {e}") from None


def save_config(config, path):
    """Write the RunConfig as YAML (atomically: temp file, fsync, rename)."""
    with atomic_open(path) as f:
        yaml.safe_dump(config.to_dict(), f, sort_keys=False)
