"""Checkpoints: everything needed to resume a run exactly, or to load a model for generation.

A run directory holds the resolved `config.yaml`, `metrics.jsonl` and one directory per
checkpoint, newest last:

    RUN/ckpt-000500/
        model.safetensors      weights, Hugging Face GPT-2 names
        optimizer.safetensors  optimizer state as flat arrays (the layout of the flat buffer)
        config.yaml            the resolved RunConfig (its data.task tells the model kind)
        tokenizer.json         a language model's tokenizer (see fastformer.tokenizer), or
        src_tokenizer/tokenizer.json, tgt_tokenizer/tokenizer.json   an encoder-decoder's two
        state.json             step, model kind, the bit-generator state of every RNG (the data's:
                               its task's position), the data fingerprint, and the SHA-256 of
                               each file above

A checkpoint is written into a fresh private directory beside it, `ckpt-000500.tmp-XXXXXXXX/`
(every file fsynced), and then renamed into place, so a run killed at any moment leaves the
previous checkpoint whole; `state.json` is written last. The files a checkpoint must hold are
fixed by its model kind (`checkpoint_files`): state.json must list exactly those, each with its
SHA-256, which rejects a file that was truncated or altered later (a state.json cannot name
other files, nor leave one out). Old checkpoints are pruned by renaming them to a temporary name
before deleting them; `sweep_run_dir` removes what a killed writer left. Only safetensors, JSON
and YAML are read: loading never executes code.
"""

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import stat

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from fastformer.atomic import atomic_dir, file_mode, remove_dir, remove_stale_temps, temp_target, write_json_atomic
from fastformer.data.tokenizer import TOKENIZER_FILE, load_tokenizer
from fastformer.errors import FastformerError, is_int
from fastformer.models.hf import is_hf_dir
from fastformer.models.lm import TransformerLM
from fastformer.training.config import load_config, save_config
from fastformer.training.tasks import KINDS, new_model

FORMAT_VERSION = 1
METRICS_FILE = "metrics.jsonl"  # the run's log: one JSON object per line, written by the trainer
STATE_FILE = "state.json"  # models/hf.is_hf_dir knows the name too: a checkpoint is not a Hugging Face directory
_CKPT_RE = re.compile(r"^ckpt-(\d+)$")
_LEGACY_TMP_RE = re.compile(r"^ckpt-\d+\.tmp$")  # the fixed temporary name of older fastformers
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def checkpoint_files(kind):
    """The files a checkpoint of a `kind` model holds besides state.json, in the order written:
    the keys its state.json's "files" must have, no more and no fewer."""
    tokenizers = [os.path.normpath(os.path.join(sub, TOKENIZER_FILE)) for sub in KINDS[kind].tokenizers.values()]
    return ["model.safetensors", "optimizer.safetensors", "config.yaml", *tokenizers]


def _fsync_file(path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def safetensors_errors(path):
    """A SafetensorError caused by the file system (a full disk, a read-only directory) as the
    OSError it carries, naming `path`; any other SafetensorError is raised as it is."""
    try:
        yield
    except SafetensorError as e:
        m = re.search(r"os error (\d+)", str(e))
        if m is None:
            raise
        code = int(m.group(1))
        raise OSError(code, os.strerror(code), os.fspath(path)) from None


def checkpoint_dirs(run_dir):
    """Complete checkpoint directories of a run, oldest first."""
    if not os.path.isdir(run_dir):
        return []
    found = []
    for name in os.listdir(run_dir):
        m = _CKPT_RE.match(name)
        if m and os.path.isfile(os.path.join(run_dir, name, STATE_FILE)):
            found.append((int(m.group(1)), os.path.join(run_dir, name)))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir):
    """The newest checkpoint directory of a run; FastformerError when there is none."""
    dirs = checkpoint_dirs(run_dir)
    if not dirs:
        raise FastformerError(f"no checkpoint in {run_dir!r}: expected a directory ckpt-NNNNNN holding "
                              f"{STATE_FILE} (written by fastformer train)")
    return dirs[-1]


