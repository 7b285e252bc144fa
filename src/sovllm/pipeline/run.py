"""`sovllm run`: validate the project, then run each stage in order, skipping up-to-date ones.

Each stage writes `out/<stage>/manifest.json`; the run writes `out/manifest.json` listing the
stages, whether each ran or was skipped, and their wall times. A stage whose inputs and config
hash to the same key as its last successful run is skipped, which makes re-running after an
interruption cheap. Stages: `model` (prepare the base model), `ingest` (documents → chunks),
`synth` (chunks → QA pairs), `curate` (pairs → filtered, judged, grouped splits), `train`
(splits → LoRA adapter, tracked in MLflow) and `eval` (base vs adapter on the eval split). synth
and curate share one endpoint: the embedded server is started once, when the first stage that
needs it runs, and stopped before training, so training gets every core; eval starts it again
with the new adapter loaded. The run samples the peak memory of its whole process tree.
"""

from __future__ import annotations

import datetime as dt
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from sovllm import egress, layout
from sovllm.artifacts import (
    Manifest,
    StageContext,
    StageResult,
    package_versions,
    run_stage,
    write_manifest,
)
from sovllm.config import Config, load_config, project_root
from sovllm.endpoint import open_endpoint
from sovllm.errors import ConfigError
from sovllm.ingest import stage as ingest
from sovllm.monitoring.push import pushed
from sovllm.pipeline.graph import stages
from sovllm.pipeline.memory import PeakMemory, release_memory
from sovllm.train import stage as train


@dataclass
class RunReport:
    root: Path
    out_dir: Path
    manifest: Manifest
    folders: dict[str, Path] = field(default_factory=dict)  # stage → the folder it wrote
    stages: list[tuple[str, StageResult]] = field(default_factory=list)
    peak_memory_gb: float | None = None


def _model_stage(cfg: Config, log: Callable[[str], None]):
    from sovllm.models import registry

    def work(ctx: StageContext) -> None:
        info = registry.prepare(cfg.model.base, log=log)
        ctx.model.update(info.as_dict())

    def verify(previous: Manifest) -> bool:
        try:
            return registry.resolve(cfg.model.base).base_id == previous.model.get("base_id")
        except Exception:  # noqa: BLE001 - anything wrong means: run the stage again
            return False

    return work, verify


def check_endpoints(cfg: Config) -> None:
    """Refuse to start when a configured endpoint lies outside `egress.allow`."""
    outside = cfg.endpoints_outside_allow_list()
    if outside:
        problems = [f"{key}: {url} is outside the egress allow-list; add its host to egress.allow "
                    f"if you run it yourself" for key, url in outside.items()]
        raise ConfigError("configured endpoints would send data off this machine", problems=problems)


STAGES = ("model", "ingest", "synth", "curate", "train", "eval")  # `model`, then the stage graph run here


