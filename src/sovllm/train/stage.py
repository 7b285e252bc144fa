"""The train stage: `train.jsonl` + `val.jsonl` → a vLLM-servable LoRA adapter, tracked in MLflow.

Order: resolve the base model → encode records → stop-token audit (fails before any training) →
LoRA model → Trainer (resumes from `out/train/checkpoints` after an interruption when data and
settings are unchanged) → best checkpoint saved as the adapter → stop check (base vs adapter) →
MLflow artifacts and a registered model version with alias `candidate`. The adapter folder holds
the PEFT files, the tokenizer, `manifest.json` (base_id, data hashes, audit, metrics) and a README card.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import random
import re
import shutil
from pathlib import Path
from typing import Callable

from sovllm.artifacts import (StageContext, StageResult, read_jsonl, recover_dir, replace_dir, run_stage,
                              sha256_file, write_atomic)
from sovllm.config import Config, config_hash
from sovllm.errors import InputError, ModelError

QUICK_VAL = 8


def load_records(root: Path, cfg: Config) -> dict[str, tuple[Path, list[dict]]]:
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


def optimizer_steps(cfg: Config, n_train: int, quick: bool) -> int:
    section = cfg.train
    if quick:
        return section.quick_steps
    if section.max_steps:
        return section.max_steps
    return max(1, math.ceil(section.epochs * n_train / (section.batch_size * section.grad_accum)))


def adapter_name(cfg: Config) -> str:
    from sovllm.models.adapter import validate_name

    return validate_name(cfg.train.adapter_name or cfg.project.name)


def run(root: Path, cfg: Config, *, quick: bool = False, force: bool = False, allow_non_vllm: bool = False,
        log: Callable[[str], None] = print, progress_factory: Callable | None = None) -> StageResult:
    """Run (or skip when up to date) training for the project at `root`."""
    from sovllm.train.lora import check_options, resolved

    records = load_records(root, cfg)
    section = cfg.train
    check_options(section, cuda=_cuda(), allow_non_vllm=allow_non_vllm)
    out_dir = root / cfg.project.output_dir / "train"
    recover_adapter(out_dir / "adapter")  # before the skip check: a crash mid-save may have moved the adapter aside
    config = {"train": section.model_dump(mode="json"), "model": cfg.model.base, "prompt": cfg.prompt.model_dump(),
              "quick": quick, "allow_non_vllm": allow_non_vllm}

    def work(ctx: StageContext) -> None:
        _train(root, cfg, records, ctx, quick=quick, key=config_hash(config), lora=resolved(section), log=log,
               progress_factory=progress_factory)

    return run_stage("train", out_dir, work, inputs=[records["train"][0], records["val"][0]], config=config,
                     force=force, verify=lambda m: (out_dir / "adapter" / "adapter_config.json").is_file())


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _train(root: Path, cfg: Config, records: dict, ctx: StageContext, *, quick: bool, key: str, lora: dict,
           log: Callable[[str], None], progress_factory: Callable | None) -> None:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, EarlyStoppingCallback

    from sovllm.models import registry
    from sovllm.models.adapter import check_servable, inspect_adapter
    from sovllm.models.chat import end_of_turn_id
    from sovllm.models.tokenizer import load_tokenizer
    from sovllm.train.data import audit, encode, share_prefixes
    from sovllm.train.fit import make_trainer, progress_callback, run_fit, training_arguments
    from sovllm.train.lora import lora_config
    from sovllm.train.stopcheck import check_stopping
    from sovllm.train.tracking import Tracker, default_uri, trainer_callback, ui_command

    import warnings

    import transformers

    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
    section = cfg.train
    threads = section.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(section.seed)
    base = registry.resolve(cfg.model.base)
    tokenizer = load_tokenizer(base.path)
    eot = end_of_turn_id(tokenizer)
    (train_path, train_records), (val_path, val_records) = records["train"], records["val"]
    train = [encode(r, tokenizer, eot, f"{train_path}") for r in train_records]
    val = [encode(r, tokenizer, eot, f"{val_path}") for r in val_records]
    train, train_audit = audit(train, tokenizer, max_length=section.max_length, too_long=section.too_long,
                               batch_size=section.batch_size, eot_id=eot)
    val, val_audit = audit(val, tokenizer, max_length=section.max_length, too_long="drop",
                           batch_size=section.batch_size, eot_id=eot)
    log(f"stop-token audit passed: {train_audit.kept} train / {val_audit.kept} val examples end with token "
        f"{eot} as a label (pad {tokenizer.pad_token_id}); {len(train_audit.dropped_too_long)} too long, dropped")
    if not train:
        raise InputError(f"{train_path}: no example fits train.max_length={section.max_length}")
    grad_accum = 1 if quick else section.grad_accum
    if quick:
        # a seeded sample, so the smoke run sees refusals too (they sit at the end of train.jsonl)
        train = random.Random(section.seed).sample(train, min(len(train), section.quick_steps * section.batch_size))
        val = sorted(val, key=lambda e: e.id)[:QUICK_VAL]
    # examples sharing a context train as one tree each: same loss and gradients, the context computed once
    units = share_prefixes(train, max_tokens=section.max_length) if section.share_prefix else train
    # val loss on the same kind of trees: each val context computed once per evaluation
    val_units = share_prefixes(val, max_tokens=section.max_length) if section.share_prefix and val else val
    steps = optimizer_steps(cfg, len(units), quick)
    eval_steps = steps if quick else min(section.eval_steps, steps)

    model = AutoModelForCausalLM.from_pretrained(str(base.path), dtype=torch.float32)
    model.config.use_cache = False
    model = get_peft_model(model, lora_config(section))
    if section.gradient_checkpointing:
        model.enable_input_require_grads()
    trainable, total = model.get_nb_trainable_parameters()

    data_hashes = {"train.jsonl": sha256_file(train_path), "val.jsonl": sha256_file(val_path)}
    key = config_hash({"config": key, "data": data_hashes})  # resume only onto the same data and settings
    out_dir = ctx.out_dir
    checkpoints = out_dir / "checkpoints"
    state_file = checkpoints / "sovllm-run.json"
    previous = json.loads(state_file.read_text()) if state_file.is_file() else {}
    resume = latest_checkpoint(checkpoints) if previous.get("key") == key else None
    if resume is None and checkpoints.exists():
        shutil.rmtree(checkpoints)  # checkpoints of other data or settings must not be resumed
    checkpoints.mkdir(parents=True, exist_ok=True)

    tracking = section.tracking
    uri = tracking.uri or default_uri(root / cfg.project.output_dir)
    tracker = Tracker(uri, tracking.experiment or cfg.project.name, root / cfg.project.output_dir, log=log)
    name = adapter_name(cfg)
    run_id = tracker.start(f"{name}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}",
                           previous.get("mlflow_run_id") if resume is not None else None)
    write_atomic(state_file, json.dumps({"key": key, "mlflow_run_id": run_id}) + "\n")
    if resume is not None:
        log(f"resuming from {resume.name}")
    params = {**{f"lora/{k}": v for k, v in lora.items()}, "base_model": base.name, "base_id": base.base_id,
              "steps": steps, "batch_size": section.batch_size, "grad_accum": grad_accum,
              "learning_rate": section.learning_rate, "warmup_ratio": section.warmup_ratio,
              "max_length": section.max_length, "batching": section.batching, "threads": threads,
              "train_examples": len(train), "val_examples": len(val), "quick": quick,
              "share_prefix": section.share_prefix, "train_units": len(units),
              "trainable_params": trainable, **{f"data/{k}": v for k, v in data_hashes.items()}}
    status = "FAILED"
    try:
        tracker.params(params)
        args = training_arguments(checkpoints, steps=steps, batch_size=section.batch_size, grad_accum=grad_accum,
                                  learning_rate=section.learning_rate, warmup_ratio=section.warmup_ratio,
                                  weight_decay=section.weight_decay, eval_steps=eval_steps, seed=section.seed,
                                  gradient_checkpointing=section.gradient_checkpointing, has_val=bool(val),
                                  bf16=_cuda())
        callbacks = []
        if val and section.early_stopping_patience:
            callbacks.append(EarlyStoppingCallback(early_stopping_patience=section.early_stopping_patience))
        trainer = make_trainer(model, tokenizer, units, val_units, args, batching=section.batching, callbacks=callbacks,
                               pad_id=tokenizer.pad_token_id)
        trainer.add_callback(trainer_callback(tracker, trainer.sovllm_counters))
        if units is not train:
            log(f"shared contexts: {len(train)} examples in {len(units)} trees, {sum(map(len, units)):,} tokens instead "
                f"of {sum(map(len, train)):,} (train.share_prefix); a step holds {section.batch_size}×{grad_accum} trees")
        log(f"training {name}: {len(train)} examples, {steps} optimizer steps of {section.batch_size}×{grad_accum}, "
            f"LoRA {lora['preset']} r={lora['r']} ({trainable:,} of {total:,} parameters trainable), {threads} threads")
        bar = progress_factory(steps) if progress_factory else None
        if bar:
            trainer.add_callback(progress_callback(bar))
        try:
            fit = run_fit(trainer, resume=resume)
        finally:
            if bar:
                bar.close()
        model = trainer.model
        stop = check_stopping(model, val, eot_id=eot, pad_id=tokenizer.pad_token_id, min_rate=section.stop_min_rate,
                              limit=QUICK_VAL if quick else section.stop_prompts) if val else None
        refusal = _calibrate_refusal(model, tokenizer, cfg, val, val_records, train_records, log) \
            if section.refusal_calibration else None
        adapter_dir = out_dir / "adapter"
        metrics = {"best_val_loss": round(fit.best_val_loss, 4) if fit.best_val_loss is not None else None, "best_step": fit.best_step, "train_loss": round(fit.train_loss, 4) if fit.train_loss is not None else None,
                   "steps": fit.steps, "loss_tokens": fit.loss_tokens, "loss_tokens_per_s": round(fit.tokens_per_s, 1),
                   "padding_share": round(fit.padding_share, 4), "train_seconds": round(fit.seconds, 1),
                   "stopped_early": fit.stopped_early}
        manifest = {"name": name, "base_model": base.name, "base_id": base.base_id, "lora": lora,
                    "data": data_hashes, "audit": {"train": train_audit.as_dict(), "val": val_audit.as_dict()},
                    "metrics": metrics, "stop_check": stop.as_dict() if stop else None,
                    "refusal_calibration": refusal.as_dict() if refusal else None, "mlflow_run_id": run_id,
                    "tracking_uri": uri, "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        _save_adapter(model, tokenizer, adapter_dir, manifest)
        if not (lora["use_dora"] or lora["modules_to_save"] or lora["bias"] != "none"):
            check_servable(inspect_adapter(adapter_dir), base_id=base.base_id, max_rank=lora["r"])
        tracker.metrics({"eval/best_loss": fit.best_val_loss or float("nan"), "train/loss_tokens_per_s": fit.tokens_per_s,
                         "train/padding_share": fit.padding_share,
                         **({"eval/stop_rate_base": stop.base_rate, "eval/stop_rate_adapter": stop.adapter_rate}
                            if stop else {}),
                         **({"refusal/bias": refusal.bias, "refusal/support_weight": refusal.support_weight,
                             **{f"refusal/val_{k}_{when}": refusal.val[when][k] for when in ("before", "after")
                                for k in ("refusal_accuracy", "false_refusals")}} if refusal else {})}, step=fit.steps)
        tracker.artifacts(adapter_dir, "adapter")
        curate_manifest = root / cfg.project.output_dir / "curate" / "manifest.json"
        if curate_manifest.is_file():
            tracker.artifacts(curate_manifest, "data")
        version = None
        if stop is None or stop.passed:
            version = tracker.register(tracking.registered_model or f"{cfg.project.name}-adapter", "adapter")
        ctx.model.update({"base": base.name, "base_id": base.base_id, "adapter": str(adapter_dir)})
        ctx.counts.update({"train_examples": len(train), "val_examples": len(val), "steps": fit.steps,
                           "trained_tokens": fit.loss_tokens, "dropped_too_long": len(train_audit.dropped_too_long)})
        ctx.timings.update({"train_s": round(fit.seconds, 1)})
        ctx.extra.update({"adapter": str(adapter_dir), "metrics": metrics, "audit": manifest["audit"],
                          "stop_check": manifest["stop_check"], "refusal_calibration": manifest["refusal_calibration"],
                          "lora": lora,
                          "mlflow": {"tracking_uri": uri, "run_id": run_id, "experiment": tracking.experiment
                                     or cfg.project.name, "registered_model": tracking.registered_model
                                     or f"{cfg.project.name}-adapter", "version": version,
                                     "alias": "candidate" if version else None,
                                     "ui": ui_command(uri, root / cfg.project.output_dir)}})
        if stop is not None and not stop.passed and quick:
            log(f"warning: stop check not passed (adapter {stop.adapter_rate:.0%}, base {stop.base_rate:.0%}); "
                f"--quick trains {steps} steps, too few to learn stopping, so it reports instead of failing and "
                f"registers nothing")
        elif stop is not None and not stop.passed:
            raise ModelError(f"stop check failed: the adapter ends {stop.adapter_rate:.0%} of val answers with the "
                             f"end-of-turn token (base {stop.base_rate:.0%}, required {stop.min_rate:.0%} and at "
                             f"least the base)", hint=f"the adapter in {adapter_dir} was not registered; train longer or "
                                                      "check the data")
        status = "FINISHED"
    finally:
        tracker.end(status)
    shutil.rmtree(checkpoints, ignore_errors=True)  # a finished run needs no resume point


def _calibrate_refusal(model, tokenizer, cfg: Config, val: list, val_records: list[dict], train_records: list[dict],
                       log: Callable[[str], None]):
    """The adapter's refusal bias chosen on val (sovllm.train.calibrate); None when val cannot support it."""
    from sovllm.models.grounding import Vocabulary, record_turn
    from sovllm.train.calibrate import calibrate, foreign_val_records, refusal_token_ids

    kinds = {str(r.get("id")): (r.get("meta") or {}).get("type") == "unanswerable" for r in val_records}
    flags = [kinds.get(e.id, False) for e in val]
    if not any(flags) or all(flags):
        log(f"refusal calibration skipped: val has {sum(flags)} unanswerable and {len(flags) - sum(flags)} answerable "
            "items, it needs both")
        return None
    tokens = refusal_token_ids(tokenizer, cfg.prompt.refusal)
    records = {str(r.get("id")): r for r in val_records}
    examples = list(val)
    if cfg.train.refusal_val_foreign:
        from sovllm.models.chat import end_of_turn_id
        from sovllm.train.data import encode

        eot = end_of_turn_id(tokenizer)
        for record in foreign_val_records(val_records, cfg.prompt.refusal, cfg.curate.max_overlap):
            example = encode(record, tokenizer, eot, "val.jsonl (calibration)")
            if len(example.prompt_ids) < cfg.train.max_length:
                records[example.id] = record
                examples.append(example)
                flags.append(True)
    vocabulary, support = None, None
    if cfg.train.refusal_support:
        vocabulary = Vocabulary.from_contexts(p[0] for p in map(record_turn, train_records) if p)
        support = [vocabulary.support(*parts) if (parts := record_turn(records.get(e.id, {}))) else 1.0
                   for e in examples]
    result = calibrate(model, examples, flags, tokens, pad_id=tokenizer.pad_token_id,
                       max_false_refusals=cfg.train.refusal_max_false, support=support, vocabulary=vocabulary)
    foreign = len(examples) - len(val)
    result.val["foreign_questions"] = foreign
    before, after = result.val["before"], result.val["after"]
    n_u, n_a = result.val["unanswerable"], result.val["answerable"]
    weight = f" - {result.support_weight:g} x lexical support" if result.support_weight else ""
    added = f" (of them {foreign} val questions asked about another val document's context)" if foreign else ""
    log(f"refusal calibration on val: bias {result.bias:+.2f}{weight} on the refusal's first {len(tokens)} tokens; refused "
        f"{before['refused_unanswerable']}/{n_u} unanswerable{added} and {before['refused_answerable']}/{n_a} answerable "
        f"before, {after['refused_unanswerable']}/{n_u} and {after['refused_answerable']}/{n_a} after "
        f"(train.refusal_max_false {cfg.train.refusal_max_false:g})")
    return result


