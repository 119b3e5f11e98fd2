"""Optional downloaders for public corpora (`fastformer prepare --dataset NAME`).

Each file is fetched once with urllib into a cache directory (`--cache-dir`, else
$FASTFORMER_CACHE, else ~/.cache/fastformer/datasets), under a fresh temporary name
(fastformer.atomic) that is renamed only after its size and SHA-256 check out. Checksums:

- tinyshakespeare: the char-rnn `input.txt`, 1,115,394 bytes, with its well-known SHA-256.
- tinystories: the TinyStoriesV2-GPT4 train and validation files from the dataset's Hugging Face
  repository. No checksum for them is recorded here, so the first download is trusted and its
  size and SHA-256 are written beside it (`FILE.sha256`); every later use checks the file
  against that record.

Without a network connection the download fails with one message saying so; nothing is fetched
at any other time (tokenizers and training never download).
"""

import hashlib
import os
import urllib.error
import urllib.request

from fastformer.atomic import AtomicFile, atomic_open
from fastformer.errors import FastformerError

TIMEOUT = 30  # seconds without data before a download gives up

# name -> [(split, url, file name, size in bytes or None, sha256 or None)]
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


def download(url, path, size=None, sha256=None):
    """Fetch `url` to `path` (atomically), check size/SHA-256 when given, and return path.
    A file already at `path` is checked instead of fetched."""
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
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    out = AtomicFile(path, "wb")  # a fresh temporary beside it (fastformer.atomic), never a fixed name
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as r:
            for block in iter(lambda: r.read(1 << 20), b""):
                out.file.write(block)
        out.file.flush()
        _check(out.tmp, size, sha256, f"the download of {url}")
    except (urllib.error.URLError, OSError) as e:  # offline, DNS, refused, timeout, HTTP error
        out.discard()
        reason = getattr(e, "reason", None) or e
        raise FastformerError(f"cannot download {url} ({reason}): is the machine offline? Fetch the file "
                              f"elsewhere and pass it with --data FILE") from None
    except BaseException:
        out.discard()
        raise
    out.commit()
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
