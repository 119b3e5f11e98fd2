"""An independent GPT-2 in PyTorch (autograd), for parity tests only. Takes fastformer / Hugging
Face GPT-2 state dicts: Conv1D weights stored (in, out)."""

import math

import torch
import torch.nn.functional as F


def gpt2_forward(sd, ids, n_heads, n_layers, attention_mask=None, tie=True):
    """Logits (B, T, V) of GPT-2 with parameters `sd` ({name: torch tensor})."""
    B, T = ids.shape
    x = sd["transformer.wte.weight"][ids] + sd["transformer.wpe.weight"][:T]
    C = x.shape[-1]
    hs = C // n_heads
    allowed = torch.tril(torch.ones(T, T, dtype=torch.bool))[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]
    for i in range(n_layers):
        p = f"transformer.h.{i}."
        h = F.layer_norm(x, (C,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], eps=1e-5)
        qkv = h @ sd[p + "attn.c_attn.weight"] + sd[p + "attn.c_attn.bias"]
        q, k, v = (t.view(B, T, n_heads, hs).transpose(1, 2) for t in qkv.split(C, dim=-1))
        s = (q @ k.transpose(-1, -2)) / math.sqrt(hs)
        s = s.masked_fill(~allowed, float("-inf"))
        att = torch.softmax(s, dim=-1).nan_to_num(0.0)  # fully masked rows -> 0
        a = (att @ v).transpose(1, 2).reshape(B, T, C)
        x = x + a @ sd[p + "attn.c_proj.weight"] + sd[p + "attn.c_proj.bias"]
        h = F.layer_norm(x, (C,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], eps=1e-5)
        f = F.gelu(h @ sd[p + "mlp.c_fc.weight"] + sd[p + "mlp.c_fc.bias"], approximate="tanh")
        x = x + f @ sd[p + "mlp.c_proj.weight"] + sd[p + "mlp.c_proj.bias"]
    x = F.layer_norm(x, (C,), sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"], eps=1e-5)
    head = sd["transformer.wte.weight"] if tie else sd["lm_head.weight"]
    return x @ head.T
