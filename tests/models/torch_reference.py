"""Exchange of weights with PyTorch, the independent implementation the models are checked against.

torch is imported inside the functions that need it, never when this module is imported.

Seq2SeqTransformer <-> `torch_seq2seq_module(config)`, a torch module holding a
`torch.nn.Transformer` (batch_first=True) and the parts around it, with these state-dict names:

    transformer.encoder.layers.{i}.*, transformer.encoder.norm.*   torch.nn.Transformer's own
    transformer.decoder.layers.{i}.*, transformer.decoder.norm.*   names and shapes
    src_embed.weight (V_s, C), tgt_embed.weight (V_t, C)   token embeddings (times sqrt(C) in use)
    src_pos_embed.weight (max_src_len, C), tgt_pos_embed.weight (max_tgt_len, C)   learned only
    lm_head.weight (V_t, C)   output projection, no bias; the same tensor as tgt_embed when tied

The fastformer names are these without the "transformer." prefix (and without lm_head.weight
when tied), so the mapping is a prefix and a copy.
"""

import warnings

import numpy as np

from fastformer.models.config import Seq2SeqConfig
from fastformer.models.seq2seq import Seq2SeqTransformer, sinusoidal_table

TORCH_PREFIX = "transformer."
_OUTSIDE = ("src_embed.", "tgt_embed.", "src_pos_embed.", "tgt_pos_embed.", "lm_head.")


def _torch_name(name):
    return name if name.startswith(_OUTSIDE) else TORCH_PREFIX + name


def seq2seq_to_torch_state_dict(model):
    """The weights of a Seq2SeqTransformer as a {name: torch.Tensor} state dict (copies) for
    `torch_seq2seq_module(model.config)`; the "transformer.*" entries without the prefix load
    into a bare `torch.nn.Transformer`."""
    import torch

    if not isinstance(model, Seq2SeqTransformer):
        raise ValueError(f"model must be a Seq2SeqTransformer, got {type(model).__name__}")
    state = {_torch_name(n): torch.from_numpy(np.array(a)) for n, a in model.state_dict().items()}
    if model.config.tie_embeddings:
        state["lm_head.weight"] = state["tgt_embed.weight"]
    return state


def seq2seq_from_torch_state_dict(model, state):
    """Copy a state dict made for `torch_seq2seq_module(model.config)` into `model`."""
    arrays = {}
    for name, t in state.items():
        if model.config.tie_embeddings and name == "lm_head.weight":
            continue
        ours = name.removeprefix(TORCH_PREFIX)
        arrays[ours] = t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)
    model.load_state_dict(arrays)


def torch_seq2seq_module(config):
    """A torch.nn.Module computing what Seq2SeqTransformer(config) computes when dropout is 0
    (torch applies dropout in more places), with the state-dict names of this module's docstring.
    forward(src_ids, src_mask, tgt_in, tgt_mask) takes int64 tensors (masks 1 = token,
    0 = padding, or None) and returns logits."""
    import torch
    from torch import nn

    if not isinstance(config, Seq2SeqConfig):
        raise ValueError(f"config must be a Seq2SeqConfig, got {type(config).__name__}")

    class TorchSeq2Seq(nn.Module):
        def __init__(self, c):
            super().__init__()
            C = c.d_model
            self.config = c
            self.src_embed = nn.Embedding(c.src_vocab_size, C)
            self.tgt_embed = nn.Embedding(c.tgt_vocab_size, C)
            if c.positions == "learned":
                self.src_pos_embed = nn.Embedding(c.max_src_len, C)
                self.tgt_pos_embed = nn.Embedding(c.max_tgt_len, C)
            else:
                table = sinusoidal_table(max(c.max_src_len, c.max_tgt_len), C, np.float32)
                self.register_buffer("pos_table", torch.from_numpy(table), persistent=False)
            with warnings.catch_warnings():  # torch notes that pre-LN disables its nested tensors
                warnings.filterwarnings("ignore", message="enable_nested_tensor")
                self.transformer = nn.Transformer(C, c.n_heads, c.n_encoder_layers, c.n_decoder_layers,
                                                  c.d_ff, dropout=c.dropout, activation=c.activation,
                                                  batch_first=True, norm_first=c.norm_first)
            self.lm_head = nn.Linear(C, c.tgt_vocab_size, bias=False)
            if c.tie_embeddings:
                self.lm_head.weight = self.tgt_embed.weight
            self.drop = nn.Dropout(c.dropout)

        def _embed(self, ids, side):
            L = ids.shape[1]
            tok = getattr(self, side + "_embed")(ids) * self.config.d_model ** 0.5
            if self.config.positions == "learned":
                pos = getattr(self, side + "_pos_embed").weight[:L]
            else:
                pos = self.pos_table[:L].to(tok.dtype)
            return self.drop(tok + pos)

        def forward(self, src_ids, src_mask, tgt_in, tgt_mask):
            T = tgt_in.shape[1]
            causal = torch.triu(torch.ones(T, T, dtype=torch.bool, device=tgt_in.device), diagonal=1)
            src_kpm = None if src_mask is None else src_mask == 0
            tgt_kpm = None if tgt_mask is None else tgt_mask == 0
            h = self.transformer(self._embed(src_ids, "src"), self._embed(tgt_in, "tgt"), tgt_mask=causal,
                                 src_key_padding_mask=src_kpm, tgt_key_padding_mask=tgt_kpm,
                                 memory_key_padding_mask=src_kpm)
            return self.lm_head(h)

    return TorchSeq2Seq(config)
