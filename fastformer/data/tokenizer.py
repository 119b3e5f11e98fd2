"""Tokenizers: text <-> integer ids, saved to and loaded from a directory as JSON.

Four kinds, one small interface -- `encode(text, bos=False, eos=False)`, `decode(ids)`,
`vocab_size`, `pad_id`, `bos_id`, `eos_id`, `byte_lengths()`, `save(dir)`:

    byte   every UTF-8 byte is its own id (0..255), then 256 <pad>, 257 <bos>, 258 <eos>; any
           text round-trips and nothing is learnt.
    char   one id per character seen in a corpus: 0 <pad>, 1 <bos>, 2 <eos>, 3 <unk>, then the
           characters (in code-point order when learnt from text). A character outside the
           vocabulary encodes as <unk> (and decodes as U+FFFD), so unseen text still encodes.
           The synthetic seq2seq tasks use it over their fixed alphabet.
    word   words and punctuation marks for the encoder-decoder's translation pairs: 0 <pad>,
           1 <bos>, 2 <eos>, 3 <unk>, then the words seen at least `min_freq` times, most
           frequent first; an unseen word encodes as <unk>.
    bpe    byte-level BPE trained with Hugging Face `tokenizers` (fastformer.bpe).

`save(dir)` writes `dir/tokenizer.json`. The byte and char files carry a "kind" field; a BPE
tokenizer is saved as a standard Hugging Face tokenizer.json (no "kind", a "model" object), which
`load_tokenizer` recognises as well.
"""

import os
import re
from collections import Counter

import numpy as np

from fastformer.atomic import write_json_atomic
from fastformer.data.bpe import BPETokenizer
from fastformer.data.checks import check_text, decode_ids, read_text_chunks, text_files
from fastformer.errors import FastformerError, check_bool, check_int, load_json

TOKENIZER_FILE = "tokenizer.json"


class ByteTokenizer:
    """Lossless byte-level tokenizer: 256 byte ids plus <pad>, <bos>, <eos>."""

    kind = "byte"
    pad_id, bos_id, eos_id = 256, 257, 258
    vocab_size = 259
    special_tokens = {"<pad>": 256, "<bos>": 257, "<eos>": 258}

    def encode(self, text, bos=False, eos=False):
        """ids (int64, 1-D) of the UTF-8 bytes of `text`, optionally framed by <bos>/<eos>."""
        bos, eos = check_text(text, bos, eos)
        ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
        if bos or eos:
            ids = np.concatenate([[self.bos_id] * bos, ids, [self.eos_id] * eos]).astype(np.int64)
        return ids

    def decode(self, ids, errors="replace"):
        """Text of the byte ids in `ids`; special ids are dropped. Bytes that are not valid
        UTF-8 (a sequence cut in the middle of a character) become U+FFFD unless errors="strict"."""
        ids = decode_ids(ids, self.vocab_size, "the byte tokenizer's vocabulary")
        return bytes(ids[ids < 256].astype(np.uint8).tolist()).decode("utf-8", errors=errors)

    def byte_lengths(self):
        """(V,) int64: the UTF-8 bytes each id stands for (1 per byte id, 0 per special)."""
        return np.array([1] * 256 + [0] * 3, dtype=np.int64)

    def to_dict(self):
        return {"kind": self.kind, "vocab_size": self.vocab_size, "special_tokens": self.special_tokens}

    def save(self, directory):
        """Write `directory/tokenizer.json` (atomically: temp file then rename)."""
        _write_json(self.to_dict(), directory)

    @classmethod
    def from_dict(cls, d):
        if d.get("vocab_size") != cls.vocab_size:
            raise FastformerError(f"byte tokenizer file says vocab_size={d.get('vocab_size')!r}, "
                                  f"expected {cls.vocab_size}")
        return cls()


