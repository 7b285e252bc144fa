"""The train stage: `train.jsonl` + `val.jsonl` → a vLLM-servable LoRA adapter, tracked in MLflow.

`run` decides whether to train (skipped when inputs and settings are unchanged); `_train` is the
stage as a sequence of named steps (`train.steps` up to the fit, `train.finish` after it): resolve
the base model → encode records → stop-token audit (fails before any training) → LoRA model →
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
from sovllm.errors import InputError
from sovllm.models.adapter import adapter_name
from sovllm.train import finish, steps
from sovllm.train.lora import check_options, resolved
from sovllm.train.save import recover_adapter
from sovllm.train.steps import cuda_available


def load_records(root: Path, cfg: Config) -> dict[str, tuple[Path, list[dict]]]:
    """Split name → (path, records) of curate's train and val splits; InputError when missing or empty."""
    out = root / cfg.project.output_dir / "curate"
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
    check_options(section, cuda=cuda_available(), allow_non_vllm=allow_non_vllm)
    out_dir = root / cfg.project.output_dir / "train"
    recover_adapter(out_dir / "adapter")  # before the skip check: a crash mid-save may have moved the adapter aside
    config = {"train": section.model_dump(mode="json"), "model": cfg.model.base, "prompt": cfg.prompt.model_dump(),
              "quick": quick, "allow_non_vllm": allow_non_vllm}

    def work(ctx: StageContext) -> None:
        _train(root, cfg, records, ctx, quick=quick, key=config_hash(config), lora=resolved(section), log=log,
               progress_factory=progress_factory)

    return run_stage("train", out_dir, work, inputs=[records["train"][0], records["val"][0]], config=config,
                     force=force, verify=lambda m: (out_dir / "adapter" / "adapter_config.json").is_file())


def _train(root: Path, cfg: Config, records: dict, ctx: StageContext, *, quick: bool, key: str, lora: dict,
           log: Callable[[str], None], progress_factory: Callable | None) -> None:
    """Train one adapter into `ctx.out_dir`, step by step."""
    section = cfg.train
    (train_path, train_records), (val_path, val_records) = records["train"], records["val"]
    threads = steps.setup_torch(section)
    base, tokenizer, eot = steps.load_base(cfg)
    data = steps.build_datasets(cfg, records, tokenizer, eot, quick=quick, log=log)
    model = steps.lora_model(base.path, section)
    trainable, _ = model.get_nb_trainable_parameters()

    data_hashes = {"train.jsonl": sha256_file(train_path), "val.jsonl": sha256_file(val_path)}
    key = config_hash({"config": key, "data": data_hashes})  # resume only onto the same data and settings
    checkpoints = ctx.out_dir / "checkpoints"
    resume, previous_run = steps.resume_point(checkpoints, key)
    name = adapter_name(cfg)
    tracker, uri, run_id = steps.start_tracking(root, cfg, name, previous_run, checkpoints=checkpoints, key=key,
                                                log=log)
    if resume is not None:
        log(f"resuming from {resume.name}")
    status = "FAILED"
    try:
        tracker.params(steps.run_params(section, data, base=base, lora=lora, threads=threads, quick=quick,
                                        trainable=trainable, data_hashes=data_hashes))
        model, fit = steps.fit(model, tokenizer, data, section, checkpoints=checkpoints, resume=resume,
                               tracker=tracker, name=name, lora=lora, threads=threads, log=log,
                               progress_factory=progress_factory)
        stop = finish.measure_stop_rate(model, tokenizer, data.val, eot, section, quick=quick)
        refusal = finish.calibrate_refusal(model, tokenizer, cfg, data.val, val_records, train_records, log)
        adapter_dir = ctx.out_dir / "adapter"
        manifest = finish.adapter_manifest(name, base, lora, data, fit, stop, refusal, data_hashes=data_hashes,
                                           run_id=run_id, uri=uri)
        finish.save_checked_adapter(model, tokenizer, adapter_dir, manifest)
        version = finish.track_results(tracker, root, cfg, fit, stop, refusal, adapter_dir)
        finish.fill_stage_manifest(ctx, root, cfg, data, fit, manifest, adapter_dir=adapter_dir, version=version)
        finish.enforce_stop_check(stop, quick=quick, steps=data.steps, adapter_dir=adapter_dir, log=log)
        status = "FINISHED"
    finally:
        tracker.end(status)
    shutil.rmtree(checkpoints, ignore_errors=True)  # a finished run needs no resume point
