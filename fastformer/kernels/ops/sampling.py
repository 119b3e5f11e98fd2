"""Drawing the next ids from last-position logits: temperature, top-k, top-p, inverse-CDF sampling.
Its checks, the NumPy reference, the Numba kernel.

For each row n of logits (N, V) and its uniform draw u[n] in [0, 1):

    z = logits / temperature                      (float64)
    top_k   keep the ids whose z is at least the k-th largest z of the row: every id tied
            with the k-th is kept, so the result never depends on id order
    p = softmax(z) over the kept ids              (the others get exactly 0)
    top_p   keep the smallest set of most probable ids whose mass reaches top_p (ties in
            probability go to the lower id), renormalised
    id      the first id whose cumulative probability exceeds u * (the total), never an id
            without mass

Logits are finite or -inf (a masked id), with at least one finite id a row: NaN, +inf and a row
with every id masked are refused on both backends.

The reference sorts nothing but passes over every id several times in float64 (a partition,
exp, cumsum), which at a few rows of a large vocabulary costs as much as the model's decoding
step. The kernel (sample_row) finds the k-th largest logit with a min-heap of k values, which
sees only the blocks of ids whose largest logit can reach it, gathers the kept ids, and takes exp
and the cumulative sum over them alone. Its exp is a polynomial within 1 ulp of libm's, and its
float64 sums run in another order than NumPy's, so an id can differ from the reference's only
when u falls within rounding of a boundary between two ids. top-p sorts the kept ids: the
kernel leaves it to the reference. The fused decoding kernels (gpt2_decode_sampled) draw with
sample_row too, so a generation draws the same ids in one call as step by step.
"""

import numpy as np

from fastformer.errors import FastformerError, check_int, check_number
from fastformer.kernels._jit import exp_nonpositive64, inline, kernel, prange, row_max, sized
from fastformer.kernels.checks import describe, kernel_array, quiet


# ------------------------------------------------------------------- checks
def sample_inputs(logits, u, temperature, top_k, top_p):
    """(logits (N, V), u (N,) float64), checked with the options."""
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.dtype not in (np.float32, np.float64) or logits.shape[1] == 0:
        raise FastformerError(f"logits must be a float32 or float64 array (rows, vocabulary), got {describe(logits)}")
    u = np.asarray(u)
    if u.dtype.kind not in "fiu" or u.shape != logits.shape[:1]:
        raise FastformerError(f"u must be a float array of one uniform draw per row of logits, shape "
                              f"({logits.shape[0]},), got {describe(u)}")
    u = uniform_draws(u)
    top = logits.max(axis=1)  # NaN where a row holds one
    bad = ~np.isfinite(top)
    if bad.any():
        n = int(np.argmax(bad))
        what = "a NaN" if np.isnan(top[n]) else "+inf" if top[n] > 0 else "-inf at every id"
        raise FastformerError(f"logits must be finite or -inf (a masked id) with one finite id a row at least, "
                              f"got {what} in row {n}")
    check_sampling_options(temperature, top_k, top_p)
    return kernel_array(logits), kernel_array(u)


def uniform_draws(u):
    """u (a float or integer array already of its shape) as float64, each draw checked to lie in
    [0, 1)."""
    u = np.ascontiguousarray(u, dtype=np.float64)
    if not ((u >= 0) & (u < 1)).all():  # NaN fails both
        raise FastformerError(f"u must hold uniform draws in [0, 1), got {float(u[~((u >= 0) & (u < 1))][0])}")
    return u


def check_sampling_options(temperature, top_k, top_p=None):
    """A draw's options: temperature > 0 and finite, top_k an integer >= 1, top_p in (0, 1]."""
    check_number("temperature", temperature, 0, low_open=True, finite=True)
    if top_k is not None:
        check_int("top_k", top_k)
    if top_p is not None:
        check_number("top_p", top_p, 0, 1, low_open=True)


# ---------------------------------------------------------------- reference
def filter_top_k(logits, k):
    """Logits (..., V) with every entry below the k-th largest of its row set to -inf."""
    V = logits.shape[-1]
    check_int("top_k", k)
    if k >= V:
        return logits
    kth = np.partition(logits, V - k, axis=-1)[..., V - k:V - k + 1]  # (..., 1)
    return np.where(logits >= kth, logits, -np.inf)