def resolve_checkpoint(path):
    """A checkpoint directory from either a checkpoint directory or a run directory (its newest)."""
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return path
    return latest_checkpoint(path)


def sweep_run_dir(run_dir):
    """Delete what killed writers left in a run directory (call it holding the run's lock):
    temporaries of checkpoints, config.yaml and metrics.jsonl (`<name>.tmp-XXXXXXXX`), older
    fastformers' `ckpt-NNNNNN.tmp`, and checkpoint directories whose state.json is gone (a prune
    cut short). Only real directories and files of those names; a symlink is never followed.
    Returns the names removed."""
    removed = remove_stale_temps(run_dir, _RUN_TEMPS)
    for entry in os.scandir(run_dir):
        if not entry.is_dir(follow_symlinks=False):
            continue
        legacy = _LEGACY_TMP_RE.match(entry.name)
        orphan = _CKPT_RE.match(entry.name) and not os.path.lexists(os.path.join(entry.path, STATE_FILE))
        if orphan and not _holds_checkpoint_files_only(entry.path):
            continue  # a folder of someone else's that happens to be called ckpt-N: never deleted
        if legacy or orphan:
            shutil.rmtree(entry.path)
            removed.append(entry.name)
    return removed


_RUN_TEMPS = r"ckpt-\d+|config\.yaml|metrics\.jsonl"  # the targets of a run directory's temporaries
_CHECKPOINT_NAMES = {"model.safetensors", "optimizer.safetensors", "config.yaml", STATE_FILE, TOKENIZER_FILE,
                     *(sub for kind in KINDS.values() for sub in kind.tokenizers.values() if sub != ".")}


def _holds_checkpoint_files_only(path):
    """Whether every entry of the directory `path` is a name a checkpoint holds."""
    try:
        return set(os.listdir(path)) <= _CHECKPOINT_NAMES
    except OSError:
        return False


def _is_run_entry(name):
    """Whether `name` is one fastformer writes in a run directory (its files, checkpoints and their temporaries)."""
    target = temp_target(name)
    if target is not None:
        return re.fullmatch(_RUN_TEMPS, target) is not None
    return name in (".lock", "config.yaml", "metrics.jsonl") or bool(_CKPT_RE.match(name) or _LEGACY_TMP_RE.match(name))


def check_run_dir(run_dir, resume=False):
    """Refuse a run directory that fastformer would clean or overwrite without owning it, before
    anything is written there: to start a run, `run_dir` must be new, empty or a run of
    fastformer's own (only the names it writes, a config.yaml it reads, a metrics log of its
    lines); to resume, it must hold a checkpoint."""
    if resume:
        latest_checkpoint(run_dir)
        return
    if not os.path.isdir(run_dir) or os.path.islink(run_dir):
        return  # lock_run_dir makes it, or refuses what is not a directory
    entries = os.listdir(run_dir)
    foreign = sorted(name for name in entries if not _is_run_entry(name))

    def refuse(what):
        return FastformerError(f"--out {run_dir!r} is not a fastformer run directory ({what}): training would "
                               f"overwrite it; choose a new or empty directory")

    if foreign:
        shown = ", ".join(map(repr, foreign[:3])) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise refuse(f"it holds {shown}")
    if "config.yaml" in entries:
        try:
            load_config(os.path.join(run_dir, "config.yaml"))
        except (FastformerError, OSError):
            raise refuse("its config.yaml is not a run config") from None
    if "metrics.jsonl" in entries:
        records = [r for _, r in read_metrics_lines(os.path.join(run_dir, "metrics.jsonl"))]
        if None in records[:-1]:  # only the last line may be one cut by a crash
            raise refuse("its metrics.jsonl holds lines fastformer did not write")


