"""Caption metrics: corpus BLEU-1..4 (Papineni et al. 2002) and CIDEr-D (Vedantam et al. 2015), plain Python.

Inputs are tokenised captions (lists of words); :func:`caption_words` gives the tokenisation used for both
hypotheses and references (lower-cased, punctuation removed, as the COCO caption evaluation's PTB tokenisation
leaves them for these metrics).

BLEU (corpus level, as the COCO evaluation reports it): for n = 1..4, clipped n-gram matches (each hypothesis
n-gram counted at most as often as in the reference that has it most) and hypothesis n-gram counts are summed over
the WHOLE corpus, p_n = matches_n / total_n; BLEU-N = BP * exp(mean_{n<=N} log p_n) with the brevity penalty
BP = 1 if c > r else exp(1 - r / c), c = total hypothesis length, r = sum over sentences of the reference length
closest to the hypothesis length (ties: the shorter). No smoothing: BLEU-N is 0 when some p_n (n <= N) is 0.

CIDEr-D (the COCO variant): n-grams n = 1..4 of a sentence weighted by tf-idf, tf = the n-gram's count in the
sentence, idf = log(|I|) - log(max(1, df)), |I| = number of images, df = number of images whose reference SET
contains the n-gram (computed over the references given, i.e. the evaluated split). For hypothesis h and reference
s, per n: sim_n = sum_g min(v_h[g], v_s[g]) * v_s[g] / (|v_h| |v_s|) (0 when a norm is 0), times the Gaussian
length penalty exp(-(l_h - l_s)^2 / (2 sigma^2)), sigma = 6, where l is the sentence's bigram count (its length
minus one, as the COCO code counts it). Image score = 10 * mean_n (mean_s sim_n(h, s)); CIDEr-D = mean over images.
"""

from __future__ import annotations

import math
import string
from collections import Counter
from collections.abc import Sequence

__all__ = ["caption_words", "cider_d", "corpus_bleu", "ngram_counts"]

_PUNCT = set(string.punctuation)


def caption_words(text: str) -> list[str]:
    """Lower-cased words of ``text`` with punctuation removed (``"A red cup, left."`` -> ``['a', 'red', 'cup',
    'left']``)."""
    cleaned = "".join(" " if c in _PUNCT else c for c in text.lower())
    return cleaned.split()


def ngram_counts(words: Sequence[str], n: int) -> Counter:
    """Counter of the n-grams (tuples) of ``words``."""
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def _check(hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]], who: str) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{who}: 'hypotheses' has {len(hypotheses)} captions but 'references' has "
                         f"{len(references)} reference sets")
    for i, (h, refs) in enumerate(zip(hypotheses, references)):
        if isinstance(h, str) or any(isinstance(r, str) for r in refs):
            raise TypeError(f"{who}: captions must be lists of words (see caption_words), got a str at example {i}")
        if len(refs) == 0:
            raise ValueError(f"{who}: example {i} has no reference caption")


def corpus_bleu(hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]], max_n: int = 4
                ) -> dict[str, float | list[float]]:
    """Corpus-level BLEU (see the module doc).

    Args:
        hypotheses: one word list per image. references: one list of word lists per image (>= 1 each).
        max_n: highest n-gram order.
    Returns:
        ``{'bleu1': …, …, 'bleu{max_n}': …, 'precisions': [p_1..p_max_n], 'bp': …, 'hyp_len': c, 'ref_len': r}``.
    """
    _check(hypotheses, references, "corpus_bleu")
    matches, totals = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, refs in zip(hypotheses, references):
        hyp_len += len(hyp)
        ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
        for n in range(1, max_n + 1):
            counts = ngram_counts(hyp, n)
            best: Counter = Counter()
            for r in refs:
                best |= ngram_counts(r, n)  # element-wise max over the references
            matches[n - 1] += sum(min(c, best[g]) for g, c in counts.items())
            totals[n - 1] += max(len(hyp) - n + 1, 0)
    precisions = [m / t if t else 0.0 for m, t in zip(matches, totals)]
    if hyp_len == 0:
        bp = 0.0
    else:
        bp = 1.0 if hyp_len > ref_len else math.exp(1.0 - ref_len / hyp_len)
    out: dict[str, float | list[float]] = {}
    for n in range(1, max_n + 1):
        ps = precisions[:n]
        out[f"bleu{n}"] = bp * math.exp(sum(math.log(p) for p in ps) / n) if min(ps) > 0 else 0.0
    out.update(precisions=precisions, bp=bp, hyp_len=float(hyp_len), ref_len=float(ref_len))
    return out


def _tfidf(words: Sequence[str], df: Counter, log_images: float, max_n: int
           ) -> tuple[list[dict[tuple, float]], list[float], int]:
    vecs, norms = [], []
    for n in range(1, max_n + 1):
        vec = {g: c * (log_images - math.log(max(1.0, df[g]))) for g, c in ngram_counts(words, n).items()}
        vecs.append(vec)
        norms.append(math.sqrt(sum(v * v for v in vec.values())))
    return vecs, norms, max(len(words) - 1, 0)


def cider_d(hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]], max_n: int = 4,
            sigma: float = 6.0) -> dict[str, float | list[float]]:
    """CIDEr-D over a set of images (see the module doc; df from these references).

    Returns:
        ``{'cider': corpus score (mean over images), 'per_image': [score per image]}``.
    """
    _check(hypotheses, references, "cider_d")
    if not hypotheses:
        return {"cider": 0.0, "per_image": []}
    df: Counter = Counter()
    for refs in references:
        grams = set()
        for r in refs:
            for n in range(1, max_n + 1):
                grams.update(ngram_counts(r, n))
        df.update(grams)
    log_images = math.log(float(len(references)))
    scores = []
    for hyp, refs in zip(hypotheses, references):
        vh, nh, lh = _tfidf(hyp, df, log_images, max_n)
        total = [0.0] * max_n
        for r in refs:
            vr, nr, lr = _tfidf(r, df, log_images, max_n)
            penalty = math.exp(-((lh - lr) ** 2) / (2.0 * sigma ** 2))
            for n in range(max_n):
                val = sum(min(v, vr[n].get(g, 0.0)) * vr[n].get(g, 0.0) for g, v in vh[n].items())
                if nh[n] != 0 and nr[n] != 0:
                    val /= nh[n] * nr[n]
                total[n] += val * penalty
        scores.append(10.0 * sum(total) / max_n / len(refs))
    return {"cider": sum(scores) / len(scores), "per_image": scores}
