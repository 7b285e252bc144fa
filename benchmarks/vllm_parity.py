"""Eval parity: a project's eval split through `sovllm serve` (its finished eval) and through vLLM.

    PYTHONPATH=src .venv/bin/python benchmarks/vllm_parity.py examples/klinik [--out parity.json]

The project must have run to the end (`sovllm run`): its `out/eval` holds the embedded server's
predictions. The script copies the project to a temporary folder, starts vLLM (`.venv-vllm`, or
SOVLLM_VLLM_PYTHON) with runtime adapter loading and sovllm's refusal plugin, runs `sovllm eval`
there against vLLM (`endpoint.base_url`; eval loads the adapter through /v1/load_lora_adapter), and
compares the two
summaries per model and context mode (token F1, refusal accuracy, false refusals, stop rate) and
the predictions item by item (refused or not, answer text identical). With `--no-plugin` vLLM
serves the adapter without the calibration, to show what the plugin changes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from sovllm.config import load_config
from sovllm.models import registry
from sovllm.models.adapter import adapter_name
from sovllm.serve.vllm_server import VLLMServer

METRICS = ("f1", "refusal_accuracy", "refusal_accuracy_on_topic", "false_refusal_rate", "stop_rate")


def predictions(path: Path) -> dict[tuple, dict]:
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            out[(record["model"], record["context"], record["id"])] = record
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("project", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="write the comparison as JSON here")
    parser.add_argument("--no-plugin", action="store_true", help="serve on vLLM without sovllm's refusal plugin")
    args = parser.parse_args()
    cfg = load_config(args.project)
    out_dir = args.project / cfg.project.output_dir
    adapter = out_dir / "train" / "adapter"
    if not (out_dir / "eval" / "summary.json").is_file() or not (adapter / "adapter_config.json").is_file():
        sys.exit(f"{args.project}: no finished run (out/eval/summary.json and out/train/adapter); run `sovllm run` first")
    name = adapter_name(cfg)
    base = registry.prepare(cfg.model.base)
    with tempfile.TemporaryDirectory(prefix="sovllm-parity-") as tmp:
        copy = Path(tmp) / args.project.name
        shutil.copytree(args.project, copy, ignore=shutil.ignore_patterns("mlflow"))
        shutil.rmtree(copy / cfg.project.output_dir / "eval")
        # started without the adapter: eval loads it through the runtime API, as a configured endpoint gets it
        with VLLMServer(base.path, served_name=base.name, runtime_lora=True,
                        calibration=not args.no_plugin) as server:
            overrides = [f"endpoint.base_url={server.base_url}", f"endpoint.model={base.name}",
                         f"eval.models=[{base.name}, {name}]"]
            cmd = [sys.executable, "-m", "sovllm", "eval", str(copy)]
            for item in overrides:
                cmd += ["--set", item]
            done = subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, check=False)
            if done.returncode != 0:
                sys.exit(f"sovllm eval against vLLM failed ({done.returncode}); vLLM log:\n{server.log_tail()}")
        theirs = json.loads((copy / cfg.project.output_dir / "eval" / "summary.json").read_text())
        ours = json.loads((out_dir / "eval" / "summary.json").read_text())
        mine, other = predictions(out_dir / "eval" / "predictions.jsonl"), predictions(
            copy / cfg.project.output_dir / "eval" / "predictions.jsonl")
    labels = {"base": "base", name: name}
    rows, items = [], {}
    for mode in ours.get("modes", ["gold"]):
        for label in labels:
            a, b = ours["table"][mode].get(label, {}), theirs["table"][mode].get(label if label == name else base.name,
                                                                                   theirs["table"][mode].get(label, {}))
            rows.append({"mode": mode, "model": label, **{f"sovllm_{k}": a.get(k) for k in METRICS},
                         **{f"vllm_{k}": b.get(k) for k in METRICS}})
    for (model, mode, item), record in mine.items():
        theirs_model = model if model != "base" else base.name
        match = other.get((theirs_model, mode, item)) or other.get((model, mode, item))
        key = f"{model}/{mode}"
        stats = items.setdefault(key, {"items": 0, "same_text": 0, "same_refusal": 0})
        stats["items"] += 1
        if match is not None:
            stats["same_text"] += record["answer"] == match["answer"]
            stats["same_refusal"] += record["refused"] == match["refused"]
    result = {"project": str(args.project), "plugin": not args.no_plugin, "metrics": rows, "items": items}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