def run_pipeline(directory: str | Path = ".", *, overrides: tuple[str, ...] = (), quick: bool = False,
                 force: bool = False, log: Callable[[str], None] = print, warn: Callable[[str], None] = print,
                 progress: Callable[[str], Callable] | None = None, until: str | None = None,
                 promote: bool = False) -> RunReport:
    """Run the project's pipeline; returns the run manifest and the per-stage results.

    `progress(stage_name)` gives the progress-bar factory for a stage (None: no bars); `until`
    names the last stage to run.
    """
    if until is not None and until not in STAGES:
        raise ConfigError(f"--until {until!r}: not a stage; choose one of {', '.join(STAGES)}")
    last = STAGES.index(until) if until else len(STAGES) - 1

    def want(stage: str) -> bool:
        return STAGES.index(stage) <= last

    root = project_root(directory)
    cfg = load_config(root, overrides)
    egress.install(cfg.egress.allow, proxy=cfg.egress.proxy)
    check_endpoints(cfg)
    out_dir = root / cfg.project.output_dir
    started = time.perf_counter()
    mark = egress.mark()
    report = RunReport(root, out_dir, manifest=None, folders={"model": out_dir / "model", **layout.stage_folders(root, cfg)})  # type: ignore[arg-type]
    with PeakMemory() as memory:
        _stages(report, cfg, root, out_dir, want, quick=quick, force=force, log=log, warn=warn, progress=progress,
                promote=promote)
    report.peak_memory_gb = memory.peak_gb

    report.manifest = Manifest(
        stage="run",
        key=cfg.hash(),
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        config=cfg.model_dump(mode="json"),
        versions=package_versions(),
        model=report.stages[0][1].manifest.model,
        endpoints=egress.summarise(egress.events()[mark:]),
        timings={"wall_s": round(time.perf_counter() - started, 3)},
        extra={
            "quick": quick,
            "project": str(root),
            "overrides": list(overrides),
            "until": until,
            "peak_memory_gb": report.peak_memory_gb,
            "stages": [{"stage": name, "status": "skipped" if r.skipped else "ran", "wall_s": round(r.seconds, 3),
                        "tokens": stage_tokens(r.manifest.counts),
                        "manifest": layout.shown(report.folders[name] / "manifest.json", root)}
                       for name, r in report.stages],
        },
    )
    write_manifest(out_dir, report.manifest)
    return report


def stage_tokens(counts: dict) -> dict:
    """A stage's prompt / generated / trained token counts from its manifest counts."""
    prompt = counts.get("prompt_tokens", 0) + counts.get("judge_prompt_tokens", 0)
    generated = counts.get("generated_tokens", 0) + counts.get("judge_generated_tokens", 0)
    return {"prompt": prompt, "generated": generated, "trained": counts.get("trained_tokens", 0)}


def _stages(report: RunReport, cfg: Config, root: Path, out_dir: Path, want: Callable[[str], bool], *, quick: bool,
            force: bool, log, warn, progress, promote: bool) -> None:
    work, verify = _model_stage(cfg, log)
    result = run_stage("model", out_dir / "model", work, config=cfg.model.model_dump(), force=force, verify=verify)
    report.stages.append(("model", result))


    graph = stages(cfg, 1, quick=quick, promote=promote)
    runners = {
        "ingest": lambda endpoint: ingest.run(root, cfg, quick=quick, force=force, warn=warn,
                                              progress_factory=progress("ingest") if progress else None),
        "synth": lambda endpoint: _synth().run(root, cfg, endpoint, quick=quick, force=force, log=log,
                                               progress_factory=progress("synth") if progress else None),
        "curate": lambda endpoint: _curate().run(root, cfg, endpoint, quick=quick, force=force, log=log,
                                                 progress_factory=progress("judge") if progress else None),
        "train": lambda endpoint: train.run(root, cfg, quick=quick, force=force, log=log,
                                            progress_factory=progress("train") if progress else None),
        # eval starts the embedded server again itself, now with the new adapter loaded
        "eval": lambda endpoint: _evaluate().run(root, cfg, quick=quick, force=force, promote=promote, log=log,
                                                 progress_factory=progress("eval") if progress else None,
                                                 in_pipeline=True),
    }
    shared = ExitStack()
    held: list = []

    @contextmanager
    def endpoint():
        # one endpoint (embedded server) for the stages that share it (synth, curate), started on first use
        if not held:
            held.append(shared.enter_context(open_endpoint(cfg, log=log)))
        yield held[0]

    try:
        for stage in graph:
            if not want(stage.name):
                continue
            if not stage.shares_endpoint and held:  # stopped before training: training gets every core
                shared.close()
                held.clear()
                release_memory()  # free what the stages before training left on the heap
            result = pushed(cfg.monitoring.pushgateway, cfg.project.name, stage.name,
                            lambda: runners[stage.name](endpoint), report.folders[stage.name], warn=warn)
            report.stages.append((stage.name, result))
    finally:
        shared.close()


def _synth():
    from sovllm.synth import stage

    return stage


def _curate():
    from sovllm.curate import stage

    return stage


def _evaluate():
    from sovllm.evaluate import stage

    return stage
