"""The train stage: `train.jsonl` + `val.jsonl` → a vLLM-servable LoRA adapter, tracked in MLflow.

`run` checks the options against the machine (`train.hardware`) and decides whether to train
(skipped when inputs and settings are unchanged); `_train` finds the resume point and runs the
training process(es) (`train.launch`, `train.worker`), which go through the named steps
(`train.steps` up to the fit, `train.finish` after it): resolve the base model → encode records → stop-token audit (fails before any training) → LoRA model →
Trainer (resumes from `out/train/checkpoints` after an interruption when data and settings are
unchanged) → best checkpoint → stop check (base vs adapter) → refusal calibration → adapter folder
(PEFT files, tokenizer, `manifest.json` with base_id, data hashes, audit and metrics, a README
card) → MLflow artifacts and a registered model version with alias `candidate`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from sovllm.artifacts import (
    StageContext,
    StageResult,
    read_jsonl,
    run_stage,
    sha256_file,
)
from sovllm.config import Config, config_hash
from sovllm.errors import InputError, SovllmError
from sovllm.layout import folder
from sovllm.train import hardware, launch, steps
from sovllm.train.lora import check_options, resolved
from sovllm.train.save import recover_adapter


def load_records(root: Path, cfg: Config) -> dict[str, tuple[Path, list[dict]]]:
    """Split name → (path, records) of curate's train and val splits; InputError when missing or empty."""
    out = folder(root, cfg, "splits")
    records = {}
    for split in ("train", "val"):
        path = out / f"{split}.jsonl"
        if not path.is_file():
            raise InputError(f"{path}: no {split} split yet", hint="run 'sovllm curate' first")
        records[split] = (path, list(read_jsonl(path)))
    if not records["train"][1]:
        raise InputError(f"{records['train'][0]}: the train split is empty", hint="check curate's funnel.json")
    return records


def run(root: Path, cfg: Config, *, quick: bool = False, force: bool = False, allow_non_vllm: bool = False,
        log: Callable[[str], None] = print, progress_factory: Callable | None = None) -> StageResult:
    """Run (or skip when up to date) training for the project at `root`."""
    records = load_records(root, cfg)
    section = cfg.train
    check_options(section, allow_non_vllm=allow_non_vllm)
    layout = hardware.plan(section, hardware.probe())
    out_dir = folder(root, cfg, "adapter")
    recover_adapter(out_dir / "adapter")  # before the skip check: a crash mid-save may have moved the adapter aside
    config = {"train": section.model_dump(mode="json"), "model": cfg.model.base, "prompt": cfg.prompt.model_dump(),
              "quick": quick, "allow_non_vllm": allow_non_vllm}

    def work(ctx: StageContext) -> None:
        _train(root, cfg, records, ctx, quick=quick, key=config_hash(config), lora=resolved(section), log=log,
               progress_factory=progress_factory, layout=layout)

    return run_stage("train", out_dir, work, inputs=[records["train"][0], records["val"][0]], config=config,
                     force=force, verify=lambda m: (out_dir / "adapter" / "adapter_config.json").is_file())


def _train(root: Path, cfg: Config, records: dict, ctx: StageContext, *, quick: bool, key: str, lora: dict,
           log: Callable[[str], None], progress_factory: Callable | None, layout: hardware.Hardware) -> None:
    """Train one adapter into `ctx.out_dir` in its own process(es) (`train.worker`), resuming from the
    last checkpoint written under the same data and settings."""
    (train_path, _), (val_path, _) = records["train"], records["val"]
    data_hashes = {"train.jsonl": sha256_file(train_path), "val.jsonl": sha256_file(val_path)}
    key = config_hash({"config": key, "data": data_hashes})  # resume only onto the same data and settings
    checkpoints = ctx.out_dir / "checkpoints"
    resume, previous_run = steps.resume_point(checkpoints, key)
    plan = {"root": str(root), "out_dir": str(ctx.out_dir), "config": cfg.model_dump(mode="json"), "quick": quick,
            "key": key, "lora": lora, "hardware": layout.as_dict(), "train": str(train_path), "val": str(val_path),
            "data_hashes": data_hashes, "resume": str(resume) if resume else None, "previous_run": previous_run}
    try:
        result = launch.run(plan, ctx.out_dir, layout, log=log, progress_factory=progress_factory)
    except SovllmError as exc:
        _fill(ctx, getattr(exc, "result", None))
        raise
    _fill(ctx, result)
    shutil.rmtree(checkpoints, ignore_errors=True)  # a finished run needs no resume point
    (ctx.out_dir / launch.PLAN).unlink(missing_ok=True)


def _fill(ctx: StageContext, result: dict | None) -> None:
    for field in ("model", "counts", "timings", "extra"):
        getattr(ctx, field).update((result or {}).get(field) or {})
