"""Prepared corpora: text encoded once into flat token files that training memory-maps.

    fastformer prepare --data a.txt b.txt --tokenizer tok/ --out data/ts   # writes:

    data/ts/train.bin      the training tokens, one flat array (uint16 when the vocabulary has at
    data/ts/val.bin        most 65,536 ids, else uint32), native little-endian, no header
    data/ts/tokenizer.json a copy of the tokenizer that made them
    data/ts/meta.json      dtype, vocab_size, per split: token count, UTF-8 byte count, SHA-256;
                           the source files with their sizes and SHA-256

Files are read in blocks (1 MiB by default) and never whole, so a corpus larger than memory
works. Each file is encoded on its own and the ids are appended in order (nothing is inserted
between files). A block is cut only just before a newline that is followed by a non-space
character: GPT-2's pre-tokenizer always starts a new piece there, so byte-level BPE gives
exactly the ids of encoding the whole file at once (the byte and char tokenizers are exact at any
cut). The pieces of a block go to `encode_batch`, which the BPE library runs in parallel. Only a
file with no such newline for 64 blocks is cut at any newline, where a whitespace run spanning
the cut may be split differently.

The validation split is either separate files (`val_files`) or the last `val_fraction` of the
bytes (cut at the first piece boundary past the mark). All files are written under temporary
names and renamed into place, `meta.json` last: a directory with a meta.json is complete. Over an
earlier prepared directory, its meta.json is removed only once the new token files are complete
(a refused input leaves it usable); temporaries a killed prepare left are removed at the start.
"""

import hashlib
import os
import re
import sys

import numpy as np
from tqdm import tqdm

from fastformer.atomic import AtomicFile, remove_stale_temps, write_json_atomic
from fastformer.data.tokenizer import TOKENIZER_FILE, load_tokenizer
from fastformer.errors import FastformerError, check_bool, check_fields, check_int, load_json

META_FILE = "meta.json"
FORMAT = "fastformer-tokens"
VERSION = 1
SPLITS = ("train", "val")
_TEMPS = r"(train|val)\.bin|meta\.json|tokenizer\.json"  # the targets of a prepared directory's temporaries
_CUT = re.compile(r"(?=\n\S)")  # a cut before a newline that a non-space character follows


def token_dtype(vocab_size):
    """uint16 when every id fits in 16 bits, else uint32."""
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def _text_pieces(path, block_bytes, sha):
    """Yield lists of text pieces of the UTF-8 file `path`, in order, each list ending at a cut
    (see the module docstring). Updates the hashlib object `sha` with the raw bytes."""
    carry, pending, offset = "", b"", 0
    with open(path, "rb") as f:
        while True:
            block = f.read(block_bytes)
            sha.update(block)
            data = pending + block
            if block:
                end = data.rfind(b"\n") + 1  # decode whole lines only: never half a character
                if end == 0:
                    pending = data
                    continue
                head, pending = data[:end], data[end:]
            else:
                head, pending = data, b""
            try:
                text = carry + head.decode("utf-8")
            except UnicodeDecodeError as e:
                raise FastformerError(f"data file {path!r} is not UTF-8 text "
                                      f"(byte {offset + e.start}: {e.reason})") from None
            offset += len(head)
            if not block:
                if text:
                    yield [text]
                return
            pieces = _CUT.split(text)
            carry = pieces.pop()  # what follows its last newline is not known yet
            if not pieces and len(carry) > 64 * block_bytes:
                cut = carry.rfind("\n")
                pieces, carry = [carry[:cut]], carry[cut:]
            if pieces:
                yield pieces


def _encode(tokenizer, pieces):
    """One id array for a list of text pieces (the BPE library encodes them in parallel)."""
    if hasattr(tokenizer, "encode_batch"):
        parts = tokenizer.encode_batch(pieces)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return tokenizer.encode("".join(pieces))