def open_metrics(path, flags):
    """The metrics log `path` opened (binary) with os.open `flags`, refusing anything but a regular
    file: a symlink is not followed (it could point anywhere) and a FIFO or device is not opened
    for good (it would block), each a FastformerError naming the file."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, file_mode())
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO):  # a symlink; a FIFO without a reader (for writing)
            raise _not_metrics(path, "a symlink" if e.errno == errno.ELOOP else "not a regular file") from None
        raise
    kind = os.fstat(fd).st_mode
    if not stat.S_ISREG(kind):
        os.close(fd)
        raise _not_metrics(path, "a directory" if stat.S_ISDIR(kind) else "not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "ab" if flags & (os.O_WRONLY | os.O_RDWR) else "rb")


def _not_metrics(path, what):
    return FastformerError(f"{path!r} is {what}, not the metrics log fastformer writes: remove it (or choose "
                           f"another --out)")


def read_metrics_lines(path):
    """The lines of the metrics log `path` as [(raw bytes, record or None)]: a record is a JSON
    object with an integer "step" (a line fastformer wrote); None for anything else (a line cut
    by a crash, bytes that are not UTF-8, JSON nested too deeply). FastformerError when `path`
    is not a regular file (see open_metrics)."""
    with open_metrics(path, os.O_RDONLY) as f:
        raw_lines = [ln for ln in f if ln.strip()]
    out = []
    for raw in raw_lines:
        try:
            record = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            record = None
        if not (isinstance(record, dict) and is_int(record.get("step"))):
            record = None
        out.append((raw, record))
    return out



def save_checkpoint(run_dir, step, model, optimizer, config, tokenizers, rng_states, extra=None,
                    keep=2):
    """Write RUN/ckpt-<step> atomically and delete all but the newest `keep` checkpoints.

    Args:
        tokenizers: {name: tokenizer} with the names of KINDS[config.kind].tokenizers.
        rng_states: {name: bit_generator.state dict} of every generator the run uses.
        extra: more JSON-able fields for state.json (e.g. the data fingerprint).
    Returns the checkpoint directory. A file-system error (a full disk) raises OSError naming
    it, with no temporary left and the earlier checkpoints untouched.
    """
    final = os.path.join(run_dir, f"ckpt-{step:06d}")
    with atomic_dir(final, replace=True) as tmp:  # re-saving a step (e.g. after a resume) replaces it
        weights = {n: np.ascontiguousarray(a) for n, a in model.state_dict().items()}
        with safetensors_errors(final):
            save_file(weights, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
            save_file({n: np.ascontiguousarray(a) for n, a in optimizer.state_dict().items()},
                      os.path.join(tmp, "optimizer.safetensors"),
                      metadata={"optimizer": type(optimizer).__name__})
        save_config(config, os.path.join(tmp, "config.yaml"))
        for name, sub in KINDS[config.kind].tokenizers.items():
            tokenizers[name].save(os.path.join(tmp, sub))
        files = {}
        for name in checkpoint_files(config.kind):
            _fsync_file(os.path.join(tmp, name))
            files[name] = _sha256(os.path.join(tmp, name))
        state = {"format_version": FORMAT_VERSION, "step": step, "model_kind": config.kind, "rng": rng_states,
                 "files": files, **(extra or {})}
        write_json_atomic(state, os.path.join(tmp, STATE_FILE))
    prune_checkpoints(run_dir, keep)
    return final


def prune_checkpoints(run_dir, keep):
    """Delete all but the newest `keep` checkpoints of a run (each renamed aside first, so a prune
    cut short leaves no half checkpoint; the next start finishes it)."""
    for old in checkpoint_dirs(run_dir)[:-keep]:
        remove_dir(old)


class Checkpoint:
    """A loaded checkpoint: `config` (RunConfig), `tokenizers` ({name: tokenizer}, see
    tasks.KINDS), `weights` and `optimizer_state` ({name: array}), `state` (the state.json
    dict) and `path`."""

    def __init__(self, path, config, tokenizers, weights, optimizer_state, state):
        self.path, self.config, self.tokenizers = path, config, tokenizers
        self.weights, self.optimizer_state, self.state = weights, optimizer_state, state

    @property
    def step(self):
        return self.state["step"]

    @property
    def tokenizer(self):
        """A language model's tokenizer."""
        return self.tokenizers["tokenizer"]

    def new_model(self):
        """The checkpoint's model (TransformerLM or Seq2SeqTransformer) with its weights."""
        model = new_model(self.config, self.config.train.seed)
        model.load_state_dict(self.weights)
        return model


