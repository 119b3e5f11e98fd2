"""Language-model evaluation: loss, perplexity, bits per byte and next-token accuracy over fixed
windows of a token stream -- the same numbers for the trainer's validation and `fastformer eval`.

Bits per byte divides the total loss by the UTF-8 bytes of the predicted tokens,

    bpb = sum of -ln p(target) / (ln 2 * sum of bytes(target)),

so models with different tokenizers compare on the same footing: a tokenizer with longer tokens
has a higher loss per token but as many bytes to spread it over. `bytes(target)` comes from the
tokenizer's `byte_lengths()` table (special tokens count 0 bytes), which needs no decoding and
works on memory-mapped token files.
"""

import math

from .data import eval_batches
from .kernels import get_ops


def evaluate_lm(model, ids, batch_size, seq_len, max_batches=None, byte_lengths=None):
    """Metrics of `model` on non-overlapping windows of T + 1 tokens evenly spread over `ids`.

    Args:
        ids: 1-D token stream (any integer dtype, e.g. a np.memmap).
        max_batches: at most this many batches of `batch_size` windows; None covers the whole
            stream (every complete window).
        byte_lengths: (V,) bytes per id; without it, "bits_per_byte" is left out.
    Returns {"loss", "ppl", "acc", "tokens"} and, with byte_lengths, {"bytes", "bits_per_byte"}.
    Deterministic: the same windows every time, no random generator.
    """
    n_windows = (len(ids) - 1) // seq_len
    if n_windows < 1:
        raise ValueError(f"the evaluation text has {len(ids)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    if max_batches is None:
        max_batches = -(-n_windows // batch_size)
    if max_batches < 1:
        raise ValueError(f"max_batches must be >= 1, got {max_batches}")
    ops = get_ops()
    total_loss, correct, n, n_bytes = 0.0, 0, 0, 0
    for x, y in eval_batches(ids, batch_size, seq_len, max_batches):
        logits = model.forward(x)  # (b, T, V), inference mode
        loss, _ = ops.cross_entropy_forward(logits, y)
        total_loss += float(loss) * y.size
        correct += int((logits.argmax(axis=-1) == y).sum())
        n += y.size
        if byte_lengths is not None:
            n_bytes += int(byte_lengths[y].sum())
    loss = total_loss / n
    out = {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "acc": correct / n, "tokens": n}
    if byte_lengths is not None:
        out["bytes"] = n_bytes
        out["bits_per_byte"] = total_loss / (math.log(2) * n_bytes) if n_bytes else float("nan")
    return out
