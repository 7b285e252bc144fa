"""Statistics for A-vs-B claims and judge agreement: paired bootstrap, percent agreement, Cohen's kappa.

A claim "B is better than A on metric m" is made only when the 95 % interval of the mean per-item
difference (B − A), from a seeded paired bootstrap (resampling items, 10,000 times by default),
lies entirely above 0; entirely below 0 is "worse", anything else "no difference". Items are
resampled as pairs, so the variance between items (some questions are simply harder) cancels.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Comparison:
    n: int
    mean_a: float
    mean_b: float
    diff: float
    low: float
    high: float
    resamples: int
    seed: int

    @property
    def verdict(self) -> str:
        if self.n == 0:
            return "no data"
        if self.low > 0:
            return "better"
        if self.high < 0:
            return "worse"
        return "no difference"

    def as_dict(self) -> dict:
        out = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}
        out["verdict"] = self.verdict
        return out


def paired_bootstrap(a: list[float], b: list[float], *, resamples: int = 10_000, seed: int = 0,
                     confidence: float = 0.95) -> Comparison:
    """Mean of b − a with a percentile bootstrap interval over items resampled with replacement."""
    import numpy as np

    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    n = len(a)
    if n == 0:
        return Comparison(0, 0.0, 0.0, 0.0, 0.0, 0.0, resamples, seed)
    diffs = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    step = max(1, 2_000_000 // n)  # bounded memory: index blocks of at most ~2M entries
    for start in range(0, resamples, step):
        stop = min(resamples, start + step)
        means[start:stop] = diffs[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Comparison(n, float(np.mean(a)), float(np.mean(b)), float(diffs.mean()), float(low), float(high),
                      resamples, seed)


def percent_agreement(x: list, y: list) -> float:
    if len(x) != len(y):
        raise ValueError("label lists differ in length")
    return sum(p == q for p, q in zip(x, y)) / len(x) if x else 0.0


def cohen_kappa(x: list, y: list) -> float | None:
    """Cohen's kappa of two raters' labels; None when undefined (no items, or chance agreement is 1)."""
    if len(x) != len(y):
        raise ValueError("label lists differ in length")
    n = len(x)
    if n == 0:
        return None
    observed = percent_agreement(x, y)
    cx, cy = Counter(x), Counter(y)
    expected = sum(cx[label] * cy[label] for label in set(cx) | set(cy)) / (n * n)
    if expected >= 1.0:
        return None
    return (observed - expected) / (1 - expected)


@dataclass(frozen=True)
class Separation:
    """How well a score separates positives (higher should mean positive) from negatives."""
    auc: float  # P(score of a random positive > score of a random negative), ties count half
    recall: float  # best share of positives above a threshold that lets at most `max_fpr` of negatives pass
    max_fpr: float


def separation(positives: list[float], negatives: list[float], max_fpr: float = 0.10) -> Separation:
    """ROC AUC of a score, and the best recall at a false-positive rate ≤ `max_fpr` (any threshold).

    Used for refusal decisions: score = log P(refusal sentence | prompt), positives = unanswerable
    items. AUC 0.5 means the score carries no information about answerability, and the recall shows
    the refusal accuracy the best threshold would reach with ≤ `max_fpr` false refusals."""
    if not positives or not negatives:
        raise ValueError("need at least one positive and one negative score")
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    allowed = int(max_fpr * len(negatives) + 1e-9)  # negatives that may score at or above the threshold
    ranked = sorted(negatives, reverse=True)
    threshold = ranked[allowed] if allowed < len(ranked) else float("-inf")
    recall = sum(p > threshold for p in positives) / len(positives)
    return Separation(wins / (len(positives) * len(negatives)), recall, max_fpr)
