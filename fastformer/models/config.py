"""The model configs: LMConfig (the GPT-2 language model) and Seq2SeqConfig (the encoder-decoder).
Each checks every field when it is made, so a bad value fails before any array is allocated, and
`count_parameters` / `check_model_memory` size a model from its config alone, so one too large
for the machine is refused before its buffers are."""

import dataclasses
from dataclasses import dataclass

from fastformer.errors import FastformerError, check_bool, check_choice, check_int, check_memory, check_number

ACTIVATIONS = ("gelu", "relu")
POSITIONALS = ("learned", "sinusoidal")


def check_config_dict(cls, d, what):
    """Build the dataclass `cls` from a dict, refusing unknown keys with the list of valid ones."""
    if not isinstance(d, dict):
        raise FastformerError(f"{what} must be a mapping of field names to values, got {type(d).__name__}")
    d = {cls.renamed.get(k, k): v for k, v in d.items()}  # an older name of a key reads as its new one
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in d if k not in valid]
    if unknown:
        raise FastformerError(f"unknown {what} field(s) {unknown}: valid fields are {valid}")
    return cls(**d)


def _check_heads(config):
    if config.d_model % config.n_heads:
        raise FastformerError(f"d_model={config.d_model} must be divisible by n_heads={config.n_heads}")


def _check_positions(name, value, d_model):
    check_choice(name, value, POSITIONALS)
    if value == "sinusoidal" and d_model % 2:
        raise FastformerError(f"{name}='sinusoidal' needs an even d_model, got {d_model}")


@dataclass
class LMConfig:
    # What a caller asks of a model kind, answered here rather than by `if kind == ...` in each:
    # its name in checkpoints, the words for it, the fields a size search varies and whether a
    # run trains it on windows of train.seq_len tokens. (Plain class attributes: not config keys.)
    kind = "lm"
    noun = "a language model"
    size_keys = ("d_model", "n_layers", "n_heads", "d_ff")  # width, depth, heads, feed-forward
    tied_depth_keys = ()  # depth fields that follow size_keys[1] in a size search
    depth_label = "layers"
    trains_on_windows = True  # train.seq_len tokens a row, at most max_seq_len
    renamed = {}  # old key -> its name now, still read from older config files

    vocab_size: int = 259  # 256 bytes + <pad>, <bos>, <eos> (the byte tokenizer)
    max_seq_len: int = 128  # context window: rows of the position embedding
    d_model: int = 64  # C, the width of the residual stream
    n_heads: int = 2  # H; d_model must be divisible by it
    d_ff: int = 256  # hidden width of the MLP (GPT-2 uses 4 * d_model)
    n_layers: int = 2  # L, number of transformer blocks
    tie_embeddings: bool = True  # LM head shares the token embedding (GPT-2)
    dropout: float = 0.0  # on embeddings, attention output and MLP output, in training only
    positions: str = "learned"  # "learned" rows (wpe, GPT-2) or the fixed "sinusoidal" table;
    #                             a config saved without the key is "learned"

    def __post_init__(self):
        for name in ("vocab_size", "max_seq_len", "d_model", "n_heads", "d_ff", "n_layers"):
            check_int(name, getattr(self, name))
        _check_heads(self)
        check_bool("tie_embeddings", self.tie_embeddings)
        self.dropout = check_number("dropout", self.dropout, 0, 1, high_open=True)
        _check_positions("positions", self.positions, self.d_model)

    @classmethod
    def from_dict(cls, d):
        return check_config_dict(cls, d, "LMConfig")

    def to_dict(self):
        return dataclasses.asdict(self)

    def count_parameters(self):
        """The exact parameter count of the TransformerLM of this config (see count_parameters)."""
        C, F, V = self.d_model, self.d_ff, self.vocab_size
        block = 2 * (2 * C) + _attention_parameters(C) + _feed_forward_parameters(C, F)  # ln_1, ln_2, attn, mlp
        head = 0 if self.tie_embeddings else V * C  # lm_head.weight (V, C) when untied
        wpe = self.max_seq_len * C if self.positions == "learned" else 0  # sinusoidal positions are a fixed table
        return V * C + wpe + self.n_layers * block + 2 * C + head  # wte, wpe, blocks, ln_f

    def activation_floats(self, batch_size, seq_len=None):
        """See activation_floats: windows of seq_len tokens (default max_seq_len)."""
        C, F, H, B = self.d_model, self.d_ff, self.n_heads, batch_size
        T = self.max_seq_len if seq_len is None else seq_len
        return B * T * (self.n_layers * (9 * C + 2 * F + H * T) + 3 * C + 2 * self.vocab_size)

    def decoding_shape(self, max_len=None):
        """(T tokens a row, S source tokens, L layers with a cache, V) of a decoding run."""
        return self.max_seq_len if max_len is None else max_len, 0, self.n_layers, self.vocab_size

    def depth(self):
        """The depth as the size table of `fastformer info --params` shows it."""
        return str(self.n_layers)

    def describe(self):
        """One line of the model's shape."""
        return (f"d_model {self.d_model}, heads {self.n_heads}, d_ff {self.d_ff}, layers {self.n_layers}, context "
                f"{self.max_seq_len}, vocabulary {self.vocab_size}, {'tied' if self.tie_embeddings else 'untied'}")


