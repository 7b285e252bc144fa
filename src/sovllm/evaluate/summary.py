"""Aggregate scored predictions into the summary: per model and context mode, per type, comparisons.

Headline metrics (all reference-based): token F1 and ROUGE-L on answerable items, refusal accuracy
on unanswerable items (all of them, and separately on the on-topic and the foreign ones),
false-refusal rate on answerable items, stop rate on all, plus answer length, latency and
broken-answer counts. Each model after the first is compared with the first
(the reference, normally the base model) by a paired bootstrap on the per-item values; the quality
targets are checked from these figures only.
"""

from __future__ import annotations

from collections import Counter, defaultdict

from sovllm.evaluate.metrics import BROKEN_KINDS, NEGATIVE_KINDS
from sovllm.stats import paired_bootstrap, percentile

# metric → (which items, per-item value)
PAIRED = {
    "f1": ("answerable", lambda r: r["f1"]),
    "rouge_l": ("answerable", lambda r: r["rouge_l"]),
    "refusal_accuracy": ("unanswerable", lambda r: float(r["refused"])),
    "refusal_accuracy_on_topic": ("on_topic", lambda r: float(r["refused"])),
    "refusal_accuracy_foreign": ("foreign", lambda r: float(r["refused"])),
    "false_refusal_rate": ("answerable", lambda r: float(r["refused"])),
    "stop_rate": ("all", lambda r: float(r["stopped"])),
}
LOWER_IS_BETTER = {"false_refusal_rate"}
TARGETS = {"stop_rate": 0.95, "refusal_accuracy": 0.70, "refusal_accuracy_on_topic": 0.70,
           "false_refusal_rate": 0.10}


def negative_kind(row: dict) -> str | None:
    """'on_topic' or 'foreign' for an unanswerable row, None for an answerable one. Rows written
    before curate told the kinds apart (no `negative`) held only foreign questions."""
    if row["answerable"]:
        return None
    return row.get("negative") or "foreign"


def _selected(row: dict, which: str) -> bool:
    if which == "all":
        return True
    if which in NEGATIVE_KINDS:
        return negative_kind(row) == which
    return row["answerable"] == (which == "answerable")


def _select(rows: list[dict], which: str) -> list[dict]:
    return [r for r in rows if _selected(r, which)]


def _mean(values) -> float | None:
    values = list(values)
    return round(sum(values) / len(values), 4) if values else None


def aggregate(rows: list[dict]) -> dict:
    """Every headline metric of one model in one context mode."""
    answerable = _select(rows, "answerable")
    out = {"items": len(rows), "answerable": len(answerable), "unanswerable": len(rows) - len(answerable)}
    out.update({f"unanswerable_{kind}": len(_select(rows, kind)) for kind in NEGATIVE_KINDS})
    for name, (which, value) in PAIRED.items():
        out[name] = _mean(value(r) for r in _select(rows, which))
    lengths = [r["completion_tokens"] for r in rows]
    latencies = [r["seconds"] for r in rows]
    out.update({
        "answer_tokens_mean": _mean(lengths),
        "latency_p50_s": round(percentile(latencies, 0.5), 3) if rows else None,
        "latency_p95_s": round(percentile(latencies, 0.95), 3) if rows else None,
        "ttft_p50_s": round(percentile([r["ttft_s"] for r in rows], 0.5), 3) if rows else None,
        "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
        "completion_tokens": sum(lengths),
        "broken": {kind: sum(kind in r["broken"] for r in rows) for kind in BROKEN_KINDS},
        "broken_items": sum(bool(r["broken"]) for r in rows),
    })
    if rows and "hit" in rows[0]:
        out["hit_at_k"] = _mean(float(r["hit"]) for r in rows)
    return out


def by_type(rows: list[dict]) -> dict:
    groups = defaultdict(list)
    for r in rows:
        groups[r["type"]].append(r)
    return {t: {"items": len(g), "f1": _mean(r["f1"] for r in g), "rouge_l": _mean(r["rouge_l"] for r in g),
                "refusal_correct": _mean(float(r["refusal_correct"]) for r in g),
                "stop_rate": _mean(float(r["stopped"]) for r in g)} for t, g in sorted(groups.items())}


