"""The train stage's steps after the fit, one function each, in the order `stage._train` calls them.

Measure the stop rate (base vs adapter) → calibrate the refusal bias on val → build the adapter's
manifest → save the adapter folder and check vLLM can load it → log metrics and artifacts to
MLflow and register the adapter → fill in the stage manifest → fail when the stop check failed.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Callable

from sovllm.artifacts import StageContext
from sovllm.config import Config, TrainSection
from sovllm.errors import ModelError
from sovllm.layout import folder
from sovllm.models.adapter import check_servable, inspect_adapter
from sovllm.models.chat import end_of_turn_id
from sovllm.models.grounding import Vocabulary
from sovllm.models.prompt import record_turn
from sovllm.train.data import encode
from sovllm.train.hardware import Hardware
from sovllm.train.save import save_adapter
from sovllm.train.steps import QUICK_VAL, Datasets
from sovllm.train.tracking import ui_command


def measure_stop_rate(model, tokenizer, val: list, eot: int, section: TrainSection, *, quick: bool,
                      base_id: str | None = None, cache: Path | None = None):
    """Base vs adapter: the share of val answers that end with the end-of-turn token (None without val);
    the base's share is kept in `cache` for the next training on the same val prompts."""
    from sovllm.train.stopcheck import check_stopping

    if not val:
        return None
    return check_stopping(model, val, eot_id=eot, pad_id=tokenizer.pad_token_id, min_rate=section.stop_min_rate,
                          limit=QUICK_VAL if quick else section.stop_prompts, base_id=base_id, cache=cache)


def calibrate_refusal(model, tokenizer, cfg: Config, val: list, val_records: list[dict], train_records: list[dict],
                      log: Callable[[str], None]):
    """The adapter's refusal bias chosen on val (sovllm.train.calibrate); None when switched off
    (`train.refusal_calibration`) or when val cannot support it."""
    if not cfg.train.refusal_calibration:
        return None
    from sovllm.train.calibrate import (
        calibrate,
        foreign_val_records,
        on_topic_val_records,
        refusal_token_ids,
    )

    kinds = {str(r.get("id")): (r.get("meta") or {}).get("type") == "unanswerable" for r in val_records}
    flags = [kinds.get(e.id, False) for e in val]
    tokens = refusal_token_ids(tokenizer, cfg.prompt.refusal)
    records = {str(r.get("id")): r for r in val_records}
    examples = list(val)
    eot = end_of_turn_id(tokenizer)
    built = {"foreign": foreign_val_records if cfg.train.refusal_val_foreign else None,
             "on_topic": on_topic_val_records if cfg.train.refusal_val_on_topic else None}
    added: dict[str, int] = {}
    for kind, builder in built.items():
        for record in builder(val_records, cfg.prompt.refusal, cfg.curate.max_overlap) if builder else []:
            example = encode(record, tokenizer, eot, "val.jsonl (calibration)")
            if len(example.prompt_ids) < cfg.train.max_length:
                records[example.id] = record
                examples.append(example)
                flags.append(True)
                added[kind] = added.get(kind, 0) + 1
    if not any(flags) or all(flags):
        log(f"refusal calibration skipped: val has {sum(flags)} unanswerable and {len(flags) - sum(flags)} answerable "
            "items, it needs both")
        return None
    vocabulary, support = None, None
    if cfg.train.refusal_support:
        vocabulary = Vocabulary.from_contexts(p[0] for p in map(record_turn, train_records) if p)
        support = [vocabulary.supports(*parts) if (parts := record_turn(records.get(e.id, {}))) else (1.0, 1.0)
                   for e in examples]
    result = calibrate(model, examples, flags, tokens, pad_id=tokenizer.pad_token_id,
                       max_false_refusals=cfg.train.refusal_max_false, support=support, vocabulary=vocabulary)
    result.val["foreign_questions"] = added.get("foreign", 0)
    result.val["on_topic_questions"] = added.get("on_topic", 0)
    before, after = result.val["before"], result.val["after"]
    n_u, n_a = result.val["unanswerable"], result.val["answerable"]
    made = [f"{n} val questions asked about another val document's context" if kind == "foreign" else
            f"{n} about their own context with the answer removed" for kind, n in added.items() if n]
    note = f" (of them {' and '.join(made)})" if made else ""
    log(f"refusal calibration on val: bias {result.describe()} on the refusal's first {len(tokens)} tokens; refused "
        f"{before['refused_unanswerable']}/{n_u} unanswerable{note} and {before['refused_answerable']}/{n_a} answerable "
        f"before, {after['refused_unanswerable']}/{n_u} and {after['refused_answerable']}/{n_a} after "
        f"(train.refusal_max_false {cfg.train.refusal_max_false:g})")
    return result


