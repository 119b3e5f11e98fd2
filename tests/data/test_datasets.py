"""Dataset downloaders without the network: the files are served by an HTTP server on the loopback
interface (or a port nothing listens on), so these tests never go online. The downloads run through
pooch, the `datasets` extra; without it they skip, and the refusal that names it is tested."""

import hashlib
import http.server
import importlib.util
import sys
import threading

import pytest

from fastformer.cli import main
from fastformer.data import datasets
from fastformer.errors import FastformerError

TEXT = b"First Citizen:\nBefore we proceed any further, hear me speak.\n" * 20
SHA = hashlib.sha256(TEXT).hexdigest()
needs_pooch = pytest.mark.skipif(importlib.util.find_spec("pooch") is None,
                                 reason='pooch is not installed (pip install "fastformer[datasets]")')


class Server:
    """Serves TEXT at every path; `fail` answers the next requests with these status codes first."""

    def __init__(self):
        self.requests, self.fail = [], []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                if server.fail:
                    self.send_error(server.fail.pop(0))
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(TEXT)))
                self.end_headers()
                self.wfile.write(TEXT)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    """tinyshakespeare served from the loopback with TEXT's size and SHA-256; no retries (a test
    that wants them sets datasets.RETRIES)."""
    s = Server()
    monkeypatch.setattr(datasets, "RETRIES", 0)
    monkeypatch.setitem(datasets.DATASETS, "tinyshakespeare",
                        [("train", s.url + "/input.txt", "input.txt", len(TEXT), SHA)])
    yield s
    s.close()


@needs_pooch
def test_offline_fails_with_one_clear_line_naming_the_url_and_the_cause(monkeypatch, tmp_path, capsys):
    url = "http://127.0.0.1:9/input.txt"  # the discard port: nothing listens, the connection is refused
    monkeypatch.setattr(datasets, "RETRIES", 0)
    monkeypatch.setitem(datasets.DATASETS, "tinyshakespeare", [("train", url, "input.txt", len(TEXT), SHA)])
    assert main(["prepare", "--dataset", "tinyshakespeare", "--cache-dir", str(tmp_path / "cache"),
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"cannot download {url} (Connection refused): is the machine offline?" in err
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]  # no partial file left
    assert not (tmp_path / "out").exists()


@needs_pooch
def test_an_http_error_is_one_line_and_leaves_nothing(server, tmp_path, capsys):
    server.fail = [404]
    assert main(["prepare", "--dataset", "tinyshakespeare", "--cache-dir", str(tmp_path / "cache"),
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot download {server.url}/input.txt (404 Client Error" in err, err
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


@needs_pooch
def test_download_verifies_and_caches(server, tmp_path, capsys):
    args = ["prepare", "--dataset", "tinyshakespeare", "--cache-dir", str(tmp_path / "cache"), "--out"]
    assert main(args + [str(tmp_path / "a")]) == 0
    assert "training and" in capsys.readouterr().out
    assert (tmp_path / "cache" / "tinyshakespeare" / "input.txt").read_bytes() == TEXT
    assert main(args + [str(tmp_path / "b")]) == 0  # served from the cache
    assert server.requests == ["/input.txt"]
    assert sorted(p.name for p in (tmp_path / "cache" / "tinyshakespeare").iterdir()) == ["input.txt"]
    assert main(["prepare", "--dataset", "wikitext", "--out", str(tmp_path / "c")]) == 2
    assert "unknown dataset 'wikitext': valid datasets are tinyshakespeare, tinystories" in capsys.readouterr().err


@needs_pooch
def test_a_failed_download_is_tried_again(server, monkeypatch, tmp_path):
    monkeypatch.setattr(datasets, "RETRIES", 1)
    server.fail = [503]
    path = datasets.fetch_dataset("tinyshakespeare", str(tmp_path))[0][0]
    assert server.requests == ["/input.txt"] * 2
    with open(path, "rb") as f:
        assert f.read() == TEXT


@needs_pooch
def test_checksum_mismatch_is_refused(server, monkeypatch, tmp_path):
    monkeypatch.setitem(datasets.DATASETS, "tinyshakespeare",
                        [("train", server.url + "/input.txt", "input.txt", len(TEXT), "0" * 64)])
    with pytest.raises(FastformerError, match=f"does not match its checksum: got sha256 {SHA}; expected sha256 0+$"):
        datasets.fetch_dataset("tinyshakespeare", str(tmp_path))
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # the bad download is deleted


@needs_pooch
def test_unknown_checksum_is_recorded_on_first_download(server, tmp_path):
    path = str(tmp_path / "file.txt")
    datasets.download(server.url + "/x", path)
    record = (tmp_path / "file.txt.sha256").read_text().split()
    assert record == [str(len(TEXT)), SHA]
    (tmp_path / "file.txt").write_bytes(TEXT[:-1])  # later altered: caught against the record
    with pytest.raises(FastformerError, match="cached file .* does not match its checksum"):
        datasets.download(server.url + "/x", path)
    assert server.requests == ["/x"]


@needs_pooch
def test_a_download_shows_a_progress_bar_on_a_terminal(server, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    datasets.fetch_dataset("tinyshakespeare", str(tmp_path))
    err = capsys.readouterr().err
    assert "input.txt: 100%" in err and f"{len(TEXT) / 1024:.2f}k/{len(TEXT) / 1024:.2f}k" in err, err


@needs_pooch
def test_a_download_never_writes_through_a_planted_temporary_name(server, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    target = tmp_path / "cache" / "tinyshakespeare" / "input.txt"
    target.parent.mkdir(parents=True)
    (target.parent / "input.txt.part").symlink_to(victim)  # the fixed temporary name of older fastformers
    datasets.download(server.url + "/input.txt", str(target), len(TEXT), SHA)
    assert target.read_bytes() == TEXT and not target.is_symlink()
    assert victim.read_text() == "precious\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["input.txt", "input.txt.part"]


def test_without_pooch_a_download_is_one_line_and_a_cached_file_still_serves(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "pooch", None)  # import pooch raises ImportError
    monkeypatch.setitem(datasets.DATASETS, "tinyshakespeare",
                        [("train", "http://127.0.0.1:9/input.txt", "input.txt", len(TEXT), SHA)])
    args = ["prepare", "--dataset", "tinyshakespeare", "--cache-dir", str(tmp_path / "cache"), "--out"]
    assert main(args + [str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs pooch" in err and 'pip install "fastformer[datasets]"' in err, err
    (tmp_path / "cache" / "tinyshakespeare").mkdir(parents=True)
    (tmp_path / "cache" / "tinyshakespeare" / "input.txt").write_bytes(TEXT)  # fetched before: checked, used
    assert main(args + [str(tmp_path / "b")]) == 0