class _SplitWriter:
    """Appends ids to a temporary beside DIR/<split>.bin, counting tokens and bytes and hashing the file."""

    def __init__(self, out_dir, split, dtype):
        self.path = os.path.join(out_dir, f"{split}.bin")
        self.out = AtomicFile(self.path, "wb")  # a fresh temporary beside it (fastformer.atomic)
        self.dtype, self.tokens, self.bytes, self.sha = dtype, 0, 0, hashlib.sha256()

    def write(self, ids, n_bytes):
        raw = np.ascontiguousarray(ids, dtype=self.dtype).tobytes()
        self.out.file.write(raw)
        self.sha.update(raw)
        self.tokens += len(ids)
        self.bytes += n_bytes

    def abort(self):
        self.out.discard()

    def close(self):
        self.out.commit()
        return {"file": os.path.basename(self.path), "tokens": self.tokens, "bytes": self.bytes,
                "sha256": self.sha.hexdigest()}


def _check_files(files, what):
    files = [os.fspath(f) for f in ([files] if isinstance(files, (str, os.PathLike)) else files)]
    if not files:
        raise FastformerError(f"no {what} files given")
    for f in files:
        if not os.path.isfile(f):
            raise FastformerError(f"{what} file {f!r} does not exist (pass UTF-8 text files)")
    return files


def prepare(files, tokenizer, out_dir, val_fraction=0.1, val_files=None, block_bytes=1 << 20, progress=True):
    """Encode text files into OUT/train.bin and OUT/val.bin (see the module docstring).

    Args:
        files: UTF-8 text files, encoded in order into the training split (and, without
            val_files, the validation split: their last `val_fraction` of bytes).
        tokenizer: any fastformer tokenizer; a copy is saved in out_dir.
        val_files: text files for the validation split; then val_fraction is not used.
    Returns the meta dict written to OUT/meta.json.
    """
    files = _check_files(files, "data")
    val_files = _check_files(val_files, "validation data") if val_files else []
    if not val_files and not (isinstance(val_fraction, (int, float)) and 0.0 < val_fraction < 1.0):
        raise FastformerError(f"--val-fraction must lie in (0, 1), got {val_fraction!r} (or give --val-data files)")
    check_int("block_bytes", block_bytes)
    check_bool("progress", progress)
    os.makedirs(out_dir, exist_ok=True)
    remove_stale_temps(out_dir, _TEMPS)  # what a killed prepare left
    meta_path = os.path.join(out_dir, META_FILE)
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {s: _SplitWriter(out_dir, s, dtype) for s in SPLITS}
    jobs = [(f, "train") for f in files] + [(f, "val") for f in val_files]
    total = sum(os.path.getsize(f) for f, _ in jobs)
    val_start = None if val_files else total - round(total * val_fraction)  # byte mark of the val split
    sources, done = [], 0
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="prepare", dynamic_ncols=True,
               disable=not (progress and sys.stderr.isatty()))
    try:
        for path, split in jobs:
            sha, first = hashlib.sha256(), done
            for pieces in _text_pieces(path, block_bytes, sha):
                sizes = [len(p.encode("utf-8")) for p in pieces]
                if val_start is not None and split == "train" and done + sum(sizes) > val_start:
                    # this block holds the mark: the pieces from the one that crosses it go to val
                    k = np.searchsorted(np.cumsum(sizes) + done, val_start, side="right").item()
                    if k:
                        writers["train"].write(_encode(tokenizer, pieces[:k]), sum(sizes[:k]))
                    done += sum(sizes[:k])
                    bar.update(sum(sizes[:k]))
                    pieces, sizes, split = pieces[k:], sizes[k:], "val"
                writers[split].write(_encode(tokenizer, pieces), sum(sizes))
                done += sum(sizes)
                bar.update(sum(sizes))
            if val_start is not None:  # which splits this file's bytes went to
                split = "train" if done <= val_start else "val" if first >= val_start else "train+val"
            sources.append({"path": os.path.abspath(path), "bytes": os.path.getsize(path),
                            "sha256": sha.hexdigest(), "split": split})
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        bar.close()
    try:  # the new splits are complete: check them, then replace the old directory's files, meta.json first
        for s in SPLITS:
            if writers[s].tokens == 0:
                raise FastformerError(f"the {s} split of {out_dir!r} came out empty: give more text"
                                      f"{' or a larger --val-fraction' if s == 'val' and not val_files else ''}")
        if os.path.lexists(meta_path):
            os.remove(meta_path)  # the directory is incomplete until the new meta.json lands
        splits = {}
        for s, w in writers.items():
            splits[s] = w.close()
    except BaseException:
        for w in writers.values():
            w.abort()  # a temporary not committed yet (a committed one is gone already)
        raise
    tokenizer.save(out_dir)
    meta = {"format": FORMAT, "version": VERSION, "dtype": np.dtype(dtype).name,
            "vocab_size": tokenizer.vocab_size, "tokenizer_kind": tokenizer.kind, "tokenizer": TOKENIZER_FILE,
            "val_fraction": None if val_files else val_fraction, "splits": splits, "sources": sources}
    write_json_atomic(meta, meta_path)
    return meta


