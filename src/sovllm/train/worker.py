"""One training process: `python -m sovllm.train.worker PLAN.json`, started by the train stage
(`train.launch`) directly or, for several processes, under torchrun.

The plan (written by the stage) holds the resolved config, the hardware layout, the data hashes,
the checkpoint to resume from and the MLflow run to continue: every rank reads the same plan, so
every rank resumes from the same checkpoint. Each rank builds the same datasets and trains its
share of each optimizer step (DistributedDataParallel through the Trainer). Rank 0 alone starts
or continues the MLflow run, runs the stop check and the refusal calibration, writes the adapter,
registers it and reports; the other ranks stop after the fit.

Rank 0 talks to the stage through its stdout, one event per line (`EVENT` prefix + JSON): log
lines, the progress bar, the stage manifest's fields, and an error (type, message, hint) that the
stage raises again as the same sovllm error.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from pathlib import Path

from sovllm import errors
from sovllm.artifacts import StageContext, read_jsonl
from sovllm.config import Config
from sovllm.models.adapter import adapter_name
from sovllm.procs import die_with_parent
from sovllm.train import finish, steps
from sovllm.train.hardware import Hardware

EVENT = "\x1esovllm-train "


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


class Events:
    """Rank 0's messages to the stage (other ranks stay silent)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def emit(self, kind: str, **fields) -> None:
        if self.enabled:
            sys.stdout.write(EVENT + json.dumps({"event": kind, **fields}, default=str) + "\n")
            sys.stdout.flush()

    def log(self, message: str) -> None:
        self.emit("log", message=message)

    def bar(self, total: int) -> "EventBar":
        self.emit("bar", total=total)
        return EventBar(self)


class EventBar:
    def __init__(self, events: Events):
        self.events = events

    def advance(self, item: str = "", step: int = 1) -> None:
        self.events.emit("advance", item=item, step=step)

    def close(self) -> None:
        self.events.emit("bar_close")


class NoTracker:
    """What ranks other than 0 track: nothing."""

    run_id = None

    def params(self, params: dict) -> None: ...

    def metrics(self, metrics: dict, step: int | None = None) -> None: ...

    def artifacts(self, path: Path, artifact_path: str) -> None: ...

    def register(self, name: str, artifact_path: str, alias: str = "candidate") -> None: ...

    def end(self, status: str = "FINISHED") -> None: ...


def train(plan: dict, events: Events) -> None:
    """The train stage's work from the base model to the registered adapter, on this rank."""
    main = rank() == 0
    root, out_dir = Path(plan["root"]), Path(plan["out_dir"])
    cfg = Config.model_validate(plan["config"])
    section, quick, lora, hardware = cfg.train, plan["quick"], plan["lora"], Hardware(**plan["hardware"])
    log = events.log
    records = {split: (Path(plan[split]), list(read_jsonl(Path(plan[split])))) for split in ("train", "val")}
    (_, train_records), (_, val_records) = records["train"], records["val"]
    steps.setup_torch(section, hardware.threads)
    base, tokenizer, eot = steps.load_base(cfg)
    data = steps.build_datasets(cfg, records, tokenizer, eot, quick=quick, log=log)
    model = steps.lora_model(base.path, section, hardware=hardware)
    trainable, _ = model.get_nb_trainable_parameters()
    if hardware.qlora:
        quantised = sum(1 for m in model.modules() if type(m).__module__.startswith("bitsandbytes")
                        and type(m).__name__ == "Linear4bit")
        log(f"QLoRA: {quantised} linear layers of the base hold 4-bit NF4 weights (double quantisation, "
            f"{hardware.precision} compute)")
    checkpoints = out_dir / "checkpoints"
    resume = Path(plan["resume"]) if plan.get("resume") else None
    name = adapter_name(cfg)
    if main:
        tracker, uri, run_id = steps.start_tracking(root, cfg, name, plan.get("previous_run"),
                                                    checkpoints=checkpoints, key=plan["key"], log=log)
    else:
        tracker, uri, run_id = NoTracker(), None, None
    if resume is not None:
        log(f"resuming from {resume.name}")
        if hardware.processes > 1:  # every rank says where it resumes (they all read the same plan)
            print(f"rank {rank()}: resuming from {resume.name}", file=sys.stderr, flush=True)
    status = "FAILED"
    try:
        tracker.params(steps.run_params(section, data, base=base, lora=lora, hardware=hardware, quick=quick,
                                        trainable=trainable, data_hashes=plan["data_hashes"]))
        model, fit = steps.fit(model, tokenizer, data, section, checkpoints=checkpoints, resume=resume,
                               tracker=tracker, name=name, lora=lora, hardware=hardware, log=log,
                               progress_factory=events.bar if main else None)
        if not main:
            status = "FINISHED"
            return
        stop = finish.measure_stop_rate(model, tokenizer, data.val, eot, section, quick=quick, base_id=base.base_id,
                                        cache=out_dir / "stop-check-base.json")
        refusal = finish.calibrate_refusal(model, tokenizer, cfg, data.val, val_records, train_records, log)
        adapter_dir = out_dir / "adapter"
        manifest = finish.adapter_manifest(name, base, lora, data, fit, stop, refusal, hardware=hardware,
                                           data_hashes=plan["data_hashes"], run_id=run_id, uri=uri)
        finish.save_checked_adapter(model, tokenizer, adapter_dir, manifest)
        version = finish.track_results(tracker, root, cfg, fit, stop, refusal, adapter_dir)
        ctx = StageContext(out_dir)
        finish.fill_stage_manifest(ctx, root, cfg, data, fit, manifest, adapter_dir=adapter_dir, version=version)
        events.emit("result", model=ctx.model, counts=ctx.counts, timings=ctx.timings, extra=ctx.extra)
        finish.enforce_stop_check(stop, quick=quick, steps=data.steps, adapter_dir=adapter_dir, log=log)
        status = "FINISHED"
    finally:
        tracker.end(status)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    die_with_parent(signal.SIGKILL)  # a killed stage (or torchrun) takes its training processes with it
    events = Events(rank() == 0)
    try:
        plan = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
        train(plan, events)
    except errors.SovllmError as exc:
        events.emit("error", type=type(exc).__name__, message=exc.message, hint=exc.hint,
                    problems=getattr(exc, "problems", None))
        return 1
    except Exception:  # noqa: BLE001 - reported to the stage, which names the process and its last lines
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
