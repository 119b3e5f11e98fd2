"""The rivals' side of compare_decode.py: transformers' `generate` and CTranslate2's `Generator`,
each in a process of its own that never imports fastformer.

The parent writes into a directory: fastformer's Hugging Face export of the model (hf/, with a
tokenizer whose id i is one token string), the prompt (prompt.npy, (1, P) ids) and fastformer's
logits of it (logits.npy), and spec.json (new_tokens, rows, sampled: greedy, or that many sampled
sequences of the one prompt, top_k). `convert` turns hf/ into a CTranslate2 model (ct2/) with
ctranslate2.converters.TransformersConverter, in a process of its own too (it imports torch and
transformers, which the CTranslate2 contenders' processes do not).

    python benchmarks/decode_contenders.py convert INPUTS
    python benchmarks/decode_contenders.py CONTENDER THREADS INPUTS   # started by compare_decode.py
"""

import json
import os
import sys

import numpy as np
from torch_contenders import read_spec, serve

CT2 = {"ctranslate2 fp32": "float32", "ctranslate2 int8": "int8"}  # contender -> its compute_type


def convert(inputs):
    """hf/ -> ct2/, the weights stored in float32 (each contender quantises at load)."""
    from ctranslate2.converters import TransformersConverter

    TransformersConverter(os.path.join(inputs, "hf")).convert(os.path.join(inputs, "ct2"), force=True)


def transformers_call(inputs, threads):
    """(generate function, {"logits_diff", "tokens"}): GPT2LMHeadModel.generate with the key/value
    cache, greedy, or `rows` sampled sequences of the prompt (num_return_sequences)."""
    import torch
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging

    torch.set_num_threads(threads)
    logging.disable_progress_bar()
    hf = GPT2LMHeadModel.from_pretrained(os.path.join(inputs, "hf"), local_files_only=True).eval()
    spec = read_spec(inputs)
    prompt = torch.from_numpy(np.load(os.path.join(inputs, "prompt.npy")))  # (1, P)
    options = dict(do_sample=True, temperature=1.0, top_k=spec["top_k"], num_return_sequences=spec["rows"]) \
        if spec["sampled"] else dict(do_sample=False)
    with torch.inference_mode():
        diff = float(np.abs(hf(prompt).logits[0].numpy() - np.load(os.path.join(inputs, "logits.npy"))).max())

    def fn():
        with torch.inference_mode():
            return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=spec["new_tokens"],
                               min_new_tokens=spec["new_tokens"], use_cache=True, pad_token_id=0, **options)

    tokens = fn()[0, prompt.shape[1]:].tolist()
    return fn, {"logits_diff": diff, "tokens": tokens}


def ctranslate2_call(contender, inputs, threads):
    """(generate function, {"tokens"}): ctranslate2.Generator greedy (sampling_topk=1) on one
    prompt, in the compute type of `contender`; the prompt forwarded at once (include_prompt_in_result
    False), no end token, so every call makes new_tokens tokens."""
    import ctranslate2

    model_dir = os.path.join(inputs, "ct2")
    with open(os.path.join(model_dir, "vocabulary.json"), encoding="utf-8") as f:
        vocab = json.load(f)  # id -> token string
    index = {t: i for i, t in enumerate(vocab)}
    spec = read_spec(inputs)
    prompt = [[vocab[i] for i in np.load(os.path.join(inputs, "prompt.npy"))[0]]]
    gen = ctranslate2.Generator(model_dir, device="cpu", compute_type=CT2[contender], intra_threads=threads,
                                inter_threads=1)

    def fn():
        return gen.generate_batch(prompt, max_length=spec["new_tokens"], min_length=spec["new_tokens"],
                                  sampling_topk=1, include_prompt_in_result=False, end_token=[])

    tokens = [index[t] for t in fn()[0].sequences[0]]
    return fn, {"tokens": tokens}


def main():
    if sys.argv[1] == "convert":
        return convert(sys.argv[2])
    contender, threads, inputs = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if contender == "transformers":
        return serve(lambda: transformers_call(inputs, threads))
    return serve(lambda: ctranslate2_call(contender, inputs, threads))


if __name__ == "__main__":
    main()
