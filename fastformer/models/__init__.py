"""Models assembled from the blocks of fastformer.nn: the GPT-2 language model (lm.py), the
encoder-decoder (seq2seq.py), their configs, and Hugging Face GPT-2 interchange (hf.py)."""
