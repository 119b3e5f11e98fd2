"""Optional downloaders for public corpora (`fastformer prepare --dataset NAME`).

Each file is fetched once by pooch (`pip install pooch`, or the `datasets` extra; imported only
when a file has to be downloaded) into a cache directory (`--cache-dir`, else $FASTFORMER_CACHE,
else ~/.cache/fastformer/datasets): streamed into a temporary file beside its target, checked
against its SHA-256 when one is known, renamed over the target only then, and tried again
`RETRIES` times when the connection or the checksum fails. A progress bar (tqdm) shows each
download when stderr is a terminal. Checksums:

- tinyshakespeare: the char-rnn `input.txt`, 1,115,394 bytes, with its well-known SHA-256.
- tinystories: the TinyStoriesV2-GPT4 train and validation files from the dataset's Hugging Face
  repository. No size or checksum for them is recorded here (see `DATASETS`), so the first
  download is trusted and its size and SHA-256 are written beside it (`FILE.sha256`); every later
  use checks the file against that record.

Without a network connection the download fails with one line naming the URL and the cause;
nothing is fetched at any other time (tokenizers and training never download).
"""

import contextlib
import hashlib
import logging
import os
import re
import sys

from fastformer.atomic import atomic_open
from fastformer.errors import FastformerError, printable

TIMEOUT = 30  # seconds without data before a download attempt gives up
RETRIES = 2  # a download that fails (connection, HTTP error, checksum) is tried again this often, 1 s, 2 s apart
CHUNK = 1 << 20  # bytes per write of a download

# name -> [(split, url, file name, size in bytes or None, sha256 or None)]. None: not known where this
# table was written (the TinyStories files could not be fetched there to measure them); such a file is
# trusted on its first download and checked against the record of it (FILE.sha256) from then on.
# Put a file's size and SHA-256 here once they are known, and every download is checked against them.
DATASETS = {
    "tinyshakespeare": [
        ("train", "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
         "tinyshakespeare.txt", 1115394, "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
    ],
    "tinystories": [
        ("train", "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-train.txt",
         "TinyStoriesV2-GPT4-train.txt", None, None),
        ("val", "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-valid.txt",
         "TinyStoriesV2-GPT4-valid.txt", None, None),
    ],
}


def cache_dir(path=None):
    return path or os.environ.get("FASTFORMER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                      "fastformer", "datasets")


def _file_digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return os.path.getsize(path), h.hexdigest()


def _check(path, size, sha256, source):
    got_size, got_sha = _file_digest(path)
    if (size is not None and got_size != size) or (sha256 is not None and got_sha != sha256):
        raise FastformerError(f"{source} does not match its checksum: got {got_size} bytes, sha256 {got_sha}; "
                              f"expected {size} bytes, sha256 {sha256}")


def _import_pooch():
    try:
        import pooch
    except ImportError:
        raise FastformerError('downloading a dataset needs pooch, which is not installed: pip install pooch (or '
                              'pip install "fastformer[datasets]"), or fetch the file elsewhere and pass it with '
                              '--data FILE') from None
    return pooch


@contextlib.contextmanager
def _quiet(logger):
    """pooch says what it downloads at INFO on stderr; fastformer's progress bar says it instead."""
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _cause(e):
    """The reason at the bottom of a requests/urllib3 error, e.g. 'Connection refused'."""
    text = str(e)
    m = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    return m.group(1).strip() if m else " ".join(text.split())[:300]


def _fsync(path):
    for p, flags in ((path, os.O_RDONLY), (os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)):
        fd = os.open(p, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class _Progress:
    """The tqdm bar of one download, as pooch drives a progress bar (`total`, `update`, `reset`,
    `close`); a tqdm is false while its total is 0 and would not be driven at all."""

    def __init__(self, name):
        from tqdm import tqdm

        self.bar = tqdm(desc=name, unit="B", unit_scale=True, unit_divisor=1024, dynamic_ncols=True,
                        disable=not sys.stderr.isatty())

    total = property(lambda self: self.bar.total)

    @total.setter
    def total(self, n):  # the Content-Length, 0 when the server does not say
        self.bar.total = n or None

    def update(self, n):
        self.bar.update(n)

    def reset(self):
        self.bar.reset(self.bar.total)

    def close(self):
        self.bar.close()


def _fetch(url, path, sha256):
    """Download `url` to `path` with pooch (temporary beside it, SHA-256 checked when given, renamed)."""
    pooch = _import_pooch()
    import requests  # pooch's own dependency

    directory, name = os.path.split(os.path.abspath(path))
    store = pooch.create(path=directory, base_url="", registry={name: sha256 and f"sha256:{sha256}"},
                         urls={name: url}, retry_if_failed=RETRIES)
    bar = _Progress(name)
    try:
        with _quiet(pooch.get_logger()):
            store.fetch(name, downloader=pooch.HTTPDownloader(progressbar=bar, chunk_size=CHUNK, timeout=TIMEOUT))
    except requests.exceptions.HTTPError as e:  # the server answered, with an error
        raise FastformerError(printable(f"cannot download {url} ({_cause(e)}): fetch the file elsewhere and pass "
                                        f"it with --data FILE")) from None
    except requests.exceptions.RequestException as e:  # offline, DNS, refused, timeout
        raise FastformerError(printable(f"cannot download {url} ({_cause(e)}): is the machine offline? Fetch the "
                                        f"file elsewhere and pass it with --data FILE")) from None
    except ValueError as e:  # pooch's checksum mismatch; the download was deleted
        got = re.search(r"got ([0-9a-f]{64})", str(e))
        raise FastformerError(f"the download of {url} does not match its checksum: got sha256 "
                              f"{got.group(1) if got else 'another'}; expected sha256 {sha256}") from None
    finally:
        bar.close()
    _fsync(path)


def download(url, path, size=None, sha256=None):
    """Fetch `url` to `path` (atomically), check size/SHA-256 when given, and return path.
    A file already at `path` is checked instead of fetched: against `size`/`sha256`, or when
    they are None against the record of its first download (`path.sha256`)."""
    record = path + ".sha256"  # trust-on-first-use record for files without a known checksum
    if os.path.isfile(path):
        if sha256 is None and os.path.isfile(record):
            with open(record) as f:
                fields = f.read().split()
            if len(fields) != 2 or not fields[0].isdigit():
                raise FastformerError(f"checksum record {record} is corrupt: delete it and {path} to fetch the "
                                      f"file again")
            size, sha256 = int(fields[0]), fields[1]
        _check(path, size, sha256, f"cached file {path} (delete it to fetch it again)")
        return path
    _fetch(url, path, sha256)  # pooch makes the directory
    try:
        _check(path, size, None, f"the download of {url}")  # the size: the SHA-256 was pooch's to check
    except FastformerError:
        os.remove(path)
        raise
    if sha256 is None:
        got_size, got_sha = _file_digest(path)
        with atomic_open(record) as f:
            f.write(f"{got_size} {got_sha}\n")
    return path


def fetch_dataset(name, directory=None):
    """Download a named corpus (if not cached): returns (train_files, val_files); val_files is
    None when the corpus has no validation file (the prepare step splits off a fraction)."""
    if name not in DATASETS:
        raise FastformerError(f"unknown dataset {name!r}: valid datasets are {', '.join(DATASETS)}")
    root = os.path.join(cache_dir(directory), name)
    files = {"train": [], "val": []}
    for split, url, fname, size, sha256 in DATASETS[name]:
        files[split].append(download(url, os.path.join(root, fname), size, sha256))
    return files["train"], files["val"] or None
