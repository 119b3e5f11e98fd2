"""Vocabulary tokenizers for the encoder-decoder tasks: words, and characters of a fixed alphabet.

Both share the special ids <pad>=0, <bos>=1, <eos>=2, <unk>=3 and the small tokenizer interface
of fastformer (the byte tokenizer has it too): `encode(text) -> list[int]`, `decode(ids) -> str`
(specials skipped), `vocab_size`, `pad_id`, `bos_id`, `eos_id`, `unk_id`, `save(dir)` writing
`dir/tokenizer.json` with a "kind" field, and the classmethod `load(dir)`.

Words are runs of letters/digits/underscore, and every other non-space character is a token of
its own ("l'eau !" -> l ' eau !). `decode` joins words with single spaces, so decoded text is
tokenized text -- what BLEU is computed on.
"""

import json
import os
import re
from collections import Counter

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)
TOKENIZER_FILE = "tokenizer.json"
_WORD_RE = re.compile(r"\w+|[^\w\s]")


class WordTokenizer:
    """Word-level tokenizer with a fixed vocabulary; unknown words map to <unk>.

    Args:
        tokens: the vocabulary without the specials (ids 4, 5, ... in this order).
        lowercase: lower-case text before splitting.
    """

    kind = "word"
    pad_id, bos_id, eos_id, unk_id = PAD_ID, BOS_ID, EOS_ID, UNK_ID

    def __init__(self, tokens, lowercase=False):
        tokens = list(tokens)
        dup = [t for t, n in Counter(tokens).items() if n > 1 or t in SPECIALS]
        if dup:
            raise ValueError(f"tokenizer vocabulary must not repeat entries or hold specials, got {dup[:5]}")
        self.lowercase = bool(lowercase)
        self.itos = list(SPECIALS) + tokens
        self.stoi = {t: i for i, t in enumerate(self.itos)}

    @classmethod
    def build(cls, texts, min_freq=1, lowercase=False, max_size=None):
        """Vocabulary of the tokens seen at least `min_freq` times in `texts`, most frequent
        first (ties alphabetical), at most `max_size` of them."""
        if isinstance(min_freq, bool) or not isinstance(min_freq, int) or min_freq < 1:
            raise ValueError(f"min_freq must be an integer >= 1, got {min_freq!r}")
        counts = Counter()
        for text in texts:
            counts.update(cls._split(cls._norm(text, lowercase)))
        vocab = sorted((t for t, n in counts.items() if n >= min_freq and t not in SPECIALS),
                       key=lambda t: (-counts[t], t))
        return cls(vocab[:max_size], lowercase=lowercase)

    @staticmethod
    def _norm(text, lowercase):
        return text.lower() if lowercase else text

    @staticmethod
    def _split(text):
        return _WORD_RE.findall(text)

    @staticmethod
    def _join(tokens):
        return " ".join(tokens)

    @property
    def vocab_size(self):
        return len(self.itos)

    def tokenize(self, text):
        """The token strings of `text` (before mapping to ids)."""
        return self._split(self._norm(text, self.lowercase))

    def encode(self, text):
        """Token ids of `text`, no <bos>/<eos> added; unknown tokens give unk_id."""
        return [self.stoi.get(t, UNK_ID) for t in self.tokenize(text)]

    def decode(self, ids):
        """Text of `ids`, skipping <pad>, <bos>, <eos> and <unk>."""
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self.itos):
                raise ValueError(f"token id must lie in [0, {len(self.itos)}), got {i}")
            if i >= len(SPECIALS):
                out.append(self.itos[i])
        return self._join(out)

    def save(self, directory):
        """Write `directory/tokenizer.json`; returns its path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, TOKENIZER_FILE)
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"kind": self.kind, "lowercase": self.lowercase, "specials": list(SPECIALS),
                       "vocab": self.itos[len(SPECIALS):]}, f, ensure_ascii=False, indent=0)
        return path

    @classmethod
    def load(cls, directory):
        """Read the tokenizer saved in `directory` by `save`."""
        path = os.path.join(directory, TOKENIZER_FILE)
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ValueError(f"no tokenizer file {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"tokenizer file {path} is not valid JSON: {e}") from None
        if not isinstance(d, dict) or d.get("kind") != cls.kind:
            raise ValueError(f"tokenizer file {path} holds kind {d.get('kind') if isinstance(d, dict) else None!r}, "
                             f"expected {cls.kind!r}")
        if d.get("specials") != list(SPECIALS) or not isinstance(d.get("vocab"), list):
            raise ValueError(f"tokenizer file {path} needs specials {list(SPECIALS)} and a vocab list")
        return cls(d["vocab"], lowercase=d.get("lowercase", False))


class CharTokenizer(WordTokenizer):
    """Character-level tokenizer over a fixed alphabet (the synthetic copy/reverse/sort tasks):
    one id per character, characters outside the alphabet map to <unk>; decode joins without
    spaces."""

    kind = "char"

    def __init__(self, alphabet, lowercase=False):
        super().__init__(list(alphabet), lowercase=lowercase)

    @staticmethod
    def _split(text):
        return list(text)

    @staticmethod
    def _join(tokens):
        return "".join(tokens)


def load_tokenizer(directory):
    """The word or char tokenizer saved in `directory`, by the file's "kind"."""
    path = os.path.join(directory, TOKENIZER_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            kind = json.load(f).get("kind")
    except (OSError, ValueError, AttributeError):
        kind = None
    classes = {c.kind: c for c in (WordTokenizer, CharTokenizer)}
    if kind not in classes:
        raise ValueError(f"{path}: not a saved tokenizer of kind {sorted(classes)} (found {kind!r})")
    return classes[kind].load(directory)
