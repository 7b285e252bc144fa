"""A/B reports over the gateway's store: per variant of an alias, volume, latency, errors and feedback,
with 95 % confidence intervals and a test against the control, and a recommendation.

The control is the variant with the largest weight in the alias's current split (ties: the first
route); every other variant is a challenger. Feedback ratings lie in [0, 1]; a variant's score is
their mean. The test is Welch's two-sample test on the ratings (normal approximation, so it needs
`min_feedback` ratings per variant) and a two-proportion test on error rates. Recommendation per
challenger: `rollback` when its error rate or score is worse at p < `alpha`, `promote` when its
score is better at p < `alpha` and its error rate not worse, else `keep` (including "not enough
feedback yet", which the reason says).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass

from sqlalchemy import select

from sovllm.gateway.usage import feedback_table, requests_table
from sovllm.stats import percentile

Z95 = 1.959963984540054


@dataclass
class Variant:
    adapter: str
    weight: float
    requests: int
    errors: int
    latency_p50: float | None
    latency_p95: float | None
    feedback: int
    feedback_rate: float
    score: float | None
    score_ci: tuple[float, float] | None
    error_rate: float
    p_score: float | None = None
    p_errors: float | None = None
    recommendation: str = "control"
    reason: str = ""


def _p_two_sided(z: float) -> float:
    return math.erfc(abs(z) / math.sqrt(2))


def welch(a: list[float], b: list[float]) -> tuple[float, float]:
    """(difference of means b − a, two-sided p) by Welch's test in its normal approximation."""
    va, vb = statistics.variance(a), statistics.variance(b)
    diff = statistics.fmean(b) - statistics.fmean(a)
    se = math.sqrt(va / len(a) + vb / len(b))
    if se == 0:
        return diff, 0.0 if diff else 1.0
    return diff, _p_two_sided(diff / se)


def two_proportions(x1: int, n1: int, x2: int, n2: int) -> float:
    """Two-sided p of the pooled two-proportion z-test (1.0 when there is nothing to compare)."""
    if not n1 or not n2:
        return 1.0
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 1.0
    return _p_two_sided((x2 / n2 - x1 / n1) / se)


def _mean_ci(values: list[float]) -> tuple[float, float] | None:
    if len(values) < 2:
        return None
    mean = statistics.fmean(values)
    half = Z95 * statistics.stdev(values) / math.sqrt(len(values))
    return (max(0.0, mean - half), min(1.0, mean + half))


def report(engine, alias: str, routes: dict[str, float], since: float = 0.0, *, min_feedback: int = 30,
           alpha: float = 0.05) -> dict:
    """The A/B report of `alias` over requests since `since` (unix time)."""
    with engine.connect() as conn:
        rows = conn.execute(select(requests_table.c.adapter, requests_table.c.status, requests_table.c.latency_s)
                            .where(requests_table.c.alias == alias, requests_table.c.time >= since)).all()
        ratings = conn.execute(select(feedback_table.c.adapter, feedback_table.c.rating)
                               .where(feedback_table.c.alias == alias, feedback_table.c.time >= since)).all()
    names = list(dict.fromkeys([*routes, *(r[0] for r in rows)]))
    control = max(routes, key=lambda name: routes[name]) if routes else (names[0] if names else None)
    variants: dict[str, Variant] = {}
    scores: dict[str, list[float]] = {}
    for name in names:
        mine = [r for r in rows if r[0] == name]
        ok = [r[2] for r in mine if r[1] < 400]
        scores[name] = [float(r[1]) for r in ratings if r[0] == name]
        errors = sum(1 for r in mine if r[1] >= 400)
        s = scores[name]
        variants[name] = Variant(
            adapter=name, weight=routes.get(name, 0.0), requests=len(mine), errors=errors,
            latency_p50=percentile(ok, 0.5) if ok else None, latency_p95=percentile(ok, 0.95) if ok else None,
            feedback=len(s), feedback_rate=len(s) / len(mine) if mine else 0.0,
            score=statistics.fmean(s) if s else None, score_ci=_mean_ci(s),
            error_rate=errors / len(mine) if mine else 0.0)
    for name, v in variants.items():
        if name == control:
            v.reason = "the variant with the largest weight"
            continue
        c = variants[control]
        v.p_errors = two_proportions(c.errors, c.requests, v.errors, v.requests)
        if v.p_errors < alpha and v.error_rate > c.error_rate:
            v.recommendation, v.reason = "rollback", f"more errors than {control} (p = {v.p_errors:.3g})"
            continue
        if min(len(scores[name]), len(scores[control])) < min_feedback:
            v.recommendation = "keep"
            v.reason = (f"not enough feedback yet ({len(scores[name])} and {len(scores[control])} ratings; "
                        f"{min_feedback} each needed)")
            continue
        diff, v.p_score = welch(scores[control], scores[name])
        if v.p_score < alpha and diff < 0:
            v.recommendation, v.reason = "rollback", f"scored {diff:+.3f} below {control} (p = {v.p_score:.3g})"
        elif v.p_score < alpha and diff > 0:
            v.recommendation, v.reason = "promote", f"scored {diff:+.3f} above {control} (p = {v.p_score:.3g})"
        else:
            v.recommendation, v.reason = "keep", f"no significant difference to {control} (p = {v.p_score:.3g})"
    return {"alias": alias, "control": control, "routes": routes, "since": since, "alpha": alpha,
            "min_feedback": min_feedback, "variants": [asdict(v) for v in variants.values()]}


def applied_routes(report_: dict) -> tuple[dict[str, float], str] | None:
    """The split `--apply` sets (and why), or None when every challenger is `keep`.

    One promoted challenger takes all traffic (several: the best-scoring one); rolled-back
    challengers get weight 0 and their traffic goes to the control."""
    variants = {v["adapter"]: v for v in report_["variants"]}
    promoted = [v for v in variants.values() if v["recommendation"] == "promote"]
    if promoted:
        best = max(promoted, key=lambda v: v["score"])
        return {best["adapter"]: 1.0}, f"promote {best['adapter']}: {best['reason']}"
    rolled = [name for name, v in variants.items() if v["recommendation"] == "rollback"]
    if rolled:
        routes = {name: (0.0 if name in rolled else weight) for name, weight in report_["routes"].items()}
        if sum(routes.values()) <= 0:
            routes[report_["control"]] = 1.0
        return routes, "roll back " + ", ".join(f"{n} ({variants[n]['reason']})" for n in rolled)
    return None
