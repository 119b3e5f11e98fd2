"""Checkpoints under faults: state.json checked against the fixed file set of its kind, a full disk
or a read-only directory refused in one line with nothing lost or left behind, interrupted pruning
and stale temporaries swept at the next start (only fastformer's own names), export beside an
unrelated X.tmp, metrics.jsonl trimmed atomically."""

import errno
import hashlib
import json
import os
import shutil

import pytest
from conftest import copy_run, trained_run
from safetensors import SafetensorError
from test_trainer import TEXT, tiny_config

import fastformer.atomic as atomic
import fastformer.training.checkpoint as checkpoint
from fastformer.atomic import temp_target
from fastformer.cli import main
from fastformer.errors import FastformerError
from fastformer.training.checkpoint import checkpoint_dirs, checkpoint_files, load_checkpoint, load_model
from fastformer.training.export import export_hf
from fastformer.training.trainer import Trainer

CONFIG6 = tiny_config(max_steps=6, checkpoint_interval=2)  # the base run's config, trained on to step 6


class Killed(Exception):
    """Stands for the process dying at that point."""


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return trained_run(str(tmp_path_factory.mktemp("base") / "run"), tiny_config(max_steps=4, checkpoint_interval=2),
                       TEXT)


@pytest.fixture
def run(base, tmp_path):
    """A fresh copy of a trained run (checkpoints 2 and 4)."""
    return copy_run(base, tmp_path)


def edit_state(run, fn, step=4):
    path = os.path.join(run, f"ckpt-{step:06d}", "state.json")
    with open(path) as f:
        state = json.load(f)
    with open(path, "w") as f:
        json.dump(fn(state), f)
    return path


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def with_files(state, files):
    return {**state, "files": files}


