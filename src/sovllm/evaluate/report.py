"""`report.html`: one self-contained page (inline CSS, no script, no external resource) of an evaluation.

Sections: the split unit's leakage risk when curate split by section, the headline table per
context mode with each candidate's paired-bootstrap interval against the reference model (refusal
accuracy on all unanswerable items and on each kind, with its item count), the quality targets, per-type breakdown, broken-answer counts,
retrieval hit@k, the judge's consistency and agreement figures (marked unreliable below the kappa
threshold), and the ten items where the models differ most, side by side. The markup lives in
`templates/report.html.j2`; this module only arranges the summary's figures for it.
"""

from __future__ import annotations

from pathlib import Path

import jinja2

from sovllm.artifacts import write_atomic
from sovllm.evaluate.metrics import BROKEN_KINDS

METRICS = (("f1", "token F1 (answerable)"), ("rouge_l", "ROUGE-L (answerable)"),
           ("refusal_accuracy", "refusal accuracy, all unanswerable"),
           ("refusal_accuracy_on_topic", "refusal accuracy, on-topic unanswerable"),
           ("refusal_accuracy_foreign", "refusal accuracy, foreign unanswerable"),
           ("false_refusal_rate", "false-refusal rate (answerable)"), ("stop_rate", "stop rate"))
# the rows whose title carries their item count: the two kinds are rarely the same size
COUNTED = {"refusal_accuracy": "unanswerable", "refusal_accuracy_on_topic": "unanswerable_on_topic",
           "refusal_accuracy_foreign": "unanswerable_foreign"}


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


# Autoescaping on for every value: questions, answers and model names come from user documents.
_PAGES = jinja2.Environment(loader=jinja2.PackageLoader("sovllm.evaluate", "templates"), autoescape=True,
                            undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
_PAGES.filters["fmt"] = _fmt


def _metric_rows(summary: dict, mode: str, reference: str) -> list[tuple[str, str]]:
    """(key, title) of a mode's paired rows; refusal rows name their item count."""
    row = summary["table"][mode][reference]
    return [(key, f"{title} (n = {row.get(COUNTED[key], 0)})" if key in COUNTED else title)
            for key, title in METRICS if key in row]


def _extra_rows(summary: dict, mode: str, reference: str) -> list[tuple[str, str]]:
    """(title, key) of a mode's headline rows that have no paired comparison."""
    rows = [("answer tokens (mean)", "answer_tokens_mean"), ("latency p50 s", "latency_p50_s"),
            ("latency p95 s", "latency_p95_s"), ("items", "items")]
    if "hit_at_k" in summary["table"][mode][reference]:
        rows.insert(0, (f"hit@{summary.get('retrieval_k')}", "hit_at_k"))
    return rows


def _judge_rows(judge: dict) -> list[tuple[str, str]]:
    """(label, text) rows of the judge's consistency and agreement figures."""
    if not judge.get("enabled"):
        return []
    agreement = judge.get("agreement", {})
    rows = [("gold items judged", f"{agreement.get('judged', 0)} of {agreement.get('items', 0)}"),
            ("percent agreement", _fmt(agreement.get("percent_agreement"))),
            ("kappa (with ties)", _fmt(agreement.get("kappa"))),
            ("kappa (without ties)", f"{_fmt(agreement.get('kappa_without_ties'))} on "
                                     f"{agreement.get('items_without_ties', 0)} items"),
            ("repeat consistency", f"{_fmt(judge.get('repeat_consistency'))} on {judge.get('repeat_items', 0)} items"),
            ("verbosity probe", f"padded answer won {judge['verbosity_probe']['padded_wins']} of "
                                f"{judge['verbosity_probe']['items']}"),
            ("failed verdicts", ", ".join(f"{k} {v}" for k, v in judge.get("failures", {}).items()) or "none")]
    for model, p in judge.get("pairwise", {}).items():
        rows.append((f"pairwise {model} vs {p['versus']}",
                     f"wins {p['wins']}, losses {p['losses']}, ties {p['ties']}, failed {p['failed']}; "
                     f"position consistency {_fmt(p['position_consistency'])}"))
    for model, g in judge.get("grades", {}).items():
        rows.append((f"rubric grades {model}", ", ".join(f"{k} {v}" for k, v in g.items())))
    return rows


def render_report(summary: dict) -> str:
    """The complete report page of an evaluation summary."""
    models = summary["models"] if isinstance(summary["models"][0], str) else [m["label"] for m in summary["models"]]
    judge = summary.get("judge", {})
    types = {mode: sorted({t for m in models for t in summary["table"][f"{mode}_by_type"][m]})
             for mode in summary["modes"]}
    return _PAGES.get_template("report.html.j2").render(
        s=summary, models=models, types=types, split=summary.get("split") or {},
        metrics={mode: _metric_rows(summary, mode, models[0]) for mode in summary["modes"]},
        extra_rows={mode: _extra_rows(summary, mode, models[0]) for mode in summary["modes"]},
        biased=[m for m in summary["models"] if isinstance(m, dict) and m.get("refusal_bias") is not None],
        verdict_css={"better": "better", "worse": "worse"}, broken_kinds=BROKEN_KINDS, judge=judge,
        judge_rows=_judge_rows(judge))


def write_report(path: Path, summary: dict, rows: list[dict]) -> Path:
    """Write report.html atomically to `path`."""
    write_atomic(path, render_report(summary))
    return path
