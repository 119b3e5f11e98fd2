"""Tokenizers: text <-> integer ids, saved to and loaded from a directory as JSON.

The byte tokenizer maps every UTF-8 byte to its own id (0..255) and adds three special ids,
so any text round-trips exactly and no vocabulary has to be learnt:

    ids 0..255   the bytes of the UTF-8 encoding
    256 <pad>    257 <bos>    258 <eos>

Every tokenizer has the same small interface -- `encode`, `decode`, `vocab_size`, `pad_id`,
`bos_id`, `eos_id`, `save(dir)` -- and writes a `tokenizer.json` whose "kind" field tells
`load_tokenizer` which class reads it back, so other kinds (char, word, BPE) slot in beside it.
"""

import json
import os

import numpy as np

TOKENIZER_FILE = "tokenizer.json"


class ByteTokenizer:
    """Lossless byte-level tokenizer: 256 byte ids plus <pad>, <bos>, <eos>."""

    kind = "byte"
    pad_id, bos_id, eos_id = 256, 257, 258
    vocab_size = 259
    special_tokens = {"<pad>": 256, "<bos>": 257, "<eos>": 258}

    def encode(self, text, bos=False, eos=False):
        """ids (int64, 1-D) of the UTF-8 bytes of `text`, optionally framed by <bos>/<eos>."""
        if not isinstance(text, str):
            raise ValueError(f"encode needs a str, got {type(text).__name__}")
        ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
        if bos or eos:
            ids = np.concatenate([[self.bos_id] * bos, ids, [self.eos_id] * eos]).astype(np.int64)
        return ids

    def decode(self, ids, errors="replace"):
        """Text of the byte ids in `ids`; special ids are dropped. Bytes that are not valid
        UTF-8 (a sequence cut in the middle of a character) become U+FFFD unless errors="strict"."""
        ids = np.asarray(ids).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = ids[(ids < 0) | (ids >= self.vocab_size)][0]
            raise ValueError(f"token id {bad} is outside the byte tokenizer's vocabulary [0, {self.vocab_size})")
        return bytes(ids[ids < 256].astype(np.uint8).tolist()).decode("utf-8", errors=errors)

    def to_dict(self):
        return {"kind": self.kind, "vocab_size": self.vocab_size, "special_tokens": self.special_tokens}

    def save(self, directory):
        """Write `directory/tokenizer.json` (atomically: temp file then rename)."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, TOKENIZER_FILE)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def from_dict(cls, d):
        if d.get("vocab_size") != cls.vocab_size:
            raise ValueError(f"byte tokenizer file says vocab_size={d.get('vocab_size')!r}, expected {cls.vocab_size}")
        return cls()


# kind -> class; a new tokenizer kind adds one entry here
TOKENIZER_KINDS = {"byte": ByteTokenizer}


def load_tokenizer(directory):
    """The tokenizer saved in `directory/tokenizer.json`, of whichever kind it records."""
    path = os.path.join(directory, TOKENIZER_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"no tokenizer at {path}: expected a {TOKENIZER_FILE} written by tokenizer.save()")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"tokenizer file {path} is corrupt or truncated: {e}") from None
    kind = d.get("kind") if isinstance(d, dict) else None
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"tokenizer file {path} has kind {kind!r}; known kinds are {sorted(TOKENIZER_KINDS)}")
    return TOKENIZER_KINDS[kind].from_dict(d)
