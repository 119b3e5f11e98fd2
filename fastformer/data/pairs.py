"""Data for the encoder-decoder model: parallel text pairs and the synthetic copy / reverse / sort
tasks, turned into padded batches.

A batch is a dict that `Seq2SeqTransformer.loss_and_grads(**batch)` takes:

    src_ids  (B, S)  source ids, padded with pad_id to the longest source
    src_mask (B, S)  1 for tokens, 0 for padding
    tgt_in   (B, T)  <bos> + target: the decoder input, shifted right
    tgt_mask (B, T)  1 for tokens, 0 for padding
    targets  (B, T)  target + <eos>: the next token at every decoder position, -100 at padding

Both data sources (`PairBatches`, `SyntheticTask`) draw from an explicit np.random.Generator (a
run's data stream, fastformer.seeds) and have `next_batch()`, `state_dict()` and
`load_state_dict()`, so a resumed run sees exactly the batches it would have seen.

Decoded output is made readable by `readable` (punctuation re-attached by sacremoses' Moses
detokenizer, `pip install "fastformer[text]"`; <unk> written out), and `unknown_pieces` names the
source words or characters a tokenizer cannot represent.
"""

import csv
import functools
import re
import string

import numpy as np

from fastformer.data.tokenizer import CharTokenizer
from fastformer.errors import FastformerError, check_bool, check_choice, check_int, check_number, is_int
from fastformer.kernels import IGNORE_INDEX

ALPHABETS = {"lower": string.ascii_lowercase, "upper": string.ascii_uppercase,
             "letters": string.ascii_letters, "digits": string.digits, "punctuation": string.punctuation}
TASKS = ("copy", "reverse", "sort")


