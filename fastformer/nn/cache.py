"""The key/value cache of decoding, one type for every model.

A decoding state holds, per decoder layer, the keys and values of the tokens fed so far, so a new
token costs one O(T) attention per layer instead of a forward over the whole sequence. For an
encoder-decoder it also holds the cross-attention keys and values of the encoder output,
computed once when decoding starts. Models fill it through `step(tokens, state)`; searches only
reorder its rows (`reorder`) when a beam continues from another beam's row.

    k, v            (L, B, H, Tmax, hs)  self-attention keys/values, filled up to `length`
    padding         (B, Tmax) bool       True at padded (left-padding) positions
    tokens          (B, Tmax) int64      the ids at the cached positions (for re-filling a window)
    next_position   (B,) int64           the position id the next token of each row takes
    cross_k, cross_v (L, B, H, S, hs)    encoder-decoder: keys/values of the encoder output
    cross_padding   (B, S) bool          encoder-decoder: True at source padding (or None)
    source          (B,) int64           which source each row's cross keys/values come from
"""

import numpy as np

from fastformer.errors import check_memory
from fastformer.kernels.checks import aligned_zeros


class KVCache:
    """Keys and values of every layer for B sequences of up to `max_len` positions."""

    def __init__(self, n_layers, batch_size, n_heads, max_len, head_size, dtype=np.float32, checked=False):
        """`checked`: the caller has checked the memory of decoding with it (a model's init_state,
        check_decoding_memory), so it is not read from the system again."""
        shape = (n_layers, batch_size, n_heads, max_len, head_size)
        if not checked:
            check_memory(f"a key/value cache of {batch_size:,} rows x {max_len:,} positions",  # k, v; tokens
                         2 * int(np.prod(shape, dtype=np.float64)) * np.dtype(dtype).itemsize
                         + 9 * batch_size * max_len, "decode fewer rows or beams at once")
        self.k = aligned_zeros(shape, dtype)  # (L, B, H, Tmax, hs)
        self.v = aligned_zeros(shape, dtype)
        self.padding = np.zeros((batch_size, max_len), dtype=bool)  # (B, Tmax)
        self.tokens = np.zeros((batch_size, max_len), dtype=np.int64)  # (B, Tmax)
        self.next_position = np.zeros(batch_size, dtype=np.int64)  # (B,)
        self.length = 0  # positions filled, the same for every row
        self.cross_k = self.cross_v = self.cross_padding = None
        self.source = np.arange(batch_size)
        self.use_cache = True  # False: the model runs a full forward each step (a reference path)

    @property
    def batch_size(self):
        return self.k.shape[1]

    @property
    def max_len(self):
        return self.k.shape[3]

    def reset(self):
        """Forget every cached position (the buffers are reused)."""
        self.padding[...] = False
        self.next_position[...] = 0
        self.length = 0

    def reorder(self, rows):
        """Row r continues from row rows[r] (beam search: each beam from its parent). Cross-
        attention keys and values are gathered only when a row takes another source's."""
        rows = np.asarray(rows, dtype=np.int64)
        n = self.length
        self.k[:, :, :, :n] = self.k[:, rows, :, :n]
        self.v[:, :, :, :n] = self.v[:, rows, :, :n]
        self.padding[...] = self.padding[rows]
        self.tokens[...] = self.tokens[rows]
        self.next_position[...] = self.next_position[rows]
        source = self.source[rows]
        if self.cross_k is not None and not np.array_equal(source, self.source):
            self.cross_k[...] = self.cross_k[:, rows]
            self.cross_v[...] = self.cross_v[:, rows]
            if self.cross_padding is not None:
                self.cross_padding[...] = self.cross_padding[rows]
        self.source = source
