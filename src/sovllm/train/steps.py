"""The train stage's steps up to and including the fit, in the order `stage._train` calls them.

Set up torch → load the base model's tokenizer → build the datasets (encode, stop-token audit, the
`--quick` sample, shared-prefix trees, the step count) → put fresh LoRA weights on the base model →
find the resume point → start (or continue) the MLflow run → fit with the Trainer. What follows the
fit is in `train.finish`. Heavy libraries are imported inside the steps that use them.
`benchmarks/refusal.py` builds its model with `lora_model` and trains with the same Trainer
(`train.fit`) as `fit` here.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sovllm.artifacts import write_atomic
from sovllm.config import Config, TrainSection
from sovllm.errors import InputError
from sovllm.layout import folder
from sovllm.models.chat import end_of_turn_id
from sovllm.models.tokenizer import load_tokenizer
from sovllm.train.data import audit, encode, share_prefixes
from sovllm.train.fit import (
    make_trainer,
    progress_callback,
    run_fit,
    training_arguments,
)
from sovllm.train.hardware import Hardware
from sovllm.train.lora import lora_config
from sovllm.train.save import latest_checkpoint
from sovllm.train.tracking import Tracker, default_uri, trainer_callback

QUICK_VAL = 8
RUN_STATE = "sovllm-run.json"  # next to the checkpoints: the key they were written under and their MLflow run


@dataclass
class Datasets:
    """Audited training data and the schedule it implies; `units` is what the Trainer iterates over
    (the examples themselves, or shared-prefix trees of them)."""

    train: list
    val: list
    units: list
    val_units: list
    train_audit: object
    val_audit: object
    steps: int
    eval_steps: int
    grad_accum: int


def optimizer_steps(cfg: Config, n_train: int, quick: bool) -> int:
    """`train.quick_steps` under --quick, else `train.max_steps`, else `train.epochs` over `n_train` units
    but at least `train.min_steps`."""
    section = cfg.train
    if quick:
        return section.quick_steps
    if section.max_steps:
        return section.max_steps
    return max(1, section.min_steps, math.ceil(section.epochs * n_train / (section.batch_size * section.grad_accum)))


def setup_torch(section: TrainSection, threads: int = 0) -> int:
    """Silence transformers' own progress output, set torch's threads (`threads`, else
    `train.threads`, else every core) and seed; returns the thread count."""
    import warnings

    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
    threads = threads or section.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(section.seed)
    return threads


def load_base(cfg: Config):
    """(registry entry, tokenizer, end-of-turn token id) of the project's base model."""
    from sovllm.models import registry

    base = registry.resolve(cfg.model.base)
    tokenizer = load_tokenizer(base.path)
    return base, tokenizer, end_of_turn_id(tokenizer)


def build_datasets(cfg: Config, records: dict, tokenizer, eot: int, *, quick: bool,
                   log: Callable[[str], None]) -> Datasets:
    """Encode the train and val records and audit them (InputError before any training when the
    end-of-turn token would not be learned); under --quick, a small seeded sample."""
    section = cfg.train
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
    return Datasets(train, val, units, val_units, train_audit, val_audit, steps, eval_steps, grad_accum)


