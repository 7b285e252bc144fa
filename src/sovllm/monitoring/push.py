"""Pipeline metrics to a Prometheus Pushgateway (`monitoring.pushgateway` in sovllm.yaml).

After each stage (run, skipped or failed), in `sovllm run` and in the single-stage commands the Argo
workflow's steps run (`sovllm ingest`, `synth`, `synth --shard K/N` as stage `synth-shard-K`,
`synth merge` as `synth`, `curate`, `train`, `eval`), one group is replaced:
`<pushgateway>/metrics/job/sovllm-pipeline/project/<name>/stage/<stage>`, holding

- `sovllm:pipeline_stage_duration_seconds`, `sovllm:pipeline_stage_failed` (1 or 0),
  `sovllm:pipeline_stage_skipped` (1: up to date), `sovllm:pipeline_stage_last_run_timestamp_seconds`;
- `sovllm:pipeline_stage_errors` (records the stage could not use: synth's failed generations);
- synth: `sovllm:pipeline_pairs_generated`; curate: `sovllm:pipeline_pairs_kept`;
- train: `sovllm:pipeline_train_loss` (best val loss), `sovllm:pipeline_train_steps`;
- eval: `sovllm:pipeline_eval_f1{model}` (gold context), `sovllm:pipeline_eval_promoted` and
  `sovllm:pipeline_eval_gate_refused` (1 when `--promote` kept the champion, else 0).

A Pushgateway that cannot be reached is a warning, never a failed run: monitoring must not stop
the pipeline. The host must be in `egress.allow` like every other endpoint.
"""

from __future__ import annotations

import re
import time
from typing import Callable
from urllib.parse import quote

JOB = "sovllm-pipeline"
PREFIX = "sovllm:pipeline_"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def exposition(stage: str, *, seconds: float, failed: bool, skipped: bool, counts: dict, extra: dict,
               now: float | None = None) -> str:
    """The group's samples in Prometheus' text format."""
    samples: list[tuple[str, dict, float]] = [
        ("stage_duration_seconds", {}, seconds), ("stage_failed", {}, float(failed)),
        ("stage_skipped", {}, float(skipped)), ("stage_last_run_timestamp_seconds", {}, now or time.time()),
        ("stage_errors", {}, float(counts.get("failures", 0) or 0)),
    ]
    if stage == "synth" and "pairs" in counts:
        samples.append(("pairs_generated", {}, float(counts["pairs"])))
    if stage == "curate" and "kept" in counts:
        samples.append(("pairs_kept", {}, float(counts["kept"])))
    if stage == "train":
        metrics = extra.get("metrics") or {}
        if metrics.get("best_val_loss") is not None:
            samples.append(("train_loss", {}, float(metrics["best_val_loss"])))
        if "steps" in counts:
            samples.append(("train_steps", {}, float(counts["steps"])))
    if stage == "eval":
        for model, row in (extra.get("headline") or {}).items():  # model → its gold-context metrics
            if isinstance(row, dict) and row.get("f1") is not None:
                samples.append(("eval_f1", {"model": model}, float(row["f1"])))
        promotion = extra.get("promotion")  # None without --promote: the gate did not run, so refused nothing
        promoted = bool(promotion and promotion.get("promoted"))
        samples += [("eval_promoted", {}, float(promoted)), ("eval_gate_refused", {}, float(bool(promotion) and not promoted))]
    lines, typed = [], set()
    for name, labels, value in samples:  # one TYPE line per metric (a second one is a parse error)
        if name not in typed:
            typed.add(name)
            lines.append(f"# TYPE {PREFIX}{name} gauge")
        shown = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
        lines.append(f"{PREFIX}{name}{{{shown}}} {value!r}")
    return "\n".join(lines) + "\n"


def push_stage(url: str | None, project: str, stage: str, *, seconds: float, failed: bool, skipped: bool,
               counts: dict | None = None, extra: dict | None = None, warn: Callable[[str], None] = print) -> bool:
    """Replace the stage's group on the Pushgateway at `url` (None: nothing to do). True when pushed."""
    if not url:
        return False
    import httpx

    body = exposition(stage, seconds=seconds, failed=failed, skipped=skipped, counts=counts or {}, extra=extra or {})
    safe = lambda v: quote(re.sub(r"[/\s]+", "-", v), safe="")  # noqa: E731 - one path segment each
    target = f"{url.rstrip('/')}/metrics/job/{JOB}/project/{safe(project)}/stage/{safe(stage)}"
    try:
        response = httpx.put(target, content=body.encode(), timeout=10,
                             headers={"Content-Type": "text/plain; version=0.0.4"})
    except Exception as exc:  # noqa: BLE001 - httpx errors and the egress guard's refusal alike
        warn(f"monitoring: could not push stage {stage} to {url} ({type(exc).__name__}: {exc})")
        return False
    if response.status_code >= 300:
        warn(f"monitoring: could not push stage {stage} to {url}: it answered {response.status_code} "
             f"{response.text[:200]}")
        return False
    return True


def pushed(url: str | None, project: str, stage: str, call: Callable, folder, *, warn: Callable[[str], None] = print):
    """Run the stage `call()` (a StageResult, or anything when `folder` holds the manifest) and push
    its outcome; a failure is pushed (from the failed manifest in `folder`) and raised again."""
    from pathlib import Path

    from sovllm.artifacts import load_manifest

    began = time.perf_counter()
    try:
        result = call()
    except BaseException:
        failed = load_manifest(Path(folder))
        push_stage(url, project, stage, failed=True, skipped=False, seconds=time.perf_counter() - began,
                   counts=failed.counts if failed else {}, extra=failed.extra if failed else {}, warn=warn)
        raise
    manifest = getattr(result, "manifest", None) or load_manifest(Path(folder))
    push_stage(url, project, stage, failed=False, skipped=bool(getattr(result, "skipped", False)),
               seconds=float(getattr(result, "seconds", time.perf_counter() - began)),
               counts=manifest.counts if manifest else {}, extra=manifest.extra if manifest else {}, warn=warn)
    return result
