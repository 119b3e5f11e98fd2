"""Corpus BLEU-4 (Papineni et al. 2002): sacrebleu when it is installed, else the implementation
here, which computes what sacrebleu computes on text that is already tokenized.

Two figures: `corpus_bleu` scores the decoded tokens against the references tokenized the same
way (what the trainer logs as val_bleu); `detokenized_bleu` is the standard, comparable one --
sacrebleu's own 13a tokenization of detokenized hypotheses and the references as written.

    p_n  = sum over sentences of clipped n-gram matches / sum of hypothesis n-grams, n = 1..4
    BP   = 1 if c > r else exp(1 - r / c)      c, r: total hypothesis and reference lengths
    BLEU = 100 * BP * exp(mean_n log p_n)

An n-gram order with no match at all is smoothed as sacrebleu's default ("exp") does: its
precision becomes 1 / (2^k * total) for the k-th such order. Tokens are whitespace-separated.
"""

import math
from collections import Counter

from fastformer.errors import FastformerError


def _ngrams(tokens, n):
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _check_one_reference_each(hypotheses, references):
    if len(hypotheses) != len(references):
        raise FastformerError(f"need one reference per hypothesis, got {len(hypotheses)} hypotheses "
                              f"and {len(references)} references")


def bleu_stats(hypotheses, references, max_n=4):
    """Sufficient statistics: (matches[n], totals[n] for n = 1..max_n, hyp_len, ref_len)."""
    _check_one_reference_each(hypotheses, references)
    matches, totals = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, ref in zip(hypotheses, references):
        h, r = hyp.split(), ref.split()
        hyp_len += len(h)
        ref_len += len(r)
        for n in range(1, max_n + 1):
            hn, rn = _ngrams(h, n), _ngrams(r, n)
            matches[n - 1] += sum(min(c, rn[g]) for g, c in hn.items())
            totals[n - 1] += max(len(h) - n + 1, 0)
    return matches, totals, hyp_len, ref_len


def own_corpus_bleu(hypotheses, references, max_n=4):
    """Corpus BLEU in [0, 100] of tokenized hypothesis strings against one reference each."""
    matches, totals, c, r = bleu_stats(hypotheses, references, max_n)
    if c == 0:
        return 0.0
    log_p, k = 0.0, 0
    for m, t in zip(matches, totals):
        if t == 0:
            return 0.0  # hypotheses too short for this order
        if m == 0:
            k += 1
            log_p += math.log(1.0 / (2 ** k * t))
        else:
            log_p += math.log(m / t)
    bp = 1.0 if c > r else math.exp(1.0 - r / c)
    return 100.0 * bp * math.exp(log_p / max_n)


def corpus_bleu(hypotheses, references):
    """Corpus BLEU-4 in [0, 100]: sacrebleu's (its default 13a tokenization) when installed,
    else `own_corpus_bleu` on whitespace tokens. Returns (score, "sacrebleu" | "fastformer")."""
    try:
        import sacrebleu
    except ImportError:
        return own_corpus_bleu(hypotheses, references), "fastformer"
    # force: the texts are tokenized on purpose (decoded word tokens), so no warning about it
    return sacrebleu.corpus_bleu(list(hypotheses), [list(references)], force=True).score, "sacrebleu"


def detokenized_bleu(hypotheses, references):
    """sacrebleu's standard corpus BLEU of detokenized hypotheses against the references as they
    are written (its default 13a tokenization); None when sacrebleu is not installed."""
    _check_one_reference_each(hypotheses, references)
    try:
        import sacrebleu
    except ImportError:
        return None
    return sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score