def _read_state(path):
    """The state.json of checkpoint directory `path`, checked against what fastformer writes:
    FastformerError naming the file and the field otherwise."""
    state_path = os.path.join(path, STATE_FILE)

    def bad(what):
        return FastformerError(f"checkpoint file {state_path!r} is corrupt: {what}")

    try:
        with open(state_path, "rb") as f:
            state = json.loads(f.read().decode("utf-8"))
    except UnicodeDecodeError:
        raise bad("it is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise bad(f"it is not JSON ({e})") from None
    except RecursionError:
        raise bad("its JSON is nested too deeply") from None
    if not isinstance(state, dict):
        raise bad(f"it holds a JSON {type(state).__name__}, not an object")
    version = state.get("format_version")
    if not is_int(version) or version != FORMAT_VERSION:
        raise FastformerError(f"checkpoint file {state_path!r} has format_version {version!r}; this fastformer "
                              f"reads version {FORMAT_VERSION}")
    kind = state.get("model_kind", "lm")
    if kind not in KINDS:
        raise bad(f"model_kind must be one of {', '.join(KINDS)}, got {kind!r}")
    step = state.get("step")
    if not is_int(step) or step < 0:
        raise bad(f"step must be an integer >= 0, got {step!r}")
    m = _CKPT_RE.match(os.path.basename(os.path.normpath(path)))
    if m and int(m.group(1)) != step:
        raise bad(f"it says step {step} in the directory of step {int(m.group(1))}")
    files, expected = state.get("files"), checkpoint_files(kind)
    if not isinstance(files, dict):
        raise bad(f"files must map each of {', '.join(expected)} to its SHA-256, got {type(files).__name__} "
                  f"{str(files)[:60]}")
    if set(files) != set(expected):
        extra, missing = sorted(set(files) - set(expected)), [n for n in expected if n not in files]
        raise bad(f"files must list exactly {', '.join(expected)}"
                  + (f"; missing {', '.join(missing)}" if missing else "")
                  + (f"; not a file of a checkpoint: {', '.join(map(repr, extra))}" if extra else ""))
    for name, digest in files.items():
        if not (isinstance(digest, str) and _SHA256_RE.match(digest)):
            raise bad(f"the SHA-256 of {name} must be 64 hexadecimal digits, got {digest!r}")
    rng = state.get("rng")
    if not (isinstance(rng, dict) and isinstance(rng.get("dropout"), dict) and isinstance(rng.get("data"), dict)):
        raise bad("rng must hold the generator states 'dropout' and 'data' (objects)")
    ranks = rng.get("dropout_ranks")
    if ranks is not None and not (isinstance(ranks, list) and ranks):
        raise bad("rng.dropout_ranks must be a list of generator states")
    for i, s in enumerate([rng["dropout"], *(ranks or [])]):
        if not _is_generator_state(s):
            raise bad(f"rng.{'dropout' if i == 0 else f'dropout_ranks[{i - 1}]'} is not the state of a NumPy "
                      f"bit generator ({', '.join(_BIT_GENERATORS)})")
    return state


_BIT_GENERATORS = ("PCG64", "PCG64DXSM", "Philox", "SFC64", "MT19937")


def _is_generator_state(s):
    """Whether `s` is a state that its named NumPy bit generator accepts."""
    if not isinstance(s, dict) or s.get("bit_generator") not in _BIT_GENERATORS:
        return False
    try:
        getattr(np.random, s["bit_generator"])().state = s
    except (KeyError, TypeError, ValueError, OverflowError):
        return False
    return True


def load_checkpoint(path, kind=None):
    """Load and verify a checkpoint (a checkpoint directory, or a run directory: its newest);
    with `kind` ("lm", "seq2seq"), one of another kind is refused, naming the commands for it.

    The files a checkpoint must have are fixed by its model kind (checkpoint_files); each is
    checked against the SHA-256 in state.json. A missing, truncated or altered file, or a
    malformed state.json, raises FastformerError naming it.
    """
    for _ in range(3):  # a run directory's newest checkpoint can be pruned while it is read: take the next newest
        ckpt = resolve_checkpoint(path)
        try:
            return _load_checkpoint(ckpt, kind)
        except (FastformerError, OSError):
            if os.path.isdir(ckpt):
                raise
            if ckpt == path:
                raise FastformerError(f"checkpoint {path!r} was deleted while it was read (a running train prunes "
                                      f"its old checkpoints: train.keep_checkpoints)") from None
    return _load_checkpoint(resolve_checkpoint(path), kind)


def _load_checkpoint(path, kind):
    """load_checkpoint of the checkpoint directory `path`."""
    state = _read_state(path)
    step = state["step"]
    for name, digest in state["files"].items():
        fpath = os.path.join(path, name)
        if not os.path.isfile(fpath):
            raise FastformerError(f"checkpoint {path!r} is incomplete: {name} is missing")
        if _sha256(fpath) != digest:
            raise FastformerError(f"checkpoint file {fpath!r} is corrupt or truncated (its SHA-256 does not "
                                  f"match the one recorded at step {step}); older checkpoints of this run: "
                                  f"{[d for d in checkpoint_dirs(os.path.dirname(path) or '.') if d != path]}")
    try:
        weights = load_file(os.path.join(path, "model.safetensors"))
        optimizer_state = load_file(os.path.join(path, "optimizer.safetensors"))
    except (SafetensorError, OSError, TypeError) as e:  # TypeError: a dtype NumPy has no type for (BF16, F8)
        raise FastformerError(f"checkpoint {path!r} holds an unreadable safetensors file: {e}") from None
    config = load_config(os.path.join(path, "config.yaml"))
    if state.get("model_kind", "lm") != config.kind:
        raise FastformerError(f"checkpoint {path!r} is corrupt: state.json says model kind "
                              f"{state.get('model_kind')!r} but its config trains a {config.kind} "
                              f"(data.task={config.data.task})")
    if kind is not None and config.kind != kind:
        have = KINDS[config.kind]
        raise FastformerError(f"{path} holds {have.config.noun} (data.task={config.data.task}), not "
                              f"{KINDS[kind].config.noun}: use {have.commands} with it")
    tokenizers = {name: load_tokenizer(os.path.join(path, sub)) for name, sub in KINDS[config.kind].tokenizers.items()}
    return Checkpoint(path, config, tokenizers, weights, optimizer_state, state)


def checkpoint_kind(path):
    """The model kind ("lm", "seq2seq") of a checkpoint or run directory, from its config alone;
    a Hugging Face GPT-2 directory holds a language model."""
    if is_hf_dir(path):
        return "lm"
    return load_config(os.path.join(resolve_checkpoint(path), "config.yaml")).kind


def load_model(path):
    """(TransformerLM, tokenizer, RunConfig) for inference, from a checkpoint or run directory or
    a Hugging Face GPT-2 directory (config.json, model.safetensors, tokenizer.json; e.g. one
    written by `fastformer export`). A directory of another architecture is refused by name."""
    if is_hf_dir(path):
        from fastformer.training.config import RunConfig, TrainConfig

        model = TransformerLM.from_pretrained(path)
        tokenizer = load_tokenizer(path)
        if tokenizer.vocab_size > model.config.vocab_size:
            raise FastformerError(f"{path}: the tokenizer has {tokenizer.vocab_size} ids but the model only "
                                  f"{model.config.vocab_size}")
        seq_len = min(TrainConfig.seq_len, model.config.max_seq_len)
        return model, tokenizer, RunConfig(model=model.config, train=TrainConfig(seq_len=seq_len))
    ckpt = load_checkpoint(path, "lm")
    return ckpt.new_model(), ckpt.tokenizer, ckpt.config