@dataclass
class Seq2SeqConfig:
    kind = "seq2seq"  # see LMConfig
    noun = "an encoder-decoder"
    size_keys = ("d_model", "n_encoder_layers", "n_heads", "d_ff")
    tied_depth_keys = ("n_decoder_layers",)  # a size search gives it as many decoder as encoder layers
    depth_label = "enc+dec"
    trains_on_windows = False  # pairs of up to max_src_len / max_tgt_len tokens
    renamed = {"positional": "positions"}  # the LM's name for the same setting

    src_vocab_size: int = 259  # source token ids lie in [0, src_vocab_size)
    tgt_vocab_size: int = 259  # target token ids lie in [0, tgt_vocab_size)
    max_src_len: int = 64  # longest source sequence (rows of the source positions)
    max_tgt_len: int = 64  # longest decoder input, <bos> included
    d_model: int = 64  # C, the width of the residual stream
    n_heads: int = 4  # H; d_model must be divisible by it
    d_ff: int = 256  # hidden width of the feed-forward sublayer
    n_encoder_layers: int = 2  # encoder blocks (self-attention, feed-forward)
    n_decoder_layers: int = 2  # decoder blocks (self-attention, cross-attention, feed-forward)
    activation: str = "gelu"  # "gelu" (exact erf form, as torch) or "relu"
    norm_first: bool = True  # pre-LN; False is the post-LN of the original paper
    positions: str = "learned"  # "learned" position rows or the fixed "sinusoidal" table (older
    #                             configs call it positional, still read)
    tie_embeddings: bool = True  # output projection shares the target embedding
    dropout: float = 0.0  # on embeddings and sublayer outputs, in training only

    def __post_init__(self):
        for name in ("src_vocab_size", "tgt_vocab_size", "max_src_len", "max_tgt_len", "d_model",
                     "n_heads", "d_ff", "n_encoder_layers", "n_decoder_layers"):
            check_int(name, getattr(self, name))
        _check_heads(self)
        check_choice("activation", self.activation, ACTIVATIONS)
        _check_positions("positions", self.positions, self.d_model)
        check_bool("norm_first", self.norm_first)
        check_bool("tie_embeddings", self.tie_embeddings)
        self.dropout = check_number("dropout", self.dropout, 0, 1, high_open=True)

    @classmethod
    def from_dict(cls, d):
        return check_config_dict(cls, d, "Seq2SeqConfig")

    def to_dict(self):
        return dataclasses.asdict(self)

    def count_parameters(self):
        """The exact parameter count of the Seq2SeqTransformer of this config (see count_parameters)."""
        C, F = self.d_model, self.d_ff
        positions = (self.max_src_len + self.max_tgt_len) * C if self.positions == "learned" else 0
        attn, ff = _attention_parameters(C), _feed_forward_parameters(C, F)
        encoder = self.n_encoder_layers * (attn + ff + 2 * (2 * C)) + 2 * C  # self-attn, ff, norm1-2; encoder.norm
        decoder = self.n_decoder_layers * (2 * attn + ff + 3 * (2 * C)) + 2 * C  # + cross-attn, norm3; decoder.norm
        head = 0 if self.tie_embeddings else self.tgt_vocab_size * C
        return (self.src_vocab_size + self.tgt_vocab_size) * C + positions + encoder + decoder + head

    def activation_floats(self, batch_size, seq_len=None):
        """See activation_floats: rows of max_src_len source and max_tgt_len target tokens
        (`seq_len` does not apply)."""
        C, F, H, B = self.d_model, self.d_ff, self.n_heads, batch_size
        S, T = self.max_src_len, self.max_tgt_len
        encoder = S * (self.n_encoder_layers * (9 * C + 2 * F + H * S) + 2 * C)
        decoder = T * (self.n_decoder_layers * (13 * C + 2 * F + H * (T + S)) + 3 * C + 2 * self.tgt_vocab_size)
        return B * (encoder + decoder + self.n_decoder_layers * 2 * S * C)  # + each layer's cross keys/values

    def decoding_shape(self, max_len=None):
        """(T target tokens a row, S source tokens, L decoder layers, V) of a decoding run."""
        return (self.max_tgt_len if max_len is None else max_len, self.max_src_len, self.n_decoder_layers,
                self.tgt_vocab_size)

    def depth(self):
        """The depth as the size table of `fastformer info --params` shows it."""
        return f"{self.n_encoder_layers}+{self.n_decoder_layers}"

    def describe(self):
        """One line of the model's shape."""
        return (f"d_model {self.d_model}, heads {self.n_heads}, d_ff {self.d_ff}, {self.n_encoder_layers} encoder + "
                f"{self.n_decoder_layers} decoder layers, source/target lengths {self.max_src_len}/{self.max_tgt_len}, "
                f"vocabularies {self.src_vocab_size}/{self.tgt_vocab_size}, "
                f"{'tied' if self.tie_embeddings else 'untied'}")


