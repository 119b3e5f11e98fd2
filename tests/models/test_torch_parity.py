"""TransformerLM against an independent PyTorch GPT-2 with the same weights: logits and every
parameter's gradient. Skips when torch is not installed."""

import numpy as np
import pytest

from fastformer import LMConfig, TransformerLM

torch = pytest.importorskip("torch")
from torch_gpt2 import gpt2_forward  # noqa: E402


def _max_rel_err(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_logits_and_gradients_match_pytorch(backend, tie, padded):
    cfg = LMConfig(vocab_size=97, max_seq_len=32, d_model=48, n_heads=4, d_ff=96, n_layers=3, tie_embeddings=tie)
    model = TransformerLM(cfg, seed=0)
    rng = np.random.default_rng(0)
    model.flat.data[:] += rng.normal(0, 0.05, size=model.flat.size).astype(np.float32)  # away from the init
    B, T = 3, 20
    ids = rng.integers(0, cfg.vocab_size, size=(B, T))
    targets = rng.integers(0, cfg.vocab_size, size=(B, T))
    targets[0, :3] = -100
    mask = None
    if padded:
        mask = np.ones((B, T), dtype=np.int64)
        mask[1, :5] = 0
        mask[2, :T - 1] = 0  # all but the last token padded
        targets[mask == 0] = -100

    logits = model.forward(ids, attention_mask=mask)
    loss, grads = model.loss_and_grads(ids, targets, attention_mask=mask)

    sd = {k: torch.tensor(v, requires_grad=True) for k, v in model.state_dict().items()}
    t_logits = gpt2_forward(sd, torch.tensor(ids), cfg.n_heads, cfg.n_layers,
                            None if mask is None else torch.tensor(mask), tie=tie)
    t_loss = torch.nn.functional.cross_entropy(t_logits.reshape(-1, cfg.vocab_size),
                                               torch.tensor(targets).reshape(-1), ignore_index=-100)
    t_loss.backward()

    assert np.abs(logits - t_logits.detach().numpy()).max() <= 1e-4
    assert abs(loss - t_loss.item()) <= 1e-5
    for name, g in grads.items():
        err = _max_rel_err(g, sd[name].grad.numpy())
        assert err <= 1e-4, (name, err)
