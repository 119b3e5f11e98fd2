"""What a run learns from, for each kind of model: its data stream, its tokenizers, the model it
trains and how that model is evaluated. The trainer runs one loop over either:

    task.config              the RunConfig, vocabulary sizes following the tokenizers
    task.tokenizers          {name: tokenizer}, saved with each checkpoint
    task.new_model(seed)     a fresh model of the config's kind
    task.next_batch()        keyword arguments for `model.loss_and_grads`
    task.evaluate(model)     {"val_...": number}; = task.metrics([task.eval_sums(model)])
    task.eval_sums(model, shard=(rank, ranks)), task.metrics(parts)   the same split over ranks
    task.state_dict()        the data order's position (JSON-able); load_state_dict(state)
    task.fingerprint         SHA-256 of the training data, saved to detect a changed data set
    task.describe()          one line for the command line

`LMTask` (data.task text) draws windows of a token stream; `Seq2SeqTask` draws padded batches of
synthetic strings (copy, reverse, sort) or of translation pairs from a file. The batches come
from the run's data stream and held-out strings from another (fastformer.seeds), so a resumed run
sees the same batches and every evaluation the same examples.
"""

import hashlib
import json
import os
from typing import NamedTuple

from fastformer import seeds
from fastformer.data.pairs import PairBatches, SyntheticTask, encode_pairs, fit_pairs, read_pairs, split_pairs
from fastformer.data.prepare import is_prepared_dir, load_prepared
from fastformer.data.text import default_corpus, get_batch, load_text, load_training_data
from fastformer.data.tokenizer import CharTokenizer, WordTokenizer, make_tokenizer
from fastformer.errors import FastformerError
from fastformer.models.config import LMConfig, Seq2SeqConfig
from fastformer.models.lm import TransformerLM
from fastformer.models.seq2seq import Seq2SeqTransformer
from fastformer.training.config import match_tokenizer
from fastformer.training.evaluate import lm_metrics, lm_sums, seq2seq_metrics, seq2seq_sums


def make_task(config, text=None, tokenizers=None):
    """The task of `config.data.task`. `tokenizers` (a resumed run's) replace building new ones;
    `text` replaces the language model's data file."""
    return KINDS[config.kind].task(config, tokenizers, text=text)


def new_model(config, seed):
    """A fresh model of the kind `config` (a RunConfig) trains."""
    return KINDS[config.kind].model(config.model_config(), seed=seed)


def sized_config(config, data_given=False):
    """(config, note): `config` with the vocabulary sizes training would give it -- from the
    data's tokenizer, a task's alphabet or the pairs' words -- and a note on where they came from,
    for sizing a model (`fastformer info`) without building it. A data.path that is not here keeps
    the configured sizes, unless it was given on the command line (`data_given`): then it is an
    error."""
    return KINDS[config.kind].task.sized_config(config, data_given)


def _absent_data(config, data_given):
    """(config, note) when data.path names nothing here, else None."""
    path = config.data.path
    if path and not os.path.exists(path):
        if data_given:
            raise FastformerError(f"--data {path!r} does not exist")
        return config, (f"vocabularies as configured: data.path {path} is not here, give --data FILE to take "
                        f"them from the data")
    return None