def filter_top_p(probs, p):
    """Probabilities (..., V) restricted to the smallest set of most probable tokens whose total
    reaches p, renormalised. Ties in probability are broken by lower id."""
    check_number("top_p", p, 0, 1, low_open=True)
    order = np.argsort(-probs, axis=-1, kind="stable")  # (..., V) most probable first
    sorted_p = np.take_along_axis(probs, order, axis=-1)
    cum = np.cumsum(sorted_p, axis=-1)
    # keep sorted position j while the mass before it is still short of p
    keep_sorted = (cum - sorted_p) < p * (1.0 - 1e-12)
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    out = np.where(keep, probs, 0.0)
    return out / out.sum(axis=-1, keepdims=True)


def next_token_probs(logits, temperature, top_k=None, top_p=None):
    """The sampling distribution (B, V) float64 for last-position logits (B, V), temperature > 0."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    if top_k is not None:
        z = filter_top_k(z, top_k)
    z = z - z.max(axis=-1, keepdims=True)
    probs = np.exp(z)
    probs /= probs.sum(axis=-1, keepdims=True)
    if top_p is not None:
        probs = filter_top_p(probs, top_p)
    return probs


@quiet
def sample_ids(ops, logits, u, temperature, top_k=None, top_p=None):
    """The ids (N,) int64 drawn from logits (N, V) with the uniform draws u (N,) in [0, 1)."""
    logits, u = sample_inputs(logits, u, temperature, top_k, top_p)
    probs = next_token_probs(logits, temperature, top_k, top_p)  # (N, V)
    # inverse CDF: count the ids whose cumulative mass is at most u; `<=` steps over zero-mass ids
    cdf = np.cumsum(probs, axis=-1)  # (N, V)
    idx = (cdf <= u[:, None] * cdf[:, -1:]).sum(axis=-1)
    last = probs.shape[-1] - 1 - np.argmax(probs[:, ::-1] > 0, axis=-1)  # the last id with mass
    return np.minimum(idx, last).astype(np.int64)


# -------------------------------------------------------------------- Numba
PARALLEL_ROWS = 8  # rows from which the draws run side by side on the threads


@inline
def _sift_down(heap, i, k):
    """Restore the min-heap order of heap[0:k] below position i."""
    x = heap[i]
    while True:
        c = 2 * i + 1
        if c >= k:
            break
        if c + 1 < k and heap[c + 1] < heap[c]:
            c += 1
        if heap[c] >= x:
            break
        heap[i] = heap[c]
        i = c
    heap[i] = x


@inline
def _kth_largest(z, at, n, k, heap):
    """The k-th largest of z[at[:n]] (counting repeated values), 0 < k <= n: the smallest of a
    min-heap of the k largest seen so far, which most values fail to enter after the first few."""
    for i in range(k):
        heap[i] = z[at[i]]
    for i in range(k // 2 - 1, -1, -1):
        _sift_down(heap, i, k)
    for i in range(k, n):
        if z[at[i]] > heap[0]:
            heap[0] = z[at[i]]
            _sift_down(heap, 0, k)
    return heap[0]


BLOCK = 16  # ids a block of a row: the passes after the first skip the blocks whose largest logit is too small
BISECTIONS = 24  # halvings of the range of the blocks' largest logits in _lower_bound


@inline
def _lower_bound(top, nb, k):
    """A value t such that at least k of top[:nb] (the blocks' largest logits) are >= t, near the
    k-th largest of them: -inf when fewer than k are finite. By bisection, each step a count that
    vectorises, where a heap of the k largest was slow: its every step a branch that the values
    decide."""
    if k > nb:
        return -np.inf
    lo, hi, finite = np.inf, -np.inf, 0
    for b in range(nb):
        if top[b] > -np.inf:
            lo = min(lo, top[b])
            hi = max(hi, top[b])
            finite += 1
    if finite < k:
        return -np.inf
    for _ in range(BISECTIONS):  # at least k values are >= lo throughout
        mid = lo + (hi - lo) * 0.5
        n = 0
        for b in range(nb):
            n += top[b] >= mid
        if n >= k:
            lo = mid
        else:
            hi = mid
    return lo


@inline
def sample_row(y, u, temperature, top_k, z, kept, heap):
    """The id drawn from one row of logits y (V,) with the uniform draw u, as the reference draws
    it; z, kept (V,) float64 and int64 and heap (>= top_k,) float64 are scratch; top_k <= V.

    Dividing by the temperature keeps the logits' order and ties (a quotient's rounding in float64
    is far finer than the gaps between float32 values), so the k-th largest and the kept ids are
    found on y itself, and z = y / temperature is taken for the kept ids alone. The first pass
    takes each block's largest logit: k blocks whose largest is at least a bound hold k logits at
    least that large, so no logit below it can be the k-th largest of the row, and the heap sees
    the few blocks that reach it. The draw then walks the kept ids a block's sum at a time, and id
    by id in the block where the sum passes u * total. This replaces a heap fed every id, whose
    steps branch on the values, and libm's exp, a scalar call that keeps a loop from vectorising."""
    V = y.shape[0]
    nb = (V + BLOCK - 1) // BLOCK
    for b in range(nb):  # z[:nb]: the blocks' largest logits
        top = y[b * BLOCK]
        for j in range(b * BLOCK + 1, min(V, b * BLOCK + BLOCK)):
            top = max(top, y[j])
        z[b] = top
    m = np.float64(row_max(z[:nb], nb)) / temperature  # the largest z
    kth = -np.inf
    if top_k < V:
        bound = _lower_bound(z, nb, top_k)
        n = 0  # the ids at least `bound`, into kept
        for b in range(nb):
            if z[b] >= bound:
                for j in range(b * BLOCK, min(V, b * BLOCK + BLOCK)):  # without a branch
                    kept[n] = j
                    n += y[j] >= bound
        kth = _kth_largest(y, kept, n, top_k, heap)
    nk = 0  # the ids that stay, in id order, into kept: the sums below run over them alone
    for b in range(nb):
        if z[b] >= kth:
            for j in range(b * BLOCK, min(V, b * BLOCK + BLOCK)):
                kept[nk] = j
                nk += y[j] >= kth
    total = 0.0
    if nk == V:  # every id kept (no top-k): a loop without the gather through kept, which vectorises
        for i in range(V):
            z[i] = exp_nonpositive64(np.float64(y[i]) / temperature - m)
            total += z[i]
    else:
        for i in range(nk):  # z[i]: the unnormalised probability of kept[i]
            z[i] = exp_nonpositive64(np.float64(y[kept[i]]) / temperature - m)
            total += z[i]
    limit = u * total
    cum = 0.0
    i = 0
    while i + BLOCK <= nk:  # whole blocks while the running sum stays within the limit: one add a block
        mass = 0.0
        for j in range(i, i + BLOCK):
            mass += z[j]
        if cum + mass > limit:
            break
        cum += mass
        i += BLOCK
    while i < nk:  # then id by id: the first with mass that takes the sum past the limit
        if z[i] > 0.0:
            cum += z[i]
            if cum > limit:
                return kept[i]
        i += 1
    last = nk - 1  # the last id with mass: where rounding leaves u * total past the end
    while last > 0 and z[last] == 0.0:
        last -= 1
    return kept[last]


