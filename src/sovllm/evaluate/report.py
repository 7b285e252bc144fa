"""`report.html`: one self-contained page (inline CSS, no script, no external resource) of an evaluation.

Sections: the headline table per context mode with each candidate's paired-bootstrap interval
against the reference model, the quality targets, per-type breakdown, broken-answer counts,
retrieval hit@k, the judge's consistency and agreement figures (marked unreliable below the kappa
threshold), and the ten items where the models differ most, side by side.
"""

from __future__ import annotations

from html import escape
from pathlib import Path

from sovllm.artifacts import write_atomic
from sovllm.evaluate.metrics import BROKEN_KINDS

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:72em;padding:1em;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}
th,td{border-bottom:1px solid #ddd;padding:.2em .7em;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.better{color:#176117;font-weight:bold}.worse{color:#a11;font-weight:bold}.same{color:#666}
.bad{background:#fbdada}.ok{background:#d8f3d8}
.side{display:grid;grid-template-columns:1fr 1fr;gap:.6em}
.item{border:1px solid #ccc;border-radius:4px;padding:.5em .8em;margin:.6em 0}
.ans{white-space:pre-wrap;background:#fafafa;padding:.4em}
.note{color:#555}
"""
_CSP = "default-src 'none'; style-src 'unsafe-inline'"
METRICS = (("f1", "token F1 (answerable)"), ("rouge_l", "ROUGE-L (answerable)"),
           ("refusal_accuracy", "refusal accuracy (unanswerable)"),
           ("false_refusal_rate", "false-refusal rate (answerable)"), ("stop_rate", "stop rate"))


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _headline(summary: dict, mode: str) -> str:
    models = summary["models_order"]
    table = summary["table"][mode]
    head = "".join(f"<th>{escape(m)}</th>" for m in models)
    diffs = "".join(f"<th>{escape(m)} − {escape(models[0])} (95% CI)</th>" for m in models[1:])
    rows = []
    for key, title in METRICS:
        cells = "".join(f'<td class="n">{_fmt(table[m][key])}</td>' for m in models)
        for m in models[1:]:
            c = summary["comparisons"][mode][m][key]
            css = {"better": "better", "worse": "worse"}.get(c["verdict"], "same")
            cells += (f'<td class="n {css}" data-metric="{key}" data-verdict="{c["verdict"]}">{c["diff"]:+.3f} '
                      f'[{c["low"]:+.3f}, {c["high"]:+.3f}] {escape(c["verdict"])}</td>')
        rows.append(f"<tr><th>{escape(title)}</th>{cells}</tr>")
    extra = [("answer tokens (mean)", "answer_tokens_mean"), ("latency p50 s", "latency_p50_s"),
             ("latency p95 s", "latency_p95_s"), ("items", "items")]
    if "hit_at_k" in table[models[0]]:
        extra.insert(0, (f"hit@{summary.get('retrieval_k')}", "hit_at_k"))
    for title, key in extra:
        cells = "".join(f'<td class="n">{_fmt(table[m].get(key))}</td>' for m in models)
        rows.append(f"<tr><th>{escape(title)}</th>{cells}{'<td></td>' * (len(models) - 1)}</tr>")
    return (f'<table class="headline" data-mode="{mode}"><tr><th>metric</th>{head}{diffs}</tr>'
            + "".join(rows) + "</table>")


def _targets(summary: dict) -> str:
    if not summary.get("targets"):
        return ""
    parts = []
    for model, result in summary["targets"].items():
        cells = "".join(f'<tr class="{"ok" if ok else "bad"}"><td>{escape(name)}</td><td>{"met" if ok else "missed"}'
                        f"</td></tr>" for name, ok in result["checks"].items())
        parts.append(f"<h3>{escape(model)}: {'all targets met' if result['met'] else 'targets missed'}</h3>"
                     f"<table>{cells}</table>")
    return "<h2>Quality targets (gold context, reference metrics)</h2>" + "".join(parts)


def _by_type(summary: dict, mode: str) -> str:
    models = summary["models_order"]
    data = summary["table"][f"{mode}_by_type"]
    types = sorted({t for m in models for t in data[m]})
    head = "".join(f"<th>{escape(m)} F1</th><th>{escape(m)} right refusals</th>" for m in models)
    rows = "".join(
        f"<tr><td>{escape(t)}</td><td class=\"n\">{data[models[0]].get(t, {}).get('items', 0)}</td>"
        + "".join(f'<td class="n">{_fmt(data[m].get(t, {}).get("f1"))}</td>'
                  f'<td class="n">{_fmt(data[m].get(t, {}).get("refusal_correct"))}</td>' for m in models)
        + "</tr>" for t in types)
    return f"<table><tr><th>type</th><th>items</th>{head}</tr>{rows}</table>"


def _broken(summary: dict) -> str:
    models = summary["models_order"]
    head = "".join(f"<th>{escape(m)} ({escape(mode)})</th>" for mode in summary["modes"] for m in models)
    rows = "".join(f"<tr><td>{kind.replace('_', ' ')}</td>"
                   + "".join(f'<td class="n">{summary["table"][mode][m]["broken"][kind]}</td>'
                             for mode in summary["modes"] for m in models) + "</tr>" for kind in BROKEN_KINDS)
    return f'<table class="broken"><tr><th>kind</th>{head}</tr>{rows}</table>'


def _judge(judge: dict) -> str:
    if not judge.get("enabled"):
        return "<p>Judge checks were switched off (eval.judge.enabled: false).</p>"
    agreement = judge.get("agreement", {})
    reliable = judge.get("reliable")
    lines = [f"<p class=\"{'ok' if reliable else 'bad'}\">Judge {escape(str(judge['judge'].get('model')))}: "
             f"<b>{'reliable' if reliable else 'unreliable'}</b> (Cohen's kappa vs hand labels "
             f"{_fmt(agreement.get('kappa'))}, threshold {_fmt(agreement.get('kappa_min'), 2)}). "
             "The judge never feeds the headline table or the promotion gate.</p>", "<table>"]
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
    lines += [f"<tr><th>{escape(a)}</th><td>{escape(b)}</td></tr>" for a, b in rows]
    return "\n".join(lines) + "</table>"


def _differ(summary: dict) -> str:
    parts = []
    for model, items in summary.get("most_different", {}).items():
        ref = summary["reference_model"]
        parts.append(f"<h3>{escape(model)} vs {escape(ref)}</h3>")
        for it in items:
            parts.append(
                f'<div class="item" data-id="{escape(it["id"])}"><div><b>{escape(it["question"])}</b> '
                f'<span class="note">({escape(it["type"])}, difference {it["diff"]:+.2f})</span></div>'
                f'<div class="note">reference: {escape(it["reference"])}</div><div class="side">'
                f'<div><div class="note">{escape(ref)}</div><div class="ans">{escape(it[ref])}</div></div>'
                f'<div><div class="note">{escape(model)}</div><div class="ans">{escape(it[model])}</div></div>'
                "</div></div>")
    return "".join(parts)


def render_report(summary: dict) -> str:
    summary = {**summary, "models_order": summary["models"] if isinstance(summary["models"][0], str)
               else [m["label"] for m in summary["models"]]}
    body = ["<h1>sovllm evaluation</h1>",
            f"<p class=\"note\">Greedy decoding, max_tokens {summary.get('max_tokens')}, the training system "
            f"prompt. Differences are candidate − {escape(summary['reference_model'])} with a seeded paired "
            f"bootstrap ({summary.get('resamples')} resamples); \"better\" means the 95% interval excludes 0.</p>"]
    biased = [m for m in summary["models"] if isinstance(m, dict) and m.get("refusal_bias") is not None]
    if biased:
        body.append('<p class="note" id="refusal-bias">Refusal bias applied by the embedded server (chosen on the '
                    "val split by <code>sovllm train</code>; vLLM does not apply it): "
                    + ", ".join(f"{escape(m['label'])} {m['refusal_bias']:+.2f}"
                                + (f" − {m['refusal_support_weight']:g} × the question's lexical support in its context"
                                   if m.get("refusal_support_weight") else "") for m in biased) + ".</p>")
    for mode in summary["modes"]:
        body.append(f"<h2>{escape(mode)} context</h2>" + _headline(summary, mode))
        body.append("<h3>by question type</h3>" + _by_type(summary, mode))
    body.append(_targets(summary))
    body.append("<h2>Broken answers</h2>" + _broken(summary))
    body.append("<h2>Judge</h2>" + _judge(summary.get("judge", {})))
    body.append("<h2>Where the models differ most (gold context)</h2>" + _differ(summary))
    if summary.get("promotion"):
        body.append(f"<h2>Promotion</h2><p>{escape(summary['promotion'].get('reason', ''))}</p>")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{_CSP}"><title>sovllm evaluation</title>'
            f"<style>{_CSS}</style></head><body>" + "\n".join(body) + "</body></html>\n")


def write_report(path: Path, summary: dict, rows: list[dict]) -> Path:
    write_atomic(path, render_report(summary))
    return path