class LMTask:
    """Random windows of a token stream (data.path, a prepared directory or the default corpus)."""

    def __init__(self, config, tokenizers=None, text=None):
        t = config.train
        # the tokenizer and the train/validation token streams (text is encoded once; a prepared
        # directory is memory-mapped); model.vocab_size follows the tokenizer
        tok, self.train_ids, self.val_ids, self.fingerprint = load_training_data(
            config.data, t.seq_len, text=text, tokenizer=(tokenizers or {}).get("tokenizer"))
        self.config = match_tokenizer(config, tok)
        self.tokenizers = {"tokenizer": tok}
        self.byte_lengths = tok.byte_lengths()  # (V,) for bits per byte
        self.rng = seeds.run_streams(t.seed).data

    def new_model(self, seed):
        return new_model(self.config, seed)

    def next_batch(self):
        t = self.config.train
        x, y = get_batch(self.train_ids, t.batch_size, t.seq_len, self.rng)  # (B, T) each
        return {"ids": x, "targets": y}

    def evaluate(self, model):
        """Validation loss, perplexity, next-token accuracy and bits per byte over fixed windows."""
        return self.metrics([self.eval_sums(model)])

    def eval_sums(self, model, shard=(0, 1)):
        """The evaluation's sums over this shard's batches (training/evaluate.lm_sums)."""
        t = self.config.train
        return lm_sums(model, self.val_ids, t.batch_size, t.seq_len, t.eval_batches, self.byte_lengths, shard)

    def metrics(self, parts):
        m = lm_metrics(parts)
        return {"val_loss": m["loss"], "val_ppl": m["ppl"], "val_acc": m["acc"], "val_bpb": m["bits_per_byte"]}

    def state_dict(self):
        return self.rng.bit_generator.state

    def load_state_dict(self, state):
        self.rng.bit_generator.state = state

    @staticmethod
    def sized_config(config, data_given=False):
        """See `sized_config`: only a char vocabulary needs the text read."""
        d = config.data
        absent = _absent_data(config, data_given)
        if absent:
            return absent
        if not d.path and d.tokenizer in (None, "byte") and config.model.vocab_size != type(config.model).vocab_size:
            return config, "vocabulary as configured (model.vocab_size; no data given)"
        if is_prepared_dir(d.path):
            tok = load_prepared(d.path).tokenizer
        else:
            text = (load_text(d.path) if d.path else default_corpus()) if d.tokenizer == "char" else None
            tok = make_tokenizer(d.tokenizer or "byte", text)
        return match_tokenizer(config, tok), f"the {tok.kind} tokenizer's vocabulary ({d.path or 'embedded corpus'})"

    def describe(self):
        tok = self.tokenizers["tokenizer"]
        return (f"{len(self.train_ids):,} tokens ({self.config.data.path or 'embedded stdlib-documentation corpus'}; "
                f"{tok.kind} tokenizer, {tok.vocab_size} ids)")


