"""Atomic writes: a failure while writing leaves the previous file whole and no temporary behind."""

import json

import pytest

from fastformer.atomic import atomic_open, write_json_atomic
from fastformer.errors import FastformerError


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
