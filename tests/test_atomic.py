"""Atomic writes: a failure while writing leaves the previous file whole and no temporary behind;
temporaries get fresh names (a planted file or symlink is never followed nor deleted), finished
files the umask's modes, and write errors name the target."""

import errno
import json
import os

import pytest

import fastformer.atomic as atomic
from fastformer.atomic import (
    AtomicFile,
    atomic_dir,
    atomic_open,
    remove_dir,
    remove_stale_temps,
    temp_target,
    write_json_atomic,
)
from fastformer.errors import FastformerError


@pytest.fixture
def umask():
    """Set a umask for the test and restore the previous one."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "state.json"
    write_json_atomic({"step": 1}, path)
    with pytest.raises(RuntimeError):
        with atomic_open(path) as f:
            f.write('{"step": 2, "half')
            raise RuntimeError("killed mid-write")
    assert json.loads(path.read_text()) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
    write_json_atomic({"step": 3}, path)
    assert json.loads(path.read_text()) == {"step": 3}


def test_only_whole_file_writes(tmp_path):
    with pytest.raises(FastformerError, match="mode must be one of w, wb, got 'a'"):
        with atomic_open(tmp_path / "log.txt", "a"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_temporaries_are_fresh_names_beside_the_target(tmp_path):
    seen = []
    for _ in range(2):
        with atomic_open(tmp_path / "config.yaml") as f:
            seen += [n for n in os.listdir(tmp_path) if n != "config.yaml"]
            f.write("x")
    assert len(seen) == 2 and seen[0] != seen[1] and all(temp_target(n) == "config.yaml" for n in seen)
    assert temp_target("config.yaml.tmp") is None and temp_target("notes.tmp-abc") is None


@pytest.mark.parametrize("planted", ["config.yaml.tmp", "config.yaml.tmp-aaaaaaaa"])
def test_a_planted_symlink_is_never_followed(tmp_path, planted):
    victim = tmp_path / "victim.txt"
    victim.write_text("victim")
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(victim, run / planted)
    write_json_atomic({"a": 1}, run / "config.yaml")
    assert victim.read_text() == "victim"
    assert not os.path.islink(run / "config.yaml") and json.loads((run / "config.yaml").read_text()) == {"a": 1}
    assert os.path.islink(run / planted)  # not ours: left where it was


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                         (0o002, 0o664, 0o775)])
def test_finished_files_have_the_umask_modes(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    write_json_atomic({}, tmp_path / "a.json")
    assert os.stat(tmp_path / "a.json").st_mode & 0o777 == file_mode
    with atomic_dir(tmp_path / "d") as tmp:
        assert os.stat(tmp).st_mode & 0o777 == 0o700  # private while it is filled
        with open(os.path.join(tmp, "w.bin"), "wb") as f:
            f.write(b"x")
        os.chmod(os.path.join(tmp, "w.bin"), 0o600)  # as safetensors writes its files
        os.mkdir(os.path.join(tmp, "sub"))
    assert os.stat(tmp_path / "d").st_mode & 0o777 == dir_mode
    assert os.stat(tmp_path / "d" / "w.bin").st_mode & 0o777 == file_mode
    assert os.stat(tmp_path / "d" / "sub").st_mode & 0o777 == dir_mode


def test_a_full_disk_names_the_target_and_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    path.write_text("old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full)
    with pytest.raises(OSError, match="No space left") as e:
        write_json_atomic({"step": 2}, path)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["state.json"]


def test_an_error_about_another_file_keeps_its_name(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        with atomic_open(tmp_path / "out.txt") as f:
            f.write(open(tmp_path / "missing.txt").read())
    assert e.value.filename == str(tmp_path / "missing.txt")
    assert os.listdir(tmp_path) == []


def test_atomic_file_commit_and_discard(tmp_path):
    a = AtomicFile(tmp_path / "train.bin")
    a.file.write(b"123")
    a.commit()
    b = AtomicFile(tmp_path / "train.bin")
    b.file.write(b"4")
    b.discard()
    assert (tmp_path / "train.bin").read_bytes() == b"123" and os.listdir(tmp_path) == ["train.bin"]


def test_atomic_dir_replaces_only_when_asked_and_cleans_up_on_failure(tmp_path):
    target = tmp_path / "ckpt-000002"
    with atomic_dir(target) as tmp:
        (tmp_path / tmp / "a").write_text("1")
    with pytest.raises(OSError):  # a non-empty directory is not replaced without replace=True
        with atomic_dir(target) as tmp:
            (tmp_path / tmp / "a").write_text("2")
    with pytest.raises(RuntimeError):
        with atomic_dir(target, replace=True) as tmp:
            (tmp_path / tmp / "a").write_text("3")
            raise RuntimeError("killed")
    assert (target / "a").read_text() == "1" and os.listdir(tmp_path) == ["ckpt-000002"]
    with atomic_dir(target, replace=True) as tmp:
        (tmp_path / tmp / "a").write_text("4")
    assert (target / "a").read_text() == "4" and os.listdir(tmp_path) == ["ckpt-000002"]
    (tmp_path / "empty").mkdir()  # an empty directory may be the target
    with atomic_dir(tmp_path / "empty") as tmp:
        (tmp_path / tmp / "b").write_text("b")
    assert (tmp_path / "empty" / "b").read_text() == "b"


def test_an_empty_path_is_refused():
    with pytest.raises(FileNotFoundError, match="empty path"):
        write_json_atomic({}, "")


def test_remove_dir_cut_short_leaves_only_a_temporary_name(tmp_path, monkeypatch):
    (tmp_path / "ckpt-000002").mkdir()
    (tmp_path / "ckpt-000002" / "state.json").write_text("{}")

    def killed(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        remove_dir(tmp_path / "ckpt-000002")
    monkeypatch.undo()
    [left] = os.listdir(tmp_path)
    assert temp_target(left) == "ckpt-000002"
    assert remove_stale_temps(tmp_path, r"ckpt-\d+") == [left] and os.listdir(tmp_path) == []


def test_remove_stale_temps_removes_only_its_own_names(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    run = tmp_path / "run"
    run.mkdir()
    (run / "ckpt-000004.tmp-abcd1234").mkdir()
    (run / "ckpt-000004.tmp-abcd1234" / "model.safetensors").write_bytes(b"half")
    (run / "config.yaml.tmp-0123abcd").write_text("half")
    mine = {"ckpt-000004.tmp-abcd1234", "config.yaml.tmp-0123abcd"}
    others = {"notes.tmp-abcd1234",  # a target the pattern does not name
              "config.yaml.tmp",  # not a fresh name
              "ckpt-000005.tmp-short",  # not 8 characters
              "ckpt-000006.tmp-linkedxx"}  # a symlink: never followed, never removed
    (run / "notes.tmp-abcd1234").write_text("n")
    (run / "config.yaml.tmp").write_text("n")
    (run / "ckpt-000005.tmp-short").mkdir()
    os.symlink(outside, run / "ckpt-000006.tmp-linkedxx")
    assert set(remove_stale_temps(run, r"ckpt-\d+|config\.yaml")) == mine
    assert set(os.listdir(run)) == others and os.listdir(outside) == ["keep.txt"]
