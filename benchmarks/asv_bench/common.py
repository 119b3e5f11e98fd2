"""What the asv benchmark classes share: the parameter grid and a rate measured in one call."""

import time

import numpy as np

from fastformer.training.config import PRESETS as _PRESETS

BACKENDS = ["numpy", "numba"]
PRESETS = list(_PRESETS)  # the LM presets of fastformer.training.config


def calls_per_second(fn, max_calls=20, budget_s=3.0):
    """1 / the median time of fn() over one call, and more while the budget lasts (up to
    `max_calls`): a NumPy step on medium, seconds long, is timed once, a Numba one 20 times."""
    times, start = [], time.perf_counter()
    while not times or (len(times) < max_calls and time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1.0 / float(np.median(times))
