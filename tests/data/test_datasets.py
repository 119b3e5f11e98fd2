"""Dataset downloaders without the network: urlopen is replaced, so these tests never go online."""

import hashlib
import io
import urllib.error
import urllib.request

import pytest

from fastformer.cli import main
from fastformer.data import datasets
from fastformer.errors import FastformerError

TEXT = b"First Citizen:\nBefore we proceed any further, hear me speak.\n" * 20


class FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@pytest.fixture
def fake_shakespeare(monkeypatch):
    """tinyshakespeare pointing at TEXT, with its true size and SHA-256; counts the fetches."""
    calls = []

    def urlopen(url, timeout):
        calls.append((url, timeout))
        return FakeResponse(TEXT)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    monkeypatch.setitem(datasets.DATASETS, "tinyshakespeare",
                        [("train", "https://example.invalid/input.txt", "input.txt", len(TEXT),
                          hashlib.sha256(TEXT).hexdigest())])
    return calls


def test_offline_fails_with_one_clear_line(monkeypatch, tmp_path, capsys):
    def offline(url, timeout):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    assert main(["prepare", "--dataset", "tinyshakespeare", "--cache-dir", str(tmp_path / "cache"),
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot download https://" in err and "is the machine offline?" in err
    assert not list((tmp_path / "cache").rglob("*.part"))  # no half-written file left


def test_download_verifies_and_caches(fake_shakespeare, tmp_path, capsys):
    args = ["prepare", "--dataset", "tinyshakespeare", "--cache-dir", str(tmp_path / "cache"), "--out"]
    assert main(args + [str(tmp_path / "a")]) == 0
    assert "training and" in capsys.readouterr().out
    assert (tmp_path / "cache" / "tinyshakespeare" / "input.txt").read_bytes() == TEXT
    assert main(args + [str(tmp_path / "b")]) == 0  # served from the cache
    assert len(fake_shakespeare) == 1 and fake_shakespeare[0][1] == datasets.TIMEOUT
    assert main(["prepare", "--dataset", "wikitext", "--out", str(tmp_path / "c")]) == 2
    assert "unknown dataset 'wikitext': valid datasets are tinyshakespeare, tinystories" in capsys.readouterr().err


def test_checksum_mismatch_is_refused(fake_shakespeare, monkeypatch, tmp_path):
    monkeypatch.setitem(datasets.DATASETS, "tinyshakespeare",
                        [("train", "https://example.invalid/input.txt", "input.txt", len(TEXT), "0" * 64)])
    with pytest.raises(FastformerError, match="does not match its checksum"):
        datasets.fetch_dataset("tinyshakespeare", str(tmp_path))
    assert list(tmp_path.rglob("input.txt*")) == []  # the bad download is deleted


def test_unknown_checksum_is_recorded_on_first_download(fake_shakespeare, tmp_path):
    path = str(tmp_path / "file.txt")
    datasets.download("https://example.invalid/x", path)
    record = (tmp_path / "file.txt.sha256").read_text().split()
    assert record == [str(len(TEXT)), hashlib.sha256(TEXT).hexdigest()]
    (tmp_path / "file.txt").write_bytes(TEXT[:-1])  # later altered: caught against the record
    with pytest.raises(FastformerError, match="cached file .* does not match its checksum"):
        datasets.download("https://example.invalid/x", path)


def test_a_download_never_writes_through_a_planted_temporary_name(fake_shakespeare, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    target = tmp_path / "cache" / "tinyshakespeare" / "input.txt"
    target.parent.mkdir(parents=True)
    (target.parent / "input.txt.part").symlink_to(victim)  # the fixed temporary name of older fastformers
    datasets.download("https://example.invalid/input.txt", str(target), len(TEXT), hashlib.sha256(TEXT).hexdigest())
    assert target.read_bytes() == TEXT and not target.is_symlink()
    assert victim.read_text() == "precious\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["input.txt", "input.txt.part"]
