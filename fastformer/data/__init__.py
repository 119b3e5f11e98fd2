"""Data: tokenizers (byte, char, word, BPE), text windows and the embedded default corpus,
memory-mapped prepared corpora, public datasets, and translation pairs with synthetic tasks.
Nothing here knows about models."""