@inline
def samplable(y):
    """Whether the row of logits y (V,) can be drawn from: no NaN, no +inf, a finite id at least
    (what sample_inputs refuses otherwise)."""
    bad = 0
    finite = 0
    for j in range(y.shape[0]):  # both counts in one pass that vectorises
        bad += not (y[j] < np.inf)  # NaN or +inf
        finite += y[j] > -np.inf
    return bad == 0 and finite > 0


@kernel("void(R[:, ::1], readonly(float64)[::1], float64, int64, int64[::1])", serial_twin=True)
def _sample_rows(logits, u, temperature, top_k, ids):
    N, V = logits.shape
    for n in prange(N):
        ids[n] = sample_row(logits[n], u[n], temperature, top_k, np.empty(V, np.float64), np.empty(V, np.int64),
                            np.empty(top_k, np.float64))


def sample_ids_numba(ops, logits, u, temperature, top_k=None, top_p=None):
    """As the reference; top-p runs the reference."""
    logits, u = sample_inputs(logits, u, temperature, top_k, top_p)
    if top_p is not None or logits.shape[0] == 0:
        return sample_ids(ops, logits, u, temperature, top_k, top_p)
    V = logits.shape[1]
    ids = np.empty(logits.shape[0], np.int64)
    # a row costs a fraction of starting the threads: rows side by side from PARALLEL_ROWS
    sized(_sample_rows, logits.shape[0], small=PARALLEL_ROWS)(logits, u, float(temperature),
                                                             V if top_k is None else min(top_k, V), ids)
    return ids
