"""Gradient accumulation: the loss and gradient of one optimizer step's batch, computed in
micro-batches of fewer rows, one after another (nanoGPT's gradient_accumulation_steps), so that
only one micro-batch's activations -- the (B, T, V) logits first among them -- are alive at a time.

A model's `loss_and_grads` returns the MEAN cross-entropy over its batch's counted targets
(target != -100) and overwrites `model.flat.grad`. Over the step's batch of N counted tokens the
mean is not the mean of the micro-batches' means once their counts n_i differ (padded
source/target pairs); it is their sum weighted by n_i / N:

    loss = sum_i (n_i / N) loss_i          grad = sum_i (n_i / N) grad_i

So each micro-batch goes through the unchanged model API, its gradient is scaled by n_i / N in
`flat.grad` and added into an accumulation buffer of the same flat layout, and the sum is copied
back into `flat.grad`, where clipping and the optimizer read it. The models keep their API; the
cost is one buffer of the parameters' size. With one micro-batch nothing of this runs: the step
is the model's own call, bit for bit the step without accumulation. A data-parallel run would
weight each rank's gradient the same way, by its counted tokens over the global count.
"""

import numpy as np

from fastformer.kernels import IGNORE_INDEX


def batch_rows(batch, i, k):
    """The i-th of k contiguous row slices (views) of `batch` (a dict of arrays whose first axis
    is the batch, B rows): rows [i B // k, (i + 1) B // k), empty when B < k leaves it none."""
    B = len(batch["targets"])
    lo, hi = i * B // k, (i + 1) * B // k
    return {name: a[lo:hi] for name, a in batch.items()}


def split_batch(batch, k):
    """The micro-batches of `batch`: its k row slices (`batch_rows`) of B // k or B // k + 1 rows,
    in order. Fewer than k, none empty, when B < k (the short last batch of an epoch of pairs)."""
    parts = [batch_rows(batch, i, k) for i in range(k)]
    return [part for part in parts if len(part["targets"])]


def counted_tokens(targets):
    """The number of targets the loss counts (those != -100)."""
    return int(np.count_nonzero(targets != IGNORE_INDEX))


def accumulated_loss_and_grads(model, batch, k, buffer=None, total=None):
    """The loss over every counted target of `batch`, with its gradient left in
    `model.flat.grad`, from `model.loss_and_grads` on k micro-batches (`split_batch`) in turn.

    Args:
        model: a TransformerLM or Seq2SeqTransformer; its dropout generator advances once per
            micro-batch, in order.
        batch: keyword arguments for `model.loss_and_grads` (a task's `next_batch()`).
        k: micro-batches (train.grad_accum_steps); 1 (with `total` None) is the model's single call.
        buffer: an array like `model.flat.grad` to accumulate in (made when None and needed).
        total: the counted targets the mean is over; None is the batch's own. A data-parallel
            rank passes the global batch's count, so that summing the ranks' results gives the
            global mean.
    Returns:
        loss: float, the batch's summed cross-entropy over `total` (its mean when total is None;
            0.0 if no target is counted).
    """
    if k == 1 and total is None:
        loss, _ = model.loss_and_grads(**batch)
        return loss
    grad = model.flat.grad
    parts = split_batch(batch, k)
    counts = [counted_tokens(p["targets"]) for p in parts]
    total = sum(counts) if total is None else total
    acc = None
    if len(parts) > 1:
        acc = np.empty_like(grad) if buffer is None else buffer
    loss = 0.0
    for i, (part, n) in enumerate(zip(parts, counts)):
        w = n / total if total else 0.0  # this micro-batch's share of the counted tokens
        part_loss, _ = model.loss_and_grads(**part)  # mean over its n tokens; overwrites flat.grad
        loss += w * part_loss
        grad *= w
        if acc is None:
            continue  # one micro-batch: its scaled gradient is the result, in place
        if i == 0:
            acc[...] = grad
        else:
            acc += grad
    if acc is not None:
        grad[...] = acc
    return loss
