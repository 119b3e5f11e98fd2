"""The layer below the models: parameters in one flat buffer (params.py), linear/dropout/head
reshapes (layers.py), Transformer blocks as forward/backward pairs (blocks.py), and the
key/value cache of decoding (cache.py). Everything runs on the kernel interface."""