# ----------------------------------------------------------------------------- pairs
def read_pairs(path, lowercase=False):
    """Read `source<TAB>target` lines (or a .csv file's first two columns); further columns
    are ignored. Returns (pairs: [(src, tgt)], skipped: {reason: count}) -- blank lines, lines
    without a tab and pairs with an empty side are skipped and counted, never fatal."""
    check_bool("lowercase", lowercase)
    skipped = {"empty line": 0, "no tab": 0, "empty side": 0}
    pairs = []
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f) if str(path).lower().endswith(".csv") else None
            rows = _csv_rows(reader, path) if reader else (line.rstrip("\r\n").split("\t") for line in f)
            for row in rows:
                if not row or not "".join(row).strip():
                    skipped["empty line"] += 1
                elif len(row) < 2:
                    skipped["no tab"] += 1
                elif not row[0].strip() or not row[1].strip():
                    skipped["empty side"] += 1
                else:
                    src, tgt = row[0].strip(), row[1].strip()
                    pairs.append((src.lower(), tgt.lower()) if lowercase else (src, tgt))
    except FileNotFoundError:
        raise FastformerError(f"pairs file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise FastformerError(f"pairs file {path} is not UTF-8 text: {e}") from None
    return pairs, skipped


def _csv_rows(reader, path):
    """The rows of a csv.reader over a pairs file, one pair per line: a quoted field that runs
    over a line end (an unbalanced quote, which would swallow the lines after it) or that the csv
    module refuses is a FastformerError naming the line."""
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise FastformerError(f"pairs file {path} line {start}: not valid CSV ({e}); an unbalanced "
                                  f"quote?") from None
        if reader.line_num != start:
            raise FastformerError(f"pairs file {path} line {start}: a quoted field runs on to line "
                                  f"{reader.line_num}, but a pair is one line (an unbalanced quote?)")
        yield row


def encode_pairs(pairs, src_tok, tgt_tok, max_src_len, max_tgt_len):
    """Token ids of each pair, keeping the pairs that fit: at most max_src_len source tokens
    and at most max_tgt_len - 1 target tokens (the decoder reads <bos> + target), and at least
    one token on each side. Returns (src_seqs, tgt_seqs, n_skipped)."""
    src_seqs, tgt_seqs, skipped = [], [], 0
    for s, t in pairs:
        si, ti = src_tok.encode(s), tgt_tok.encode(t)
        if _fits(si, ti, max_src_len, max_tgt_len):
            src_seqs.append(si)
            tgt_seqs.append(ti)
        else:
            skipped += 1
    return src_seqs, tgt_seqs, skipped


def fit_pairs(pairs, src_tok, tgt_tok, max_src_len, max_tgt_len):
    """The text pairs that `encode_pairs` keeps, and how many it skips: (pairs, n_skipped)."""
    kept = [(s, t) for s, t in pairs if _fits(src_tok.encode(s), tgt_tok.encode(t), max_src_len, max_tgt_len)]
    return kept, len(pairs) - len(kept)


def _fits(src_ids, tgt_ids, max_src_len, max_tgt_len):
    return 1 <= len(src_ids) <= max_src_len and 1 <= len(tgt_ids) <= max_tgt_len - 1


def split_pairs(pairs, val_fraction=0.1, rng=0):
    """Deterministic (train, val) split of a list: a permutation drawn from `rng` (an
    np.random.Generator, or an int seed; a run passes its split stream, fastformer.seeds), the
    last round(val_fraction * n) items to validation, each part in file order."""
    check_number("val_fraction", val_fraction, low=0, high=1, high_open=True)
    n_val = round(val_fraction * len(pairs))
    perm = np.random.default_rng(rng).permutation(len(pairs))
    val_idx = set(perm[len(pairs) - n_val:].tolist())
    return ([p for i, p in enumerate(pairs) if i not in val_idx],
            [p for i, p in enumerate(pairs) if i in val_idx])


def make_batch(src_seqs, tgt_seqs, pad_id=0, bos_id=1, eos_id=2):
    """Pad a list of source and target id lists into a batch dict (see the module docstring)."""
    if len(src_seqs) != len(tgt_seqs) or not src_seqs:
        raise FastformerError(f"need as many sources as targets, at least one, got {len(src_seqs)} and "
                              f"{len(tgt_seqs)}")
    B = len(src_seqs)
    S = max(len(s) for s in src_seqs)
    T = max(len(t) for t in tgt_seqs) + 1  # <bos> + target, target + <eos>
    src_ids = np.full((B, S), pad_id, dtype=np.int64)
    tgt_in = np.full((B, T), pad_id, dtype=np.int64)
    targets = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
    src_mask = np.zeros((B, S), dtype=np.int64)
    tgt_mask = np.zeros((B, T), dtype=np.int64)
    for b, (s, t) in enumerate(zip(src_seqs, tgt_seqs)):
        src_ids[b, :len(s)] = s
        src_mask[b, :len(s)] = 1
        tgt_in[b, :len(t) + 1] = [bos_id] + list(t)
        targets[b, :len(t) + 1] = list(t) + [eos_id]
        tgt_mask[b, :len(t) + 1] = 1
    return dict(src_ids=src_ids, src_mask=src_mask, tgt_in=tgt_in, tgt_mask=tgt_mask, targets=targets)


class PairBatches:
    """Shuffled batches of encoded pairs, epoch after epoch, drawn from the generator `rng`.

    Args:
        src_seqs, tgt_seqs: lists of id lists (see `encode_pairs`).
        batch_size: pairs per batch (the last batch of an epoch may be smaller).
        rng: np.random.Generator, or an int seed.
    """

    def __init__(self, src_seqs, tgt_seqs, batch_size, rng=0, pad_id=0, bos_id=1, eos_id=2):
        if len(src_seqs) != len(tgt_seqs) or not src_seqs:
            raise FastformerError(f"need as many sources as targets, at least one, got {len(src_seqs)} and "
                                  f"{len(tgt_seqs)}")
        check_int("batch_size", batch_size)
        self.src, self.tgt, self.batch_size = src_seqs, tgt_seqs, batch_size
        self.ids = (pad_id, bos_id, eos_id)
        self.rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        self.epoch, self.pos, self.perm = 0, 0, self.rng.permutation(len(src_seqs))

    def next_batch(self):
        if self.pos >= len(self.perm):
            self.epoch, self.pos, self.perm = self.epoch + 1, 0, self.rng.permutation(len(self.src))
        idx = self.perm[self.pos:self.pos + self.batch_size]
        self.pos += len(idx)
        return make_batch([self.src[i] for i in idx], [self.tgt[i] for i in idx], *self.ids)

    def state_dict(self):
        """JSON-able position in the stream: generator state, epoch, permutation, offset."""
        return {"rng": self.rng.bit_generator.state, "epoch": self.epoch, "pos": self.pos,
                "perm": self.perm.tolist()}

    def load_state_dict(self, state):
        if len(state["perm"]) != len(self.src):
            raise FastformerError(f"data state is for {len(state['perm'])} pairs, this data has {len(self.src)}")
        self.rng.bit_generator.state = state["rng"]
        self.epoch, self.pos, self.perm = state["epoch"], state["pos"], np.asarray(state["perm"])


# -------------------------------------------------------------------- readable text
UNK = "<unk>"
# the word tokenizer splits "l'eau" and "est-ce" into l ' eau and est - ce: such a mark between two
# words is put back inside the word (the Moses detokenizer expects them attached)
_INNER_MARK = re.compile(r"(?<=\w) ([-'’]) (?=\w)")
_NO_SPACE_BEFORE = re.compile(r" +(?=[.,!?;:%)\]}])")  # the fallback without sacremoses
_NO_SPACE_AFTER = re.compile(r"(?<=[(\[{]) +")


@functools.lru_cache(maxsize=None)
def _moses(lang):
    try:
        from sacremoses import MosesDetokenizer
    except ImportError:
        return None
    return MosesDetokenizer(lang=lang)


def detokenize(tokens, lang="en"):
    """One readable string of word tokens: inner apostrophes and hyphens joined to their words,
    then sacremoses' Moses detokenizer for `lang` (punctuation re-attached as that language
    writes it), or, without sacremoses, spaces before closing and after opening marks removed."""
    text = _INNER_MARK.sub(r"\1", " ".join(tokens))
    moses = _moses(lang)
    if moses is not None:
        return moses.detokenize(text.split())
    return _NO_SPACE_AFTER.sub("", _NO_SPACE_BEFORE.sub("", text))


def readable(tokenizer, ids, lang="en"):
    """The text of decoded `ids` as a reader wants it: word tokens detokenized (see `detokenize`),
    characters joined, and an unknown token written `<unk>` instead of dropped or replaced;
    <pad>, <bos> and <eos> are left out. Other tokenizers decode as they do."""
    table = {"word": getattr(tokenizer, "words", None), "char": getattr(tokenizer, "chars", None)}.get(tokenizer.kind)
    if table is None:
        return tokenizer.decode(ids)
    n, unk = len(tokenizer.special_tokens), tokenizer.unk_id
    pieces = [table[i - n] if i >= n else UNK for i in np.asarray(ids).tolist() if i >= n or i == unk]
    return detokenize(pieces, lang) if tokenizer.kind == "word" else "".join(pieces)


def unknown_pieces(tokenizer, text):
    """The words (word tokenizer) or characters (char tokenizer) of `text` that encode as <unk>,
    in order; [] for tokenizers without <unk>."""
    unk = getattr(tokenizer, "unk_id", None)
    if unk is None:
        return []
    pieces = tokenizer.tokenize(text) if tokenizer.kind == "word" else list(text)
    return [p for p, i in zip(pieces, tokenizer.encode(text).tolist()) if i == unk]


# ------------------------------------------------------------------------- synthetic
def parse_alphabet(spec):
    """Characters named by `spec`: names from ALPHABETS joined with "+" ("letters+digits"),
    or a literal string of characters prefixed with "chars:" ("chars:abc")."""
    if not isinstance(spec, str):
        raise FastformerError(f"an alphabet must be a str such as 'letters+digits' or 'chars:abc', got {spec!r}")
    if spec.startswith("chars:"):
        chars = spec[len("chars:"):]
    else:
        parts = spec.split("+")
        bad = [p for p in parts if p not in ALPHABETS]
        if bad:
            raise FastformerError(f"unknown alphabet name(s) {bad} in {spec!r}: valid names are {sorted(ALPHABETS)}, "
                                  f"joined with '+', or 'chars:' followed by the characters")
        chars = "".join(ALPHABETS[p] for p in parts)
    chars = "".join(dict.fromkeys(chars))  # no repeats, first occurrence order
    if not chars:
        raise FastformerError(f"alphabet {spec!r} has no characters")
    return chars


class SyntheticTask:
    """Random strings and their copy, reversal or sorted characters, tokenized per character.

    Args:
        task: "copy", "reverse" ("hello123" -> "321olleh") or "sort".
        min_len, max_len: string lengths, drawn uniformly in [min_len, max_len].
        alphabet: see `parse_alphabet`; default letters, digits and punctuation.
        batch_size: strings per batch from `next_batch`.
        rng: np.random.Generator, or an int seed; its state is the data stream's state.
    """

    def __init__(self, task, min_len=1, max_len=16, alphabet="letters+digits+punctuation", batch_size=64, rng=0):
        check_choice("task", task, TASKS)
        if not (is_int(min_len) and is_int(max_len) and 1 <= min_len <= max_len):
            raise FastformerError(f"need integers 1 <= min_len <= max_len, got min_len={min_len!r}, "
                                  f"max_len={max_len!r}")
        check_int("batch_size", batch_size)
        self.task, self.min_len, self.max_len, self.batch_size = task, min_len, max_len, batch_size
        self.chars = parse_alphabet(alphabet)
        self.tokenizer = CharTokenizer(self.chars)
        self.rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)

    def target(self, text):
        if self.task == "copy":
            return text
        if self.task == "reverse":
            return text[::-1]
        return "".join(sorted(text, key=self.chars.index))  # "sort": in alphabet order

    def sample(self, n, rng=None):
        """n (source, target) string pairs drawn from `rng` (default the task's generator)."""
        check_int("n", n, minimum=0)
        rng = self.rng if rng is None else rng
        lengths = rng.integers(self.min_len, self.max_len + 1, size=n)
        picks = rng.integers(0, len(self.chars), size=int(lengths.sum()))
        out, o = [], 0
        for L in lengths:
            s = "".join(self.chars[i] for i in picks[o:o + L])
            o += L
            out.append((s, self.target(s)))
        return out

    def batch_of(self, pairs):
        tok = self.tokenizer
        return make_batch([tok.encode(s) for s, _ in pairs], [tok.encode(t) for _, t in pairs],
                          tok.pad_id, tok.bos_id, tok.eos_id)

    def next_batch(self):
        return self.batch_of(self.sample(self.batch_size))

    def state_dict(self):
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state):
        self.rng.bit_generator.state = state["rng"]
