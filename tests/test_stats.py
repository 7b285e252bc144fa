"""The shared statistics helpers: percentile and rank-based AUC against the hand-written code they
replaced, and the paired bootstrap, agreement and separation figures against hand-worked values."""

from __future__ import annotations

import math
import random

import pytest

from sovllm.stats import cohen_kappa, paired_bootstrap, percent_agreement, percentile, roc_auc, separation


def interpolated(values: list[float], q: float) -> float:
    """The percentile sovllm computed by hand before numpy (train/stopcheck.py)."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    k = (len(ordered) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def pairwise_auc(positives: list[float], negatives: list[float]) -> float:
    """The O(n²) AUC sovllm computed by hand before ranks: every pair, ties counting half."""
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def test_percentile_hand_worked_and_edge_cases():
    assert percentile([], 0.95) == 0.0
    assert percentile([7], 0.5) == 7.0 and percentile([7], 0.95) == 7.0
    assert percentile([3, 1, 2], 0.5) == 2.0  # unsorted input, odd length: the middle value
    assert percentile([1, 2, 3, 4], 0.5) == 2.5  # even length: halfway between the two middle values
    # k = (4 - 1) × 0.95 = 2.85 → 30 + 0.85 × (40 − 30)
    assert percentile([40, 10, 30, 20], 0.95) == pytest.approx(38.5)
    assert percentile([5, 9], 0.0) == 5.0 and percentile([5, 9], 1.0) == 9.0
    assert percentile([2, 2, 2, 2, 2], 0.95) == 2.0
    assert isinstance(percentile([1, 2], 0.5), float)


def test_percentile_matches_the_hand_written_interpolation():
    rng = random.Random(7)
    for _ in range(300):
        n = rng.randint(1, 300)
        lengths = [rng.randint(1, rng.choice([8, 60, 400])) for _ in range(n)]
        latencies = [rng.random() * 5 for _ in range(n)]
        for q in (0.05, 0.5, 0.9, 0.95, 0.99):
            # numpy rounds differently in the last bit; the figures built on it do not move
            assert percentile(lengths, q) == pytest.approx(interpolated(lengths, q), rel=1e-12, abs=0)
            assert percentile(latencies, q) == pytest.approx(interpolated(latencies, q), rel=1e-12, abs=0)
        # the stop-check budget, the eval max_tokens and the report's latencies, exactly as before
        assert math.ceil(2 * percentile(lengths, 0.95)) == math.ceil(2 * interpolated(lengths, 0.95))
        assert int(2 * percentile(lengths, 0.95) + 0.999) == int(2 * interpolated(lengths, 0.95) + 0.999)
        assert round(percentile(latencies, 0.5), 3) == round(interpolated(latencies, 0.5), 3)


def test_roc_auc_equals_the_pairwise_count_with_ties():
    rng = random.Random(3)
    for _ in range(500):
        levels = rng.choice([2, 5, 1000])  # few levels: many ties; many levels: almost none
        positives = [rng.randint(0, levels) / 7 for _ in range(rng.randint(1, 30))]
        negatives = [rng.randint(0, levels) / 7 for _ in range(rng.randint(1, 30))]
        assert roc_auc(positives, negatives) == pairwise_auc(positives, negatives)
    assert roc_auc([float("-inf"), 0.0], [float("-inf"), -1.0]) == pairwise_auc([float("-inf"), 0.0],
                                                                                 [float("-inf"), -1.0]) == 0.625


def test_roc_auc_edge_cases():
    assert roc_auc([1.0, 1.0, 1.0], [1.0, 1.0]) == 0.5  # all scores equal: no information
    assert roc_auc([2.0, 3.0], [0.0, 1.0]) == 1.0 and roc_auc([0.0, 1.0], [2.0, 3.0]) == 0.0
    assert roc_auc([0.5], [0.5]) == 0.5
    for positives, negatives in (([], [0.1]), ([0.1], []), ([], [])):  # one class only: undefined
        with pytest.raises(ValueError, match="at least one positive and one negative"):
            roc_auc(positives, negatives)


def test_separation_hand_worked():
    # positives 0.9, 0.4, 0.2 vs negatives 0.8, 0.3, 0.1, 0.05: pairs won 4 + 3 + 2 = 9 of 12
    s = separation([0.9, 0.4, 0.2], [0.8, 0.3, 0.1, 0.05], max_fpr=0.25)
    assert s.auc == pytest.approx(9 / 12)
    # one negative (0.8) may pass: threshold 0.3, recall 2 of 3 (0.9, 0.4)
    assert s.recall == pytest.approx(2 / 3)
    # no negative may pass: threshold 0.8, only 0.9 above it
    assert separation([0.9, 0.4, 0.2], [0.8, 0.3, 0.1, 0.05], max_fpr=0.0).recall == pytest.approx(1 / 3)
    # ties count half, and a score that carries no information gives 0.5
    assert separation([1.0, 1.0], [1.0, 1.0]).auc == 0.5
    assert separation([1.0, 1.0], [1.0, 1.0]).recall == 0.0
    with pytest.raises(ValueError):
        separation([], [0.1])


def test_cohen_kappa_hand_worked():
    # 50 items: both yes 20, both no 15, x yes / y no 5, x no / y yes 10
    x = ["y"] * 20 + ["n"] * 15 + ["y"] * 5 + ["n"] * 10
    y = ["y"] * 20 + ["n"] * 15 + ["n"] * 5 + ["y"] * 10
    # p_o = 35/50 = 0.7; x: 25 y / 25 n; y: 30 y / 20 n; p_e = (25*30 + 25*20)/2500 = 0.5 → kappa 0.4
    assert percent_agreement(x, y) == pytest.approx(0.7)
    assert cohen_kappa(x, y) == pytest.approx(0.4)
    assert cohen_kappa(["a", "a"], ["a", "a"]) is None  # chance agreement 1: undefined
    assert cohen_kappa([], []) is None
    with pytest.raises(ValueError):
        cohen_kappa(["a"], [])


def test_paired_bootstrap_finds_a_real_difference_and_not_a_fake_one():
    a = [0.2, 0.4, 0.3, 0.5, 0.1, 0.6, 0.3, 0.2] * 5
    better = [v + 0.2 for v in a]
    result = paired_bootstrap(a, better, resamples=10_000, seed=1)
    assert result.verdict == "better" and result.diff == pytest.approx(0.2)
    noise = [v + (0.05 if i % 2 else -0.05) for i, v in enumerate(a)]  # mean difference 0
    assert paired_bootstrap(a, noise, resamples=10_000, seed=1).verdict == "no difference"
    assert paired_bootstrap(better, a, resamples=2_000, seed=1).verdict == "worse"


def test_paired_bootstrap_is_seeded_and_pairs_items():
    a = [0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    b = [1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    assert paired_bootstrap(a, b, seed=3) == paired_bootstrap(a, b, seed=3)
    x, y = [i * 0.137 % 1 for i in range(30)], [i * 0.291 % 1 for i in range(30)]
    assert paired_bootstrap(x, y, resamples=500, seed=3).low != paired_bootstrap(x, y, resamples=500, seed=4).low
    # pairing matters: every item improves by +0.1 while items vary wildly; unpaired noise would hide it
    base = [0.0, 0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6]
    assert paired_bootstrap(base, [v + 0.1 for v in base], resamples=2_000).verdict == "better"
    with pytest.raises(ValueError):
        paired_bootstrap([1.0], [1.0, 2.0])
    assert paired_bootstrap([], []).verdict == "no data"