class CharTokenizer:
    """Character-level tokenizer with a vocabulary taken from a corpus; unknown characters -> <unk>."""

    kind = "char"
    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3
    special_tokens = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}

    def __init__(self, chars):
        chars = list(chars)
        if not chars or any(not isinstance(c, str) or len(c) != 1 for c in chars) or len(set(chars)) < len(chars):
            raise FastformerError(f"a char tokenizer needs a non-empty list of distinct single characters, "
                                  f"got {chars[:5]!r}...")
        self.chars = chars
        self.vocab_size = len(self.special_tokens) + len(chars)
        self._id = {c: i + len(self.special_tokens) for i, c in enumerate(chars)}
        # code point -> id for the code points below 0x10000 (the rest go through the dict)
        self._table = np.full(0x10000, self.unk_id, dtype=np.int64)
        for c, i in self._id.items():
            if ord(c) < 0x10000:
                self._table[ord(c)] = i

    @classmethod
    def from_text(cls, text):
        """The tokenizer whose vocabulary is every character of `text`."""
        return cls(sorted(set(text)))

    @classmethod
    def train(cls, files, chunk_bytes=1 << 20):
        """The tokenizer whose vocabulary is every character of the UTF-8 text files, read in chunks."""
        chars, files = set(), text_files(files)
        for path in files:
            for chunk in read_text_chunks(path, chunk_bytes):
                chars.update(chunk)
        if not chars:
            raise FastformerError(f"the files {files} hold no text to take characters from")
        return cls(sorted(chars))

    def encode(self, text, bos=False, eos=False):
        """ids (int64, 1-D) of the characters of `text` (<unk> for unseen ones), optionally framed
        by <bos>/<eos>."""
        bos, eos = check_text(text, bos, eos)
        cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)  # code points
        ids = self._table[np.minimum(cps, 0xFFFF)]
        for j in np.flatnonzero(cps >= 0x10000):  # outside the table: look up one by one
            ids[j] = self._id.get(chr(cps[j]), self.unk_id)
        if bos or eos:
            ids = np.concatenate([[self.bos_id] * bos, ids, [self.eos_id] * eos]).astype(np.int64)
        return ids

    def decode(self, ids, errors="replace"):
        """Text of `ids`: <pad>/<bos>/<eos> are dropped, <unk> becomes U+FFFD."""
        ids = decode_ids(ids, self.vocab_size, "the char vocabulary")
        table = ["", "", "", "\ufffd"] + self.chars
        return "".join(table[i] for i in ids.tolist())

    def byte_lengths(self):
        """(V,) int64: UTF-8 bytes per id; 0 for <pad>/<bos>/<eos>, and 1 for <unk> (its
        character is unknown, so bits-per-byte over text with <unk> is approximate)."""
        return np.array([0, 0, 0, 1] + [len(c.encode("utf-8")) for c in self.chars], dtype=np.int64)

    def to_dict(self):
        return {"kind": self.kind, "vocab_size": self.vocab_size, "specials": list(self.special_tokens),
                "lowercase": False, "vocab": self.chars}

    def save(self, directory):
        """Write `directory/tokenizer.json` (atomically: temp file then rename)."""
        _write_json(self.to_dict(), directory)

    @classmethod
    def from_dict(cls, d):
        chars = d.get("vocab")
        if d.get("specials") != list(cls.special_tokens) or not isinstance(chars, list) or not chars:
            raise FastformerError(f"a char tokenizer file needs \"specials\": {list(cls.special_tokens)} and a "
                                  f"non-empty \"vocab\" list")
        if d.get("lowercase"):
            raise FastformerError("\"lowercase\": true is not supported by char tokenizers (lower-case the text "
                                  "itself, e.g. data.lowercase for translation pairs)")
        tok = cls(chars)
        if d.get("vocab_size", tok.vocab_size) != tok.vocab_size:
            raise FastformerError(f"char tokenizer file says vocab_size={d.get('vocab_size')!r}, but its "
                                  f"characters make {tok.vocab_size}")
        return tok


def _write_json(d, directory):
    os.makedirs(directory, exist_ok=True)
    write_json_atomic(d, os.path.join(directory, TOKENIZER_FILE), indent=2, ensure_ascii=False)


