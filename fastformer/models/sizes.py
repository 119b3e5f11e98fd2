"""Model shapes within a parameter budget (`fastformer info --params 2M-3M`): a sweep over widths
and depths, each shape counted exactly from its config (count_parameters), nothing allocated."""

import dataclasses

from fastformer.models.config import count_parameters

BUDGET_WIDTHS = (*range(32, 512, 32), *range(512, 1024, 64), *range(1024, 2049, 128))
BUDGET_DEPTHS = range(1, 25)
BUDGET_ASPECT = (16, 256)  # d_model / depth: the shapes between are all reasonable; outside, too deep or too wide


def default_heads(d_model):
    """Heads of about 64 dimensions (GPT-2's head size), a divisor of d_model."""
    h = max(1, round(d_model / 64))
    while d_model % h:
        h -= 1
    return h


def configs_in_budget(model, low, high, pinned=()):
    """Model configs like `model` (an LMConfig or Seq2SeqConfig) whose exact parameter count lies
    in [low, high], sorted by count: width and depth (the config's `size_keys`) swept over
    BUDGET_WIDTHS x BUDGET_DEPTHS with d_model / depth in BUDGET_ASPECT (the `tied_depth_keys`
    follow the depth: a seq2seq model gets as many decoder as encoder layers), d_ff = 4 d_model
    and heads of about 64 dimensions, except the fields named in `pinned`, which keep `model`'s
    values (and are not held to the aspect range).
    Returns [(count, config)]."""
    width_key, depth_key, heads_key, ff_key = model.size_keys
    widths = [getattr(model, width_key)] if width_key in pinned else BUDGET_WIDTHS
    depths = [getattr(model, depth_key)] if depth_key in pinned else BUDGET_DEPTHS
    found = []
    for C in widths:
        heads = getattr(model, heads_key) if heads_key in pinned else default_heads(C)
        if C % heads:
            continue
        for L in depths:
            if not ({width_key, depth_key} & set(pinned) or BUDGET_ASPECT[0] <= C / L <= BUDGET_ASPECT[1]):
                continue
            change = {width_key: C, depth_key: L, heads_key: heads,
                      ff_key: getattr(model, ff_key) if ff_key in pinned else 4 * C}
            change.update({key: L for key in model.tied_depth_keys if key not in pinned})
            cfg = dataclasses.replace(model, **change)
            n = count_parameters(cfg)
            if low <= n <= high:
                found.append((n, cfg))
    return sorted(found, key=lambda nc: (nc[0], nc[1].d_model))
