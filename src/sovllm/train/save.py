"""What the train stage leaves on disk, written so that a kill at any moment costs nothing finished.

Checkpoints: the Trainer writes `checkpoints/checkpoint-<step>` folders; `latest_checkpoint` finds
the newest complete one to resume from and deletes half-written ones. The adapter folder: PEFT
files, tokenizer, `manifest.json` and a README card are written into a staging folder and swapped
in whole (`save_adapter`), so the adapter path always holds one complete adapter; `recover_adapter`
undoes what a crash in the middle of that swap left.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from sovllm.artifacts import recover_dir, replace_dir
from sovllm.models.adapter import file_hashes

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
    """Undo what a crash inside `save_adapter` left: the previous adapter back in place, no temp folders."""
    recover_dir(adapter_dir)
    shutil.rmtree(_staging(adapter_dir), ignore_errors=True)


def save_adapter(model, tokenizer, adapter_dir: Path, manifest: dict) -> None:
    """Write the adapter into a temp folder, then swap it in: the path always holds a complete adapter."""
    tmp = _staging(adapter_dir)
    recover_adapter(adapter_dir)
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        # every file's sha256, so a copy (an object store, a PVC) can be verified before it is served
        manifest = {**manifest, "files": file_hashes(tmp)}
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
