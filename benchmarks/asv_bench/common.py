"""What the asv benchmark classes share: the parameter grid and a rate measured in one call."""

import time

import numpy as np

BACKENDS = ["numpy", "numba"]
PRESETS = ["tiny", "small", "medium"]


def calls_per_second(fn, min_calls=3, max_calls=20, budget_s=3.0):
    """1 / the median time of fn() over at least `min_calls` calls, and more while the budget
    lasts (up to `max_calls`), so a 5-second NumPy step is timed 3 times and a Numba one 20."""
    times, start = [], time.perf_counter()
    while len(times) < min_calls or (len(times) < max_calls and time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1.0 / float(np.median(times))