CHECKPOINT_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt", "adapter_model.safetensors")
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint; incomplete ones (a kill during the write) are deleted.

    Only folders named `checkpoint-<step>` count: anything else there (a user's `checkpoint-best`
    copy) is neither resumed nor deleted.
    """
    found = [p for p in checkpoints.glob("checkpoint-*") if _CHECKPOINT.fullmatch(p.name) and p.is_dir()]
    for path in sorted(found, key=lambda p: int(p.name.rsplit("-", 1)[1]), reverse=True):
        if all((path / f).is_file() for f in CHECKPOINT_FILES) and _readable_state(path / "trainer_state.json"):
            return path
        shutil.rmtree(path, ignore_errors=True)
    return None


def _readable_state(path: Path) -> bool:
    try:
        return isinstance(json.loads(path.read_text(encoding="utf-8")), dict)
    except (OSError, ValueError):
        return False


def _staging(adapter_dir: Path) -> Path:
    return adapter_dir.with_name(f".{adapter_dir.name}.tmp")


def recover_adapter(adapter_dir: Path) -> None:
    """Undo what a crash inside `_save_adapter` left: the previous adapter back in place, no temp folders."""
    recover_dir(adapter_dir)
    shutil.rmtree(_staging(adapter_dir), ignore_errors=True)


def _save_adapter(model, tokenizer, adapter_dir: Path, manifest: dict) -> None:
    """Write the adapter into a temp folder, then swap it in: the path always holds a complete adapter."""
    tmp = _staging(adapter_dir)
    recover_adapter(adapter_dir)
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(_card(manifest), encoding="utf-8")
        replace_dir(tmp, adapter_dir)
    except BaseException:
        recover_adapter(adapter_dir)  # the previous adapter stays (or is put back); no half-written one is left
        raise


def _bias_text(calibration: dict | None) -> str:
    if not calibration:
        return "none"
    weight = (calibration.get("support") or {}).get("weight")
    minus = f" − {weight:g} × the question's lexical support in its context" if weight else ""
    return (f"{calibration['bias']:+.2f}{minus} on the refusal sentence's first {len(calibration['token_ids'])} tokens, "
            "chosen on val (applied by `sovllm serve` to requests in the training format, not by vLLM)")


def _card(m: dict) -> str:
    lora, metrics, stop = m["lora"], m["metrics"], m.get("stop_check") or {}
    lines = [f"# {m['name']}", "", f"LoRA adapter for `{m['base_model']}` (base_id `{m['base_id'][:16]}…`), trained by sovllm.",
             "", "| | |", "| --- | --- |",
             f"| LoRA | preset {lora['preset']}, r {lora['r']}, alpha {lora['lora_alpha']}, targets {lora['target_modules']} |",
             f"| steps | {metrics['steps']} (best val loss {metrics['best_val_loss']} at step {metrics['best_step']}) |",
             f"| stop rate on val | adapter {stop.get('adapter_rate')} vs base {stop.get('base_rate')} "
             f"(max_new_tokens {stop.get('max_new_tokens')}) |",
             f"| refusal bias | {_bias_text(m.get('refusal_calibration'))} |",
             f"| data | train.jsonl `{m['data']['train.jsonl'][:12]}…`, val.jsonl `{m['data']['val.jsonl'][:12]}…` |",
             f"| MLflow run | `{m['mlflow_run_id']}` |", "",
             "Serve it: `sovllm serve --model " + m["base_model"] + f" --adapter {m['name']}=<this folder>` "
             "(or vLLM `--enable-lora --lora-modules`). Use the project's system prompt: the adapter was trained with it.", ""]
    return "\n".join(lines)