class PreparedData:
    """A prepared directory opened for reading: `tokenizer`, `meta`, and `train`/`val` as
    read-only np.memmap token arrays."""

    def __init__(self, directory, tokenizer, meta, train, val):
        self.directory, self.tokenizer, self.meta, self.train, self.val = directory, tokenizer, meta, train, val

    @property
    def fingerprint(self):
        """SHA-256 of the two token files' recorded hashes: changes whenever the tokens do."""
        s = self.meta["splits"]
        return hashlib.sha256((s["train"]["sha256"] + s["val"]["sha256"]).encode()).hexdigest()


def is_prepared_dir(path):
    """True when `path` is a directory (which must then be a prepared one)."""
    return path is not None and os.path.isdir(path)


def load_prepared(directory):
    """Open a prepared directory: checks meta.json, the tokenizer and each token file's size.
    (The token files' SHA-256 are recorded, not re-checked: hashing gigabytes at every start
    would cost more than training a small model.)"""
    meta_path = os.path.join(directory, META_FILE)
    if not os.path.isfile(meta_path):
        raise FastformerError(f"{directory!r} is not a prepared data directory: no {META_FILE} (make one with "
                              f"fastformer prepare, or pass a UTF-8 text file)")
    meta = check_fields(meta_path, load_json(meta_path, "prepared-data file"), {"splits": dict})
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise FastformerError(f"{meta_path} has format {meta.get('format')!r} version {meta.get('version')!r}; "
                              f"this fastformer reads {FORMAT!r} version {VERSION}")
    check_fields(meta_path, meta, {"dtype": str, "vocab_size": int})
    if meta["dtype"] not in ("uint16", "uint32"):
        raise FastformerError(f"{meta_path}: dtype {meta['dtype']!r} is not allowed (uint16 or uint32)")
    dtype, vocab_size = np.dtype(meta["dtype"]), meta["vocab_size"]
    counts = {s: check_fields(f"{meta_path} split {s!r}", meta["splits"].get(s), {"tokens": int})["tokens"]
              for s in SPLITS}
    tokenizer = load_tokenizer(directory)
    if tokenizer.vocab_size != vocab_size:
        raise FastformerError(f"{meta_path} says vocab_size={vocab_size} but its {TOKENIZER_FILE} has "
                              f"{tokenizer.vocab_size} ids: the directory is inconsistent, prepare it again")
    arrays = {}
    for s in SPLITS:
        path = os.path.join(directory, f"{s}.bin")
        want = counts[s] * dtype.itemsize
        if counts[s] < 1:
            raise FastformerError(f"{meta_path}: the {s} split holds {counts[s]} tokens; prepare more text")
        if not os.path.isfile(path) or os.path.getsize(path) != want:
            have = os.path.getsize(path) if os.path.isfile(path) else "no file"
            raise FastformerError(f"token file {path} should hold {counts[s]} {dtype.name} tokens ({want} bytes), "
                                  f"found {have}: prepare the directory again")
        arrays[s] = np.memmap(path, dtype=dtype, mode="r", shape=(counts[s],))
    return PreparedData(directory, tokenizer, meta, arrays["train"], arrays["val"])