def adapter_manifest(name: str, base, lora: dict, data: Datasets, result, stop, refusal, *, hardware: Hardware,
                     data_hashes: dict, run_id: str, uri: str) -> dict:
    """The adapter folder's `manifest.json`: what it was trained on, how, and how it did."""
    metrics = {"best_val_loss": round(result.best_val_loss, 4) if result.best_val_loss is not None else None,
               "best_step": result.best_step,
               "train_loss": round(result.train_loss, 4) if result.train_loss is not None else None,
               "steps": result.steps, "loss_tokens": result.loss_tokens,
               "loss_tokens_per_s": round(result.tokens_per_s, 1), "padding_share": round(result.padding_share, 4),
               "train_seconds": round(result.seconds, 1), "stopped_early": result.stopped_early}
    training = {**hardware.as_dict(), "base_weights": "4-bit NF4 (QLoRA)" if hardware.qlora else hardware.precision,
                "served_on": "the unquantised base (the base_id below)" if hardware.qlora else "the same base"}
    if stop and hardware.qlora:
        stop = stop.as_dict() | {"measured_on": "the 4-bit base the adapter was trained on"}
    elif stop:
        stop = stop.as_dict()
    return {"name": name, "base_model": base.name, "base_id": base.base_id, "lora": lora, "training": training,
            "data": data_hashes, "audit": {"train": data.train_audit.as_dict(), "val": data.val_audit.as_dict()},
            "metrics": metrics, "stop_check": stop,
            "refusal_calibration": refusal.as_dict() if refusal else None, "mlflow_run_id": run_id,
            "tracking_uri": uri, "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def save_checked_adapter(model, tokenizer, adapter_dir: Path, manifest: dict) -> None:
    """Save the adapter folder, then prove vLLM can load it (unless the user allowed options it cannot)."""
    save_adapter(model, tokenizer, adapter_dir, manifest)
    lora = manifest["lora"]
    if not (lora["use_dora"] or lora["modules_to_save"] or lora["bias"] != "none"):
        check_servable(inspect_adapter(adapter_dir), base_id=manifest["base_id"], max_rank=lora["r"])


def track_results(tracker, root: Path, cfg: Config, result, stop, refusal, adapter_dir: Path) -> str | None:
    """Log the final metrics and the adapter (and curate's manifest) to MLflow; register the adapter
    as a model version unless it failed the stop check. Returns the version, if any."""
    tracker.metrics({"eval/best_loss": result.best_val_loss or float("nan"),
                     "train/loss_tokens_per_s": result.tokens_per_s, "train/padding_share": result.padding_share,
                     **({"eval/stop_rate_base": stop.base_rate, "eval/stop_rate_adapter": stop.adapter_rate}
                        if stop else {}),
                     **({"refusal/bias": refusal.bias, "refusal/support_weight": refusal.support_weight,
                         "refusal/line_weight": refusal.line_weight,
                         **{f"refusal/val_{k}_{when}": refusal.val[when][k] for when in ("before", "after")
                            for k in ("refusal_accuracy", "false_refusals")}} if refusal else {})}, step=result.steps)
    tracker.artifacts(adapter_dir, "adapter")
    curate_manifest = folder(root, cfg, "splits") / "manifest.json"
    if curate_manifest.is_file():
        tracker.artifacts(curate_manifest, "data")
    if stop is None or stop.passed:
        return tracker.register(cfg.train.tracking.registered_model or f"{cfg.project.name}-adapter", "adapter")
    return None


def fill_stage_manifest(ctx: StageContext, root: Path, cfg: Config, data: Datasets, result, manifest: dict, *,
                        adapter_dir: Path, version: str | None) -> None:
    """The train stage's own manifest: model, counts, timings and where the adapter and its run are."""
    tracking, uri = cfg.train.tracking, manifest["tracking_uri"]
    ctx.model.update({"base": manifest["base_model"], "base_id": manifest["base_id"], "adapter": str(adapter_dir)})
    ctx.counts.update({"train_examples": len(data.train), "val_examples": len(data.val), "steps": result.steps,
                       "trained_tokens": result.loss_tokens,
                       "dropped_too_long": len(data.train_audit.dropped_too_long)})
    ctx.timings.update({"train_s": round(result.seconds, 1)})
    ctx.extra.update({"adapter": str(adapter_dir), "metrics": manifest["metrics"], "audit": manifest["audit"],
                      "stop_check": manifest["stop_check"], "refusal_calibration": manifest["refusal_calibration"],
                      "lora": manifest["lora"], "training": manifest["training"],
                      "mlflow": {"tracking_uri": uri, "run_id": manifest["mlflow_run_id"],
                                 "experiment": tracking.experiment or cfg.project.name,
                                 "registered_model": tracking.registered_model or f"{cfg.project.name}-adapter",
                                 "version": version, "alias": "candidate" if version else None,
                                 "ui": ui_command(uri, folder(root, cfg, "mlflow"))}})


def enforce_stop_check(stop, *, quick: bool, steps: int, adapter_dir: Path, log: Callable[[str], None]) -> None:
    """A failed stop check fails the stage (ModelError); under --quick it is reported instead."""
    if stop is None or stop.passed:
        return
    if quick:
        log(f"warning: stop check not passed (adapter {stop.adapter_rate:.0%}, base {stop.base_rate:.0%}); "
            f"--quick trains {steps} steps, too few to learn stopping, so it reports instead of failing and "
            f"registers nothing")
        return
    raise ModelError(f"stop check failed: the adapter ends {stop.adapter_rate:.0%} of val answers with the "
                     f"end-of-turn token (base {stop.base_rate:.0%}, required {stop.min_rate:.0%} and at "
                     f"least the base)", hint=f"the adapter in {adapter_dir} was not registered; train longer or "
                                              "check the data")