class WordTokenizer:
    """Word-level tokenizer with a fixed vocabulary; unknown words map to <unk>.

    Words are runs of letters/digits/underscore, and every other non-space character is a token
    of its own ("l'eau !" -> l ' eau !). `decode` joins tokens with single spaces, so decoded
    text is tokenized text (`normalize` gives a reference the same shape, for BLEU).

    Args:
        words: the vocabulary without the specials (ids 4, 5, ... in this order).
        lowercase: lower-case text before splitting.
    """

    kind = "word"
    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3
    special_tokens = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    _split = re.compile(r"\w+|[^\w\s]").findall

    def __init__(self, words, lowercase=False):
        words = list(words)
        bad = [w for w in words if not isinstance(w, str) or not w]
        dup = [] if bad else [w for w, n in Counter(words).items() if n > 1 or w in self.special_tokens]
        if bad or dup:
            raise FastformerError(f"a word tokenizer's vocabulary must hold distinct non-empty strings and no "
                                  f"specials, got {(bad or dup)[:5]!r}")
        self.words, self.lowercase = words, check_bool("lowercase", lowercase)
        self.vocab_size = len(self.special_tokens) + len(words)
        self._id = {w: i + len(self.special_tokens) for i, w in enumerate(words)}

    @classmethod
    def build(cls, texts, min_freq=1, lowercase=False, max_size=None):
        """The vocabulary of the tokens seen at least `min_freq` times in `texts`, most frequent
        first (ties alphabetical), at most `max_size` of them."""
        check_int("min_freq", min_freq)
        if max_size is not None:
            check_int("max_size", max_size, minimum=0)
        counts = Counter()
        for text in texts:
            check_text(text)
            counts.update(cls._split(text.lower() if lowercase else text))
        vocab = sorted((w for w, n in counts.items() if n >= min_freq and w not in cls.special_tokens),
                       key=lambda w: (-counts[w], w))
        return cls(vocab[:max_size], lowercase=lowercase)

    def tokenize(self, text):
        """The token strings of `text` (before mapping to ids)."""
        check_text(text)
        return self._split(text.lower() if self.lowercase else text)

    def normalize(self, text):
        """`text` as `decode` would write it: tokens joined by single spaces (unknown words kept)."""
        return " ".join(self.tokenize(text))

    def encode(self, text, bos=False, eos=False):
        """ids (int64, 1-D) of the tokens of `text` (<unk> for unseen ones), optionally framed by
        <bos>/<eos>."""
        bos, eos = check_text(text, bos, eos)
        words = self._split(text.lower() if self.lowercase else text)
        ids = [self.bos_id] * bos + [self._id.get(w, self.unk_id) for w in words] + [self.eos_id] * eos
        return np.array(ids, dtype=np.int64)

    def decode(self, ids, errors="replace"):
        """Text of `ids`, tokens joined by spaces; <pad>, <bos>, <eos> and <unk> are skipped."""
        ids = decode_ids(ids, self.vocab_size, "the word vocabulary")
        n = len(self.special_tokens)
        return " ".join(self.words[i - n] for i in ids.tolist() if i >= n)

    def byte_lengths(self):
        """(V,) int64: UTF-8 bytes per id, a word counting one more for the space before it;
        0 for the specials (so bits per byte over text with <unk> is approximate)."""
        return np.array([0] * len(self.special_tokens) + [len(w.encode("utf-8")) + 1 for w in self.words],
                        dtype=np.int64)

    def to_dict(self):
        return {"kind": self.kind, "vocab_size": self.vocab_size, "specials": list(self.special_tokens),
                "lowercase": self.lowercase, "vocab": self.words}

    def save(self, directory):
        """Write `directory/tokenizer.json` (atomically: temp file then rename)."""
        _write_json(self.to_dict(), directory)

    @classmethod
    def from_dict(cls, d):
        words = d.get("vocab")
        if d.get("specials") != list(cls.special_tokens) or not isinstance(words, list):
            raise FastformerError(f"a word tokenizer file needs \"specials\": {list(cls.special_tokens)} and a "
                                  f"\"vocab\" list")
        tok = cls(words, lowercase=d.get("lowercase", False))
        if d.get("vocab_size", tok.vocab_size) != tok.vocab_size:
            raise FastformerError(f"word tokenizer file says vocab_size={d.get('vocab_size')!r}, but its "
                                  f"words make {tok.vocab_size}")
        return tok


# kind -> class with from_dict(d); a new tokenizer kind adds one entry here.
# "bpe" is the kind of a standard Hugging Face tokenizer.json, which has no "kind" field.
TOKENIZER_KINDS = {"byte": ByteTokenizer, "char": CharTokenizer, "word": WordTokenizer, "bpe": BPETokenizer}


def load_tokenizer(directory):
    """The tokenizer saved in `directory/tokenizer.json`, of whichever kind it records."""
    path = os.path.join(directory, TOKENIZER_FILE)
    if not os.path.isfile(path):
        raise FastformerError(f"no tokenizer at {path}: expected a {TOKENIZER_FILE} written by tokenizer.save()")
    d = load_json(path, "tokenizer file")
    if not isinstance(d, dict):
        raise FastformerError(f"tokenizer file {path} holds a {type(d).__name__}, not a JSON object")
    kind = d.get("kind")
    if kind is None and isinstance(d.get("model"), dict):
        kind = "bpe"  # a Hugging Face tokenizer.json
    if not isinstance(kind, str) or kind not in TOKENIZER_KINDS:
        raise FastformerError(f"tokenizer file {path} has kind {kind!r}; known kinds are {sorted(TOKENIZER_KINDS)} "
                              f"(or a Hugging Face tokenizer.json with a \"model\" object)")
    try:
        return TOKENIZER_KINDS[kind].from_dict(d)
    except FastformerError as e:
        raise FastformerError(f"tokenizer file {path}: {e}") from None


def same_tokenizer(a, b):
    """Whether the tokenizers `a` and `b` give every text the same ids: the same kind, size and
    vocabulary (a size alone does not tell two BPE tokenizers apart)."""
    return a.kind == b.kind and a.vocab_size == b.vocab_size and a.to_dict() == b.to_dict()


def make_tokenizer(spec, text=None):
    """The tokenizer a config's `data.tokenizer` names: "byte", "char" (vocabulary from `text`)
    or the path of a directory holding a tokenizer.json."""
    if spec == "byte":
        return ByteTokenizer()
    if spec == "char":
        if not text:
            raise FastformerError("data.tokenizer=char builds its vocabulary from the training text, but there is none")
        return CharTokenizer.from_text(text)
    if isinstance(spec, str) and os.path.isdir(spec):
        return load_tokenizer(spec)
    raise FastformerError(f"data.tokenizer {spec!r} is not known: valid values are byte, char or a directory "
                          f"holding a tokenizer.json (from fastformer tokenizer train)")