def compare(reference: list[dict], candidate: list[dict], *, resamples: int, seed: int) -> dict:
    """Paired bootstrap of candidate − reference for every headline metric (same items, same order)."""
    ref = {r["id"]: r for r in reference}
    pairs = [(ref[c["id"]], c) for c in candidate if c["id"] in ref]
    out = {}
    for name, (which, value) in PAIRED.items():
        chosen = [(a, b) for a, b in pairs if _selected(a, which)]
        result = paired_bootstrap([value(a) for a, _ in chosen], [value(b) for _, b in chosen],
                                  resamples=resamples, seed=seed).as_dict()
        if name in LOWER_IS_BETTER:  # a lower false-refusal rate is the improvement
            result["verdict"] = {"better": "worse", "worse": "better"}.get(result["verdict"], result["verdict"])
        out[name] = result
    return out


def summarise(rows: list[dict], models: list[str], *, resamples: int, seed: int) -> dict:
    """The `summary.json` body (without judge and run information)."""
    modes = sorted({r["context"] for r in rows}, key=lambda m: (m != "gold", m))
    table: dict = {}
    comparisons: dict = {}
    for mode in modes:
        per_model = {m: [r for r in rows if r["model"] == m and r["context"] == mode] for m in models}
        table[mode] = {m: aggregate(per_model[m]) for m in models}
        table[mode + "_by_type"] = {m: by_type(per_model[m]) for m in models}
        comparisons[mode] = {m: compare(per_model[models[0]], per_model[m], resamples=resamples, seed=seed)
                             for m in models[1:]}
    return {"modes": modes, "models": models, "reference_model": models[0], "table": table,
            "comparisons": comparisons}


def check_targets(summary: dict) -> dict:
    """The issue's quality targets for each candidate on gold context (reference metrics only)."""
    if "gold" not in summary["table"]:
        return {}
    gold = summary["table"]["gold"]
    base = gold[summary["reference_model"]]
    out = {}
    for model, comparison in summary["comparisons"]["gold"].items():
        row = gold[model]
        checks = {
            "stop_rate>=0.95": row["stop_rate"] is not None and row["stop_rate"] >= TARGETS["stop_rate"],
            "stop_rate>=base": row["stop_rate"] is not None and row["stop_rate"] >= (base["stop_rate"] or 0),
            "refusal_accuracy>=0.70": row["refusal_accuracy"] is not None
                                      and row["refusal_accuracy"] >= TARGETS["refusal_accuracy"],
            "false_refusal_rate<=0.10": row["false_refusal_rate"] is not None
                                        and row["false_refusal_rate"] <= TARGETS["false_refusal_rate"],
            "f1_better_paired": comparison["f1"]["verdict"] == "better",
        }
        # the on-topic target is checked only where curate built on-topic items (older splits have none)
        on_topic = f"refusal_accuracy_on_topic>={TARGETS['refusal_accuracy_on_topic']:.2f}"
        not_checked = {}
        if row.get("unanswerable_on_topic"):
            checks[on_topic] = row["refusal_accuracy_on_topic"] >= TARGETS["refusal_accuracy_on_topic"]
        else:
            not_checked[on_topic] = "no on-topic items"
        out[model] = {"checks": checks, "met": all(checks.values()), "not_checked": not_checked}
    return out


def most_different(rows: list[dict], a: str, b: str, n: int = 10) -> list[dict]:
    """The n gold-context items where the two models' F1 (refusal correctness on unanswerable) differ most."""
    def value(r):
        return r["f1"] if r["answerable"] else float(r["refusal_correct"])

    left = {r["id"]: r for r in rows if r["model"] == a and r["context"] == "gold"}
    right = {r["id"]: r for r in rows if r["model"] == b and r["context"] == "gold"}
    common = [i for i in left if i in right]
    common.sort(key=lambda i: (-abs(value(right[i]) - value(left[i])), i))
    return [{"id": i, "question": left[i]["question"], "reference": left[i]["reference"], "type": left[i]["type"],
             "negative": negative_kind(left[i]),
             a: left[i]["answer"], b: right[i]["answer"], "diff": round(value(right[i]) - value(left[i]), 4)}
            for i in common[:n]]


def token_totals(rows: list[dict]) -> dict:
    return {"prompt": sum(r["prompt_tokens"] for r in rows), "generated": sum(r["completion_tokens"] for r in rows)}


__all__ = ["aggregate", "by_type", "check_targets", "compare", "most_different", "negative_kind", "summarise",
           "Counter"]