def lora_model(base_path: Path, section: TrainSection, *, hardware: Hardware | None = None, top_layers: int = 0):
    """The base model with fresh LoRA weights from `section`: in fp32 on the CPU by default, else as
    `hardware` says (bf16/fp16 base weights, or with QLoRA 4-bit NF4 with double quantisation and
    the compute dtype, prepared for k-bit training with gradient checkpointing). `top_layers` > 0
    puts the LoRA weights on the top N decoder layers only (`benchmarks/refusal.py --top-layers`)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    hardware = hardware or Hardware("cpu", "fp32", False, 1, 0)
    if hardware.qlora:
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=hardware.torch_dtype)
        where = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if hardware.device == "cuda" else "cpu"
        model = AutoModelForCausalLM.from_pretrained(str(base_path), quantization_config=quantization,
                                                     dtype=hardware.torch_dtype, device_map={"": where})
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        dtype = torch.float32 if hardware.precision == "fp32" else hardware.torch_dtype
        model = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=dtype)
    model.config.use_cache = False
    settings = lora_config(section)
    if top_layers:
        layers = model.config.num_hidden_layers
        settings.layers_to_transform = list(range(max(0, layers - top_layers), layers))
    model = get_peft_model(model, settings)
    if section.gradient_checkpointing and not hardware.qlora:
        model.enable_input_require_grads()
    return model


def resume_point(checkpoints: Path, key: str) -> tuple[Path | None, str | None]:
    """(checkpoint to resume from, the MLflow run it belongs to), or (None, None) for a fresh start.

    Only checkpoints written under the same `key` (data and settings) are resumed; any others are
    deleted, since resuming them would mix two trainings in one adapter."""
    state_file = checkpoints / RUN_STATE
    previous = json.loads(state_file.read_text()) if state_file.is_file() else {}
    resume = latest_checkpoint(checkpoints) if previous.get("key") == key else None
    if resume is None and checkpoints.exists():
        shutil.rmtree(checkpoints)
    checkpoints.mkdir(parents=True, exist_ok=True)
    return resume, previous.get("mlflow_run_id") if resume is not None else None


def start_tracking(root: Path, cfg: Config, name: str, continue_run: str | None, *, checkpoints: Path, key: str,
                   log: Callable[[str], None]):
    """Start the MLflow run (or continue `continue_run`) and note it beside the checkpoints, so a
    resumed training logs into the same run; returns (tracker, tracking URI, run id)."""
    tracking = cfg.train.tracking
    store = folder(root, cfg, "mlflow")
    uri = tracking.uri or default_uri(store)
    tracker = Tracker(uri, tracking.experiment or cfg.project.name, store, log=log)
    run_id = tracker.start(f"{name}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}", continue_run)
    write_atomic(checkpoints / RUN_STATE, json.dumps({"key": key, "mlflow_run_id": run_id}) + "\n")
    return tracker, uri, run_id


def run_params(section: TrainSection, data: Datasets, *, base, lora: dict, hardware: Hardware, quick: bool,
               trainable: int, data_hashes: dict) -> dict:
    """The MLflow params of a training run."""
    return {**{f"lora/{k}": v for k, v in lora.items()}, "base_model": base.name, "base_id": base.base_id,
            "steps": data.steps, "batch_size": section.batch_size, "grad_accum": data.grad_accum,
            "learning_rate": section.learning_rate, "warmup_ratio": section.warmup_ratio,
            "max_length": section.max_length, "batching": section.batching, "threads": hardware.threads,
            "device": hardware.device, "precision": hardware.precision, "qlora": hardware.qlora,
            "processes": hardware.processes,
            "train_examples": len(data.train), "val_examples": len(data.val), "quick": quick,
            "share_prefix": section.share_prefix, "train_units": len(data.units),
            "trainable_params": trainable, **{f"data/{k}": v for k, v in data_hashes.items()}}


def fit(model, tokenizer, data: Datasets, section: TrainSection, *, checkpoints: Path, resume: Path | None,
        tracker, name: str, lora: dict, hardware: Hardware, log: Callable[[str], None],
        progress_factory: Callable | None):
    """Train with sovllm's Trainer (`train.fit`), logging each step to `tracker`; returns (the model
    holding the best checkpoint's weights, FitResult)."""
    from transformers import EarlyStoppingCallback


    train, val, units, grad_accum = data.train, data.val, data.units, data.grad_accum
    args = training_arguments(checkpoints, steps=data.steps, batch_size=section.batch_size, grad_accum=grad_accum,
                              learning_rate=section.learning_rate, warmup_ratio=section.warmup_ratio,
                              weight_decay=section.weight_decay, eval_steps=data.eval_steps, seed=section.seed,
                              gradient_checkpointing=section.gradient_checkpointing or hardware.qlora,
                              has_val=bool(val), device=hardware.device, precision=hardware.precision,
                              processes=hardware.processes)
    callbacks = []
    if val and section.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=section.early_stopping_patience))
    trainer = make_trainer(model, tokenizer, units, data.val_units, args, batching=section.batching,
                           callbacks=callbacks, pad_id=tokenizer.pad_token_id)
    trainer.add_callback(trainer_callback(tracker, trainer.sovllm_counters))
    if units is not train:
        log(f"shared contexts: {len(train)} examples in {len(units)} trees, {sum(map(len, units)):,} tokens instead "
            f"of {sum(map(len, train)):,} (train.share_prefix); a step holds {section.batch_size}×{grad_accum} trees")
    trainable, total = model.get_nb_trainable_parameters()
    log(f"training {name}: {len(train)} examples, {data.steps} optimizer steps of {section.batch_size}×{grad_accum}, "
        f"LoRA {lora['preset']} r={lora['r']} ({trainable:,} of {total:,} parameters trainable) on {hardware.describe()}")
    bar = progress_factory(data.steps) if progress_factory else None
    if bar:
        trainer.add_callback(progress_callback(bar))
    try:
        result = run_fit(trainer, resume=resume)
    finally:
        if bar:
            bar.close()
    return trainer.model, result