class Seq2SeqTask:
    """Padded source/target batches for the encoder-decoder: synthetic strings, or pairs read from
    data.path (split into training and validation pairs; too-long pairs skipped and counted)."""

    def __init__(self, config, tokenizers=None, text=None):
        """`text` is the language model's: the pairs come from data.path or a synthetic task."""
        d, t, s = config.data, config.train, config.seq2seq
        self.skipped = {}  # reason: count, for pairs files
        if d.task == "pairs":
            if not d.path:
                raise FastformerError("data.task=pairs needs data.path: a file of source<TAB>target lines (--data)")
            pairs, read_skips = read_pairs(d.path, lowercase=d.lowercase)
            self.skipped = {k: v for k, v in read_skips.items() if v}
            if d.unique_sources:
                first = {}  # source -> its first target, in file order
                for src, tgt in pairs:
                    first.setdefault(src, tgt)
                pairs = list(first.items())
            pairs = pairs[:d.max_pairs]
            if not pairs:
                raise FastformerError(f"pairs file {d.path} holds no source<TAB>target pair (skipped: {read_skips})")
            streams = seeds.run_streams(t.seed)
            train, val = split_pairs(pairs, d.val_fraction, streams.split)
            src_tok, tgt_tok = (tokenizers["src"], tokenizers["tgt"]) if tokenizers else self._build(train, d)
            src_seqs, tgt_seqs, n_long = encode_pairs(train, src_tok, tgt_tok, s.max_src_len, s.max_tgt_len)
            if not src_seqs:
                raise FastformerError(f"no training pair of {d.path} fits seq2seq.max_src_len={s.max_src_len} "
                                      f"and max_tgt_len={s.max_tgt_len}")
            # no validation split (val_fraction 0): evaluate on the training pairs
            self.val_pairs, n_long_val = fit_pairs(val or train, src_tok, tgt_tok, s.max_src_len, s.max_tgt_len)
            if n_long or n_long_val:
                self.skipped["too long"] = n_long + (n_long_val if val else 0)
            self.n_train = len(src_seqs)
            self.train_pairs = train  # the split's text pairs, long ones included (fastformer eval --split train)
            self.source = PairBatches(src_seqs, tgt_seqs, t.batch_size, streams.data,
                                      src_tok.pad_id, tgt_tok.bos_id, tgt_tok.eos_id)
            data_id = json.dumps(pairs, ensure_ascii=False)
        else:
            self.source = SyntheticTask(d.task, d.min_len, d.max_len, d.alphabet, t.batch_size,
                                        seeds.run_streams(t.seed).data)
            src_tok = tgt_tok = self.source.tokenizer
            self.val_pairs = self.heldout(t.eval_batches * t.batch_size, config)
            data_id = json.dumps([d.task, self.source.chars, d.min_len, d.max_len])
        self.fingerprint = hashlib.sha256(data_id.encode("utf-8")).hexdigest()
        self.tokenizers = {"src": src_tok, "tgt": tgt_tok}
        config = match_tokenizer(config, src_tok, "src_vocab_size")
        self.config = match_tokenizer(config, tgt_tok, "tgt_vocab_size")

    @staticmethod
    def _build(train, d):
        """Source and target tokenizers learnt from the training pairs."""
        if (d.tokenizer or "word") == "word":
            return (WordTokenizer.build([s for s, _ in train], min_freq=d.min_freq),
                    WordTokenizer.build([t for _, t in train], min_freq=d.min_freq))
        return (CharTokenizer.from_text("".join(s for s, _ in train)),
                CharTokenizer.from_text("".join(t for _, t in train)))

    def heldout(self, n, config=None):
        """n synthetic (source, target) pairs from the held-out generator: the same every time."""
        config = config or self.config
        return self.source.sample(n, rng=seeds.run_streams(config.train.seed).heldout)

    def new_model(self, seed):
        return new_model(self.config, seed)

    def next_batch(self):
        return self.source.next_batch()

    def evaluate(self, model):
        """Loss, token accuracy, greedy exact match and BLEU on up to eval_batches batches of
        validation pairs (held-out strings for the synthetic tasks)."""
        return self.metrics([self.eval_sums(model)])

    def eval_sums(self, model, shard=(0, 1)):
        """The evaluation's sums over this shard's batches (training/evaluate.seq2seq_sums)."""
        t = self.config.train
        return seq2seq_sums(model, self.val_pairs[:t.eval_batches * t.batch_size], self.tokenizers["src"],
                            self.tokenizers["tgt"], t.batch_size, shard=shard)

    def metrics(self, parts):
        m = seq2seq_metrics(parts)
        return {"val_loss": m["loss"], "val_acc": m["token_acc"], "val_exact": m["exact_match"],
                "val_bleu": m["bleu"]}

    def state_dict(self):
        return self.source.state_dict()

    def load_state_dict(self, state):
        self.source.load_state_dict(state)

    @classmethod
    def sized_config(cls, config, data_given=False):
        """See `sized_config`: the tokenizers built as training builds them."""
        d = config.data
        if d.task != "pairs":
            return cls(config).config, f"vocabularies from the {d.task} task's alphabet"
        return (_absent_data(config, data_given)
                or (cls(config).config, f"{d.tokenizer or 'word'} vocabularies built from {d.path} as training does"))

    def describe(self):
        d, (src, tgt) = self.config.data, self.tokenizers.values()
        if d.task != "pairs":
            return (f"the {d.task} task (strings of {d.min_len}-{d.max_len} characters from "
                    f"{len(self.source.chars)}; {src.vocab_size} ids)")
        skipped = ", ".join(f"{n:,} {why}" for why, n in self.skipped.items()) or "none"
        return (f"{self.n_train:,} training and {len(self.val_pairs):,} validation pairs ({d.path}; skipped: "
                f"{skipped}; {src.kind} tokenizers, {src.vocab_size} source and {tgt.vocab_size} target ids)")


class Kind(NamedTuple):
    """What a model kind is made of."""
    config: type  # its model config, a section of RunConfig (whose class attributes answer the
    #               other questions: noun, size_keys, trains_on_windows, ...)
    model: type  # the model class, built as model(config, seed=...)
    task: type  # what a run of it trains on
    tokenizers: dict  # its tokenizers: name -> directory inside a checkpoint
    commands: str  # the commands that run a trained one, for a message refusing it elsewhere


# The one answer to "which model kind": RunConfig.kind (the config class's `kind`) -> its parts.
# A third kind adds its config class (and section), model, task and a line here.
KINDS = {
    "lm": Kind(LMConfig, TransformerLM, LMTask, {"tokenizer": "."}, "fastformer generate"),
    "seq2seq": Kind(Seq2SeqConfig, Seq2SeqTransformer, Seq2SeqTask, {"src": "src_tokenizer", "tgt": "tgt_tokenizer"},
                    "fastformer translate or eval"),
}