MALFORMED = {
    "a traversing name": (lambda s: with_files(s, {**s["files"], "../../../../etc/hostname": sha256("/etc/hostname")}),
                          "not a file of a checkpoint: '../../../../etc/hostname'"),
    "an absolute name": (lambda s: with_files(s, {**s["files"], "/etc/hostname": sha256("/etc/hostname")}),
                         "not a file of a checkpoint: '/etc/hostname'"),
    "no files": (lambda s: with_files(s, {}), "files must list exactly model.safetensors, optimizer.safetensors, "
                                              "config.yaml, tokenizer.json; missing"),
    "a file left out": (lambda s: with_files(s, {k: v for k, v in s["files"].items() if k != "model.safetensors"}),
                        "missing model.safetensors"),
    "files as a list": (lambda s: with_files(s, list(s["files"])), "files must map each of"),
    "a hash that is no hash": (lambda s: with_files(s, {k: 5 for k in s["files"]}), "must be 64 hexadecimal"),
    "step as text": (lambda s: {**s, "step": "ten"}, "step must be an integer >= 0, got 'ten'"),
    "a fractional step": (lambda s: {**s, "step": 10.5}, "step must be an integer >= 0, got 10.5"),
    "a negative step": (lambda s: {**s, "step": -1}, "got -1"),
    "a step of another directory": (lambda s: {**s, "step": 6}, "it says step 6 in the directory of step 4"),
    "no rng": (lambda s: {k: v for k, v in s.items() if k != "rng"}, "rng must hold"),
    "an rng that is a number": (lambda s: {**s, "rng": 5}, "rng must hold"),
    "a dropout state of no generator": (lambda s: {**s, "rng": {**s["rng"], "dropout": {"bit_generator": "X"}}},
                                        "rng.dropout is not the state of a NumPy bit generator"),
    "a broken dropout state": (lambda s: {**s, "rng": {**s["rng"], "dropout": {"bit_generator": "PCG64"}}},
                               "rng.dropout is not the state"),
    "an unknown model kind": (lambda s: {**s, "model_kind": 5}, "model_kind must be one of lm, seq2seq, got 5"),
    "a format version as text": (lambda s: {**s, "format_version": "1"}, "has format_version '1'"),
    "a list": (lambda s: [s], "it holds a JSON list, not an object"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_state_json_is_refused_naming_it(run, case, capsys):
    fn, message = MALFORMED[case]
    path = edit_state(run, fn)
    with pytest.raises(FastformerError, match=f"{path}.*{message[:40]}") as e:
        load_checkpoint(run)
    assert message in str(e.value)
    assert main(["train", "--resume", "--out", run]) == 2  # the command line: one line, exit status 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and path in err


@pytest.mark.parametrize("raw, message", [("[" * 100000 + "]" * 100000, "nested too deeply"),
                                          ("", "it is not JSON"), (b"\xff\xfe{", "it is not UTF-8 text")])
def test_unparseable_state_json_is_refused(run, raw, message):
    path = os.path.join(run, "ckpt-000004", "state.json")
    with open(path, "wb") as f:
        f.write(raw.encode() if isinstance(raw, str) else raw)
    with pytest.raises(FastformerError, match=message):
        load_checkpoint(run)


def test_an_emptied_file_list_cannot_turn_verification_off(run):
    """The attack of the issue: altered weights and a state.json that no longer lists them."""
    path = os.path.join(run, "ckpt-000004", "model.safetensors")
    data = bytearray(open(path, "rb").read())
    data[-3] ^= 0x40  # still a valid safetensors file, one weight changed
    open(path, "wb").write(bytes(data))
    with pytest.raises(FastformerError, match="corrupt or truncated"):
        load_model(run)
    edit_state(run, lambda s: with_files(s, {}))
    with pytest.raises(FastformerError, match="files must list exactly"):
        load_model(run)


def test_restore_errors_name_state_json(run):
    edit_state(run, lambda s: {**s, "rng": {**s["rng"], "data": {"bit_generator": "MT19937"}}})
    with pytest.raises(FastformerError, match=r"state\.json' is corrupt: its rng states cannot be restored"):
        Trainer(None, run, resume=True, text=TEXT, verbose=False)


def test_the_file_set_is_fixed_by_the_kind():
    assert checkpoint_files("lm") == ["model.safetensors", "optimizer.safetensors", "config.yaml", "tokenizer.json"]
    assert checkpoint_files("seq2seq")[3:] == ["src_tokenizer/tokenizer.json", "tgt_tokenizer/tokenizer.json"]


# --------------------------------------------------------------------------------- a full disk
def full_disk_after(monkeypatch, calls):
    """safetensors' writes fail as on a full disk from the `calls`-th on, after writing a part."""
    real, count = checkpoint.save_file, [0]

    def save_file(tensors, path, metadata=None):
        count[0] += 1
        if count[0] >= calls:
            with open(path, "wb") as f:
                f.write(b"\x00" * 100)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", save_file)


@pytest.mark.parametrize("calls", [1, 2])
def test_a_full_disk_during_a_checkpoint_loses_nothing(run, monkeypatch, calls, capsys):
    before = {d: sha256(os.path.join(d, "model.safetensors")) for d in checkpoint_dirs(run)}
    full_disk_after(monkeypatch, calls)
    trainer = Trainer(CONFIG6, run, resume=True, text=TEXT, verbose=False)
    with pytest.raises(OSError) as e:
        trainer.train()
    trainer.close()
    assert e.value.errno == errno.ENOSPC and e.value.filename == os.path.join(run, "ckpt-000006")
    assert sorted(os.listdir(run)) == [".lock", "ckpt-000002", "ckpt-000004", "config.yaml", "metrics.jsonl"]
    assert {d: sha256(os.path.join(d, "model.safetensors")) for d in checkpoint_dirs(run)} == before
    assert load_checkpoint(run).step == 4
    assert main(["train", "--resume", "--out", run, "--max-steps", "6"]) == 2
    assert capsys.readouterr().err.endswith(f"error: '{os.path.join(run, 'ckpt-000006')}': No space left on device\n")


def test_other_safetensors_errors_are_not_hidden(run, monkeypatch):
    def broken(tensors, path, metadata=None):
        raise SafetensorError("tensor is not contiguous")

    monkeypatch.setattr(checkpoint, "save_file", broken)
    trainer = Trainer(CONFIG6, run, resume=True, text=TEXT, verbose=False)
    with pytest.raises(SafetensorError, match="not contiguous"):
        trainer.train()
    assert [n for n in os.listdir(run) if ".tmp" in n] == []


# -------------------------------------------------------------------------------- read-only
@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_a_read_only_run_directory_is_refused_in_one_line(run, capsys):
    os.chmod(run, 0o555)
    try:
        for argv in (["train", "--resume", "--out", run, "--max-steps", "6"],
                     ["export", "--checkpoint", run, "--format", "hf", "--out", os.path.join(run, "hf")]):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and f"'{run}" in err and err.endswith(": Permission denied\n"), err
        assert [n for n in os.listdir(run) if ".tmp" in n] == []
    finally:
        os.chmod(run, 0o755)


def test_a_read_only_file_system_is_refused_in_one_line(run, monkeypatch, capsys):
    """As a read-only mount answers (root included): every create fails with EROFS."""
    real_open, real_mkdir = os.open, os.mkdir

    def ro_open(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and os.path.abspath(path).startswith(run):
            raise OSError(errno.EROFS, "Read-only file system", path)
        return real_open(path, flags, *args, **kwargs)

    def ro_mkdir(path, *args, **kwargs):
        if os.path.abspath(path).startswith(run):
            raise OSError(errno.EROFS, "Read-only file system", path)
        return real_mkdir(path, *args, **kwargs)

    os.remove(os.path.join(run, ".lock"))
    monkeypatch.setattr(os, "open", ro_open)
    monkeypatch.setattr(os, "mkdir", ro_mkdir)
    assert main(["train", "--resume", "--out", run, "--max-steps", "6"]) == 2
    assert capsys.readouterr().err == f"fastformer train: error: '{run}': Read-only file system\n"
    hf = os.path.join(run, "hf")
    assert main(["export", "--checkpoint", run, "--format", "hf", "--out", hf]) == 2
    assert capsys.readouterr().err == f"fastformer export: error: '{hf}': Read-only file system\n"


@pytest.mark.parametrize("where", ["a file", "under a file", "empty"])
def test_out_that_cannot_be_a_directory(run, tmp_path, where, capsys):
    afile = tmp_path / "afile.txt"
    afile.write_text("mine")
    out = {"a file": str(afile), "under a file": str(afile / "sub"), "empty": ""}[where]
    data = tmp_path / "text.txt" if where == "empty" else None  # the tokenizer and prepare commands too
    if data:
        data.write_text("hello world\n")
    more = [["tokenizer", "train", "--kind", "char", "--data", str(data), "--out", out],
            ["prepare", "--data", str(data), "--out", out]] if data else []
    for argv in (["train", "--max-steps", "1", "--out", out], ["export", "--checkpoint", run, "--format", "hf",
                                                                "--out", out], *more):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and (repr(out) in err if out else "(--out) is an empty path" in err), err
    assert afile.read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["afile.txt", "run"] + (["text.txt"] if data else [])


# ----------------------------------------------------------------------------------- sweeping
def test_interrupted_pruning_and_stale_temporaries_are_swept(run, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    shutil.copytree(os.path.join(run, "ckpt-000002"), os.path.join(run, "ckpt-000001"))
    os.remove(os.path.join(run, "ckpt-000001", "state.json"))  # a prune of an older fastformer, cut short
    ours = ["ckpt-000006.tmp-k3j2x9a0", "ckpt-000006.tmp", "metrics.jsonl.tmp-abcdefgh", "config.yaml.tmp-12345678"]
    for name in ours[:2]:
        os.makedirs(os.path.join(run, name))
        open(os.path.join(run, name, "model.safetensors"), "wb").write(b"half")
    for name in ours[2:]:
        open(os.path.join(run, name), "w").write("half")
    theirs = ["notes.tmp", "ckpt-best", "my.txt.tmp-abcdefgh", "ckpt-000003", "ckpt-000005.tmp-linked00"]
    os.makedirs(os.path.join(run, "notes.tmp"))
    os.makedirs(os.path.join(run, "ckpt-best"))
    open(os.path.join(run, "my.txt.tmp-abcdefgh"), "w").write("mine")
    os.symlink(outside, os.path.join(run, "ckpt-000003"))  # a symlink: never followed nor removed
    os.symlink(outside, os.path.join(run, "ckpt-000005.tmp-linked00"))
    Trainer(None, run, resume=True, text=TEXT, verbose=False).close()
    left = set(os.listdir(run))
    assert not left & set(ours) and "ckpt-000001" not in left
    assert set(theirs) <= left and os.listdir(outside) == ["keep.txt"]
    assert load_checkpoint(run).step == 4


def test_pruning_cut_short_leaves_no_orphan(run, monkeypatch):
    def killed(path):
        raise Killed

    trainer = Trainer(CONFIG6, run, resume=True, text=TEXT, verbose=False)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed)  # the delete after the rename aside
    with pytest.raises(Killed):
        trainer.train()
    monkeypatch.undo()
    trainer.close()
    ckpts = sorted(n for n in os.listdir(run) if n.startswith("ckpt-"))
    assert ckpts[1:] == ["ckpt-000004", "ckpt-000006"] and temp_target(ckpts[0]) == "ckpt-000002"
    Trainer(None, run, resume=True, text=TEXT, verbose=False).close()
    assert sorted(n for n in os.listdir(run) if n.startswith("ckpt-")) == ["ckpt-000004", "ckpt-000006"]


# ------------------------------------------------------------------------------------- export
def test_export_never_deletes_what_it_did_not_create(run, tmp_path):
    model, tok, _ = load_model(run)
    out = tmp_path / "hf"
    (tmp_path / "hf.tmp").mkdir()
    (tmp_path / "hf.tmp" / "precious.txt").write_text("mine")
    (tmp_path / "hf.tmp-abcdefgh").write_text("mine too")
    assert export_hf(model, tok, str(out)) == ["config.json", "model.safetensors", "tokenizer.json",
                                               "tokenizer_config.json"]
    assert (tmp_path / "hf.tmp" / "precious.txt").read_text() == "mine"
    assert (tmp_path / "hf.tmp-abcdefgh").read_text() == "mine too"
    assert sorted(os.listdir(tmp_path)) == ["hf", "hf.tmp", "hf.tmp-abcdefgh", "run"]


def test_export_files_follow_the_umask(run, tmp_path):
    model, tok, _ = load_model(run)
    old = os.umask(0o022)
    try:
        export_hf(model, tok, str(tmp_path / "hf"))
    finally:
        os.umask(old)
    modes = {n: os.stat(tmp_path / "hf" / n).st_mode & 0o777 for n in os.listdir(tmp_path / "hf")}
    assert set(modes.values()) == {0o644}, modes
    assert os.stat(tmp_path / "hf").st_mode & 0o777 == 0o755
    assert {os.stat(os.path.join(d, n)).st_mode & 0o777 for d in checkpoint_dirs(run) for n in os.listdir(d)} \
        <= {0o644, 0o600}  # copied from the module's run, made under the test process's umask


def test_checkpoint_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        trainer = Trainer(tiny_config(max_steps=1), str(tmp_path / "run"), text=TEXT, verbose=False)
        trainer.train()
        trainer.close()
    finally:
        os.umask(old)
    ckpt = checkpoint_dirs(str(tmp_path / "run"))[0]
    assert {n: os.stat(os.path.join(ckpt, n)).st_mode & 0o777 for n in os.listdir(ckpt)} == \
        dict.fromkeys(os.listdir(ckpt), 0o644)
    assert os.stat(ckpt).st_mode & 0o777 == 0o755


def test_export_refuses_a_file_and_a_full_directory(run, tmp_path):
    model, tok, _ = load_model(run)
    (tmp_path / "f").write_text("x")
    with pytest.raises(FastformerError, match="exists and is not a directory"):
        export_hf(model, tok, str(tmp_path / "f"))
    with pytest.raises(FastformerError, match="already exists and is not empty"):
        export_hf(model, tok, run)
    with pytest.raises(FastformerError, match="empty path"):
        export_hf(model, tok, "")


# ------------------------------------------------------------------------------------ metrics
@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to tell the metrics file's fsync")
def test_a_failed_metrics_trim_loses_no_line(run, monkeypatch):
    path = os.path.join(run, "metrics.jsonl")
    with open(path, "a") as f:  # lines of steps past the newest checkpoint, left by a run that died
        f.write(json.dumps({"step": 5, "loss": 1.0}) + "\n" + json.dumps({"step": 6, "loss": 1.0}) + "\n")
    before = open(path).read()

    real_fsync = os.fsync

    def fsync(fd):  # the new metrics file cannot be written out (a full disk)
        if "metrics.jsonl.tmp-" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    with pytest.raises(OSError, match="No space") as e:
        Trainer(None, run, resume=True, text=TEXT, verbose=False)
    monkeypatch.undo()
    assert e.value.filename == path and open(path).read() == before
    assert [n for n in os.listdir(run) if ".tmp" in n] == []
    Trainer(None, run, resume=True, text=TEXT, verbose=False).close()
    assert [json.loads(line)["step"] for line in open(path)] == [1, 2, 3, 4]


def test_a_prune_not_done_is_finished_at_the_next_start(run):
    """A run killed after writing a checkpoint and before pruning holds one too many."""
    Trainer(tiny_config(max_steps=4, checkpoint_interval=2, keep_checkpoints=1), run, resume=True, text=TEXT,
            verbose=False).close()
    assert [os.path.basename(d) for d in checkpoint_dirs(run)] == ["ckpt-000004"]
    assert sorted(os.listdir(run)) == [".lock", "ckpt-000004", "config.yaml", "metrics.jsonl"]
