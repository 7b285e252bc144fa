"""`sovllm eval`: base vs adapters on the eval split, with paired-bootstrap intervals, judge checks and a report."""

from __future__ import annotations

import typer
from rich.table import Table

from sovllm.cli import options
from sovllm.layout import folder
from sovllm.progress import make_console

console = make_console()
err = make_console(stderr=True)


def _ci(c: dict) -> str:
    return f"{c['diff']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}] {c['verdict']}"


def print_summary(summary: dict, out_dir, title: str = "eval") -> None:
    labels = [m["label"] for m in summary["models"]]
    ref = summary["reference_model"]
    console.print(f"{title}: {', '.join(labels)}; differences vs {ref} with 95% paired-bootstrap intervals")
    if (summary.get("split") or {}).get("leakage"):
        console.print(f"[yellow]note: {summary['split']['leakage']}[/yellow]")
    for mode in summary["modes"]:
        table = Table(title=f"{mode} context")
        table.add_column("metric")
        for m in labels:
            table.add_column(m, justify="right")
        for m in labels[1:]:
            table.add_column(f"{m} − {ref}", justify="right")
        rows = summary["table"][mode]
        for key, name in (("f1", "token F1 (answerable)"), ("rouge_l", "ROUGE-L (answerable)"),
                          ("refusal_accuracy", "refusal accuracy"),
                          ("refusal_accuracy_on_topic", "  on-topic unanswerable"),
                          ("refusal_accuracy_foreign", "  other-document unanswerable"),
                          ("false_refusal_rate", "false-refusal rate"), ("stop_rate", "stop rate")):
            if key not in rows[labels[0]]:
                continue
            cells = ["–" if rows[m][key] is None else f"{rows[m][key]:.3f}" for m in labels]
            comparisons = [summary["comparisons"][mode][m].get(key) for m in labels[1:]]
            cells += [_ci(c) if c and c.get("verdict") != "no data" else "no data" for c in comparisons]
            table.add_row(name, *cells)
        if "hit_at_k" in rows[labels[0]]:
            table.add_row(f"hit@{summary['retrieval_k']}", *[f"{rows[m]['hit_at_k']:.3f}" for m in labels],
                          *[""] * (len(labels) - 1))
        table.add_row("broken answers", *[str(rows[m]["broken_items"]) for m in labels], *[""] * (len(labels) - 1))
        console.print(table)
    for model, result in summary.get("targets", {}).items():
        console.print(targets_line(model, result))
    judge = summary.get("judge", {})
    if judge.get("enabled"):
        agreement = judge.get("agreement", {})
        console.print(f"judge {judge['judge']['model']}: {'reliable' if judge.get('reliable') else 'UNRELIABLE'} "
                      f"(kappa {agreement.get('kappa')}, {agreement.get('judged', 0)} gold items; repeat consistency "
                      f"{judge.get('repeat_consistency')}; verbosity probe padded wins "
                      f"{judge['verbosity_probe']['padded_wins']}/{judge['verbosity_probe']['items']})")
    if summary.get("promotion"):
        console.print(f"promotion: {summary['promotion']['reason']}")
    console.print(f"report: {out_dir / 'report.html'}")


def evaluate(
    project: str = typer.Argument(".", help="Project folder with sovllm.yaml."),
    quick: bool = options.quick("Evaluate eval.quick_limit items and a few judge checks (the CI smoke run)."),
    promote: bool = typer.Option(False, "--promote", help="Compare with the MLflow 'champion' and move the alias "
                                                          "to the candidate when it is better by the paired test."),
    set_: list[str] = options.overrides(),
    force: bool = options.force(),
) -> None:
    """Evaluate base and adapter(s) on out/curate/eval.jsonl; writes predictions, summary.json and report.html."""
    import json

    from sovllm.evaluate import stage
    from sovllm.progress import bar_factory

    root, cfg, log = options.stage_project(project, set_)
    result = options.pushed(cfg, "eval", "report", root, lambda: stage.run(
        root, cfg, quick=quick, force=force, promote=promote, log=log,
        progress_factory=bar_factory("eval", err)), log, outputs=("report", "mlflow"))
    out_dir = folder(root, cfg, "report")
    summary = json.loads((out_dir / "summary.json").read_text())
    print_summary(summary, out_dir, "eval (up to date, skipped)" if result.skipped else "eval")


def register(app: typer.Typer) -> None:
    app.command("eval")(evaluate)


def headline_lines(evaluation: dict) -> list[str]:
    """The run summary's answer to "is the adapter better?": per candidate, token F1 with its paired
    interval, refusal accuracy *together with* the false-refusal rate (either alone misleads), the
    stop rate, each next to the reference model's value, and which quality targets were missed."""
    headline = evaluation.get("headline", {})
    versus = headline.get("versus")
    reference = headline.get(versus, {}) if versus else {}

    def pct(value) -> str:
        return "–" if value is None else f"{value:.1%}"

    def on_topic(row) -> str:
        value = row.get("refusal_accuracy_on_topic")
        return "" if value is None else f" (on-topic {pct(value)})"

    lines = []
    for model, row in headline.items():
        if not isinstance(row, dict) or "f1_diff" not in row:
            continue
        c = row["f1_diff"]
        lines.append(f"headline ({headline['context']} context): {model} token F1 {row['f1']:.3f}, {c['diff']:+.3f} vs "
                     f"{versus} [95% CI {c['low']:+.3f}, {c['high']:+.3f}] → {c['verdict']}; refusal accuracy "
                     f"{pct(row['refusal_accuracy'])}{on_topic(row)} with {pct(row['false_refusal_rate'])} false "
                     f"refusals ({versus} "
                     f"{pct(reference.get('refusal_accuracy'))} / {pct(reference.get('false_refusal_rate'))}); stop "
                     f"rate {pct(row['stop_rate'])} ({versus} {pct(reference.get('stop_rate'))})")
        if evaluation.get("targets", {}).get(model):
            lines.append(targets_line(model, evaluation["targets"][model]))
    return lines


def targets_line(model: str, result: dict) -> str:
    """`quality targets for acme: 3 of 5 met; missed …` from summary.json's `targets` entry."""
    checks = result["checks"]
    missed = [k for k, ok in checks.items() if not ok]
    return f"quality targets for {model}: " + (
        "all met" if not missed else f"{len(checks) - len(missed)} of {len(checks)} met; missed {', '.join(missed)}")
