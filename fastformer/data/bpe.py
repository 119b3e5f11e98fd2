"""Byte-level BPE tokenizer, trained and run offline with Hugging Face `tokenizers`.

The same scheme as GPT-2: text is split with GPT-2's pre-tokenizer regex, every byte is mapped to
a printable character, and merges learnt from the corpus join frequent byte pairs. All 256 bytes
are in the initial alphabet, so any text encodes without an unknown token. The tokenizer is saved
as a standard `tokenizer.json` that `tokenizers.Tokenizer.from_file` and
`transformers.PreTrainedTokenizerFast(tokenizer_file=...)` read; nothing is ever downloaded.
"""

import json
import os

import numpy as np

from fastformer.atomic import atomic_open
from fastformer.data.checks import check_text, decode_ids, read_text_chunks, text_files
from fastformer.errors import FastformerError, check_int, load_json

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")  # ids 0, 1, 2 in a trained vocabulary
GPT2_SPECIAL = "<|endoftext|>"  # GPT-2's one special token: its <pad>, <bos> and <eos> at once
# Far beyond what any corpus fills (GPT-2 has 50,257 ids); the Rust trainer aborts the whole
# process, rather than raising, when it cannot reserve room for a vocabulary of 10**9.
MAX_VOCAB_SIZE = 1 << 24


def byte_level_chars():
    """The 256 printable characters byte-level BPE writes bytes as, indexed by byte (GPT-2's
    scheme): printable Latin-1 bytes stand for themselves, the other 68 bytes take the code
    points 256, 257, ... in byte order."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise FastformerError("the BPE tokenizer needs the `tokenizers` package: pip install tokenizers") from None
    return tokenizers


class BPETokenizer:
    """Byte-level BPE with <pad>, <bos>, <eos>; the interface of every fastformer tokenizer."""

    kind = "bpe"

    def __init__(self, tokenizer):
        # fastformer encodes whole texts and pads its batches itself: a tokenizer.json's truncation
        # (which would cut every encoded text, e.g. a block of `prepare`, to max_length) or padding is turned off
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tk = tokenizer
        ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
        if None in ids and tokenizer.token_to_id(GPT2_SPECIAL) is not None:  # GPT-2's own tokenizer
            self.pad_id = self.bos_id = self.eos_id = tokenizer.token_to_id(GPT2_SPECIAL)
            self.special_tokens = {GPT2_SPECIAL: self.eos_id}
        elif None in ids:
            missing = [t for t, i in zip(SPECIAL_TOKENS, ids) if i is None]
            raise FastformerError(f"BPE tokenizer lacks the special tokens {missing}; "
                                  f"fastformer needs {list(SPECIAL_TOKENS)} (or GPT-2's {GPT2_SPECIAL})")
        else:
            self.pad_id, self.bos_id, self.eos_id = ids
            self.special_tokens = dict(zip(SPECIAL_TOKENS, ids))
        self.vocab_size = tokenizer.get_vocab_size()
        used = set(tokenizer.get_vocab(with_added_tokens=True).values())
        if len(used) != self.vocab_size or min(used) != 0 or max(used) != self.vocab_size - 1:
            gaps = sorted(set(range(max(used) + 1)) - used)[:5]
            raise FastformerError(f"the tokenizer's ids must be 0..{self.vocab_size - 1} without gaps (a model has "
                                  f"one embedding row per id), but they run to {max(used)} (missing: {gaps}...)")
        # text that spells "<eos>" is text, not the special id: specials enter only via bos=/eos=
        tokenizer.encode_special_tokens = True

    @classmethod
    def train(cls, files, vocab_size, min_frequency=2, show_progress=False):
        """Learn merges from text files until the vocabulary holds `vocab_size` tokens."""
        tk = _tokenizers()
        files = text_files(files)
        check_int("vocab_size", vocab_size, minimum=256 + len(SPECIAL_TOKENS), maximum=MAX_VOCAB_SIZE)
        check_int("min_frequency", min_frequency)
        # the Rust trainer stops on bytes that are not UTF-8 without naming the file, and learns
        # nothing from a corpus of blanks: read each file once first
        blank = True
        for path in files:
            for chunk in read_text_chunks(path):
                blank = blank and not chunk.strip()
        if blank:
            raise FastformerError(f"the files {files} hold no text to learn merges from")
        tokenizer = tk.Tokenizer(tk.models.BPE())
        tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(vocab_size=int(vocab_size), min_frequency=min_frequency,
                                         special_tokens=list(SPECIAL_TOKENS), show_progress=show_progress,
                                         initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
        tokenizer.train(files, trainer)
        return cls(tokenizer)

    def encode(self, text, bos=False, eos=False):
        """ids (int64, 1-D) of `text`, optionally framed by <bos>/<eos>."""
        bos, eos = check_text(text, bos, eos)
        ids = self._tk.encode(text, add_special_tokens=False).ids
        return np.array([self.bos_id] * bos + ids + [self.eos_id] * eos, dtype=np.int64)

    def encode_batch(self, texts):
        """A list of id arrays, encoded in parallel by the Rust library."""
        for text in texts:
            check_text(text)
        return [np.array(e.ids, dtype=np.int64) for e in self._tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, errors="replace"):
        """Text of `ids` with special tokens dropped."""
        ids = decode_ids(ids, self.vocab_size, "the BPE vocabulary")
        return self._tk.decode(ids.tolist(), skip_special_tokens=True)

    def byte_lengths(self):
        """(V,) int64: the bytes each id stands for (one per byte-level character; 0 for specials)."""
        special = {i for i, t in self._tk.get_added_tokens_decoder().items() if t.special}
        special.update(self.special_tokens.values())
        vocab = self._tk.get_vocab(with_added_tokens=True)  # token string -> id
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for token, i in vocab.items():
            if i not in special:
                out[i] = len(token)
        return out

    def to_dict(self):
        """The parsed JSON of its standard tokenizer.json."""
        return json.loads(self._tk.to_str())

    def save(self, directory, filename="tokenizer.json"):
        """Write the standard `tokenizer.json` (atomically: temp file then rename)."""
        os.makedirs(directory, exist_ok=True)
        with atomic_open(os.path.join(directory, filename)) as f:
            f.write(self._tk.to_str(pretty=True))

    @classmethod
    def from_dict(cls, d, where="tokenizer"):
        """From the parsed JSON of a Hugging Face tokenizer.json."""
        try:
            tokenizer = _tokenizers().Tokenizer.from_str(json.dumps(d))
        except Exception as e:  # the Rust library raises its own exception type
            raise FastformerError(f"{where} is not a readable Hugging Face tokenizer.json: {e}") from None
        return cls(tokenizer)

    @classmethod
    def from_file(cls, path):
        return cls.from_dict(load_json(path, "Hugging Face tokenizer file"), where=path)