MODEL_CONFIGS = (LMConfig, Seq2SeqConfig)


def count_parameters(cfg):
    """The exact parameter count of the model `cfg` describes (an LMConfig: TransformerLM; a
    Seq2SeqConfig: Seq2SeqTransformer), from the shapes alone: nothing is allocated, so a config
    too large for memory is sized as cheaply as a tiny one. Tied embeddings count once."""
    if not isinstance(cfg, MODEL_CONFIGS):
        raise FastformerError(f"count_parameters needs an LMConfig or a Seq2SeqConfig, got {type(cfg).__name__}")
    return cfg.count_parameters()


def _attention_parameters(C):
    return C * 3 * C + 3 * C + C * C + C  # fused q, k, v projection and output projection, with biases


def _feed_forward_parameters(C, F):
    return C * F + F + F * C + C  # up and down projections, with biases


def activation_floats(cfg, batch_size, seq_len=None):
    """About how many floats one training step's forward keeps for its backward (its caches),
    for `batch_size` rows of `seq_len` tokens (a language model) or of max_src_len source and
    max_tgt_len target tokens (an encoder-decoder), from the shapes alone. Per token and layer:
    the normed inputs, q/k/v, attention output and projections (about 9 C), the feed-forward's
    pre- and post-activation (2 F) and a row of attention weights per head (H x keys); then the
    logits and their gradient (2 V per token)."""
    return cfg.activation_floats(batch_size, seq_len)


def training_memory(cfg, batch_size, seq_len=None, copies=4, itemsize=4):
    """Estimated bytes to train the model of `cfg`: `copies` buffers of every parameter (weights,
    gradients and the optimizer's state: 4 for Adam's two moments) and the activations of a
    batch (activation_floats), `itemsize` bytes each."""
    return itemsize * (copies * count_parameters(cfg) + activation_floats(cfg, batch_size, seq_len))


def check_model_memory(cfg, what="the model"):
    """Refuse a model whose weights and gradient buffers (2 x 4 bytes a parameter) do not fit in
    the memory available, before any of it is allocated."""
    n = count_parameters(cfg)
    check_memory(f"{what} ({n:,} parameters, float32 weights and gradients)", 8 * n, "make the model smaller")
    return n


def check_decoding_memory(cfg, rows, max_len=None):
    """Refuse decoding `rows` sequences at once (the batch times the beams or samples) when its
    estimated memory exceeds what is available: the key/value caches of every layer, the
    activations of a full-window forward and a few (rows, V) float64 arrays of log-probabilities."""
    C, F, H = cfg.d_model, cfg.d_ff, cfg.n_heads
    T, S, L, V = cfg.decoding_shape(max_len)
    caches = 2 * L * rows * (T + S) * C  # self- (and cross-) attention keys and values
    forward = rows * T * (9 * C + 2 * F + H * (T + S))  # one layer of a forward over the window
    check_memory(f"decoding {rows:,} sequences at once", 4 * (caches + forward) + 9 * rows * T + 32 * rows * V,
                 "decode fewer texts, beams or samples at once")
