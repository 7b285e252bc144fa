"""Statistics helpers shared by training and evaluation: percentiles, paired bootstrap, agreement, ROC AUC.

This module sits at the bottom of the package (it imports nothing from sovllm), so train and
evaluate can both use it without importing each other. A claim "B is better than A on metric m"
is made only when the 95 % interval of the mean per-item difference (B − A), from a seeded paired
bootstrap (resampling items, 10,000 times by default), lies entirely above 0; entirely below 0 is
"worse", anything else "no difference". Items are resampled as pairs, so the variance between items
(some questions are simply harder) cancels. Refusal scores are judged by their ROC AUC, computed
from ranks (Mann–Whitney U), and by the best recall at a bounded false-positive rate.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (q in [0, 1]) with linear interpolation between order statistics; 0.0 when empty."""
    if len(values) == 0:
        return 0.0
    return float(np.quantile(np.asarray(values, dtype=float), q, method="linear"))


@dataclass(frozen=True)
class Comparison:
    """The paired-bootstrap result of b − a: means, the mean difference and its interval."""

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
    """Share of items on which two raters give the same label; 0.0 for no items."""
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


def roc_auc(positives: list[float], negatives: list[float]) -> float:
    """P(score of a random positive > score of a random negative), ties counting half.

    Computed from the rank sum of the positives (Mann–Whitney U) with tied scores sharing their
    average rank, which gives exactly the pairwise count in O(n log n)."""
    if len(positives) == 0 or len(negatives) == 0:
        raise ValueError("need at least one positive and one negative score")
    scores = np.concatenate([np.asarray(positives, dtype=float), np.asarray(negatives, dtype=float)])
    _, group, sizes = np.unique(scores, return_inverse=True, return_counts=True)
    # a group of tied scores occupies ranks end - size + 1 … end; each member gets their mean
    average_rank = np.cumsum(sizes) - (sizes - 1) / 2
    n_pos, n_neg = len(positives), len(negatives)
    u = float(average_rank[group[:n_pos]].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


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
    auc = roc_auc(positives, negatives)
    allowed = int(max_fpr * len(negatives) + 1e-9)  # negatives that may score at or above the threshold
    ranked = sorted(negatives, reverse=True)
    threshold = ranked[allowed] if allowed < len(ranked) else float("-inf")
    recall = sum(p > threshold for p in positives) / len(positives)
    return Separation(auc, recall, max_fpr)
