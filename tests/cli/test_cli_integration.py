"""The example project with the real bundled model, as CI runs it (a new user's `sovllm init` path runs in
tests/pipeline/test_argo_run.py, together with the rendered workflow)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def sovllm(*args, env=None):
    # a guard against a hang, not a speed test (the time budget is measured separately): a --quick run
    # takes about 5 minutes on an idle 2-core machine and timed out at 600 s with a CPU hog beside it
    exe = shutil.which("sovllm", path=str(Path(sys.executable).parent)) or "sovllm"
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=1800, env=env)


def test_quick_run_of_the_example_project(tmp_path, bundled_model):
    """What CI runs: `sovllm run examples/acme --quick` (on a copy, so the checkout stays clean)."""
    example = Path(__file__).resolve().parents[2] / "examples" / "acme"
    project = tmp_path / "acme"
    shutil.copytree(example, project, ignore=shutil.ignore_patterns("out"))
    proc = sovllm("run", project, "--quick", env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((project / "out" / "manifest.json").read_text())
    assert [s["stage"] for s in manifest["extra"]["stages"]] == ["model", "ingest", "synth", "curate", "train",
                                                                     "eval"]
    ingest = json.loads((project / "out" / "ingest" / "manifest.json").read_text())
    assert ingest["counts"]["documents"] == 4 and ingest["counts"]["chunks"] > 0
    assert "chunk length (tokens)" in proc.stdout and "4 documents" in proc.stdout
    synth = json.loads((project / "out" / "synth" / "manifest.json").read_text())
    assert synth["status"] == "ok" and synth["counts"]["chunks"] == 12 and synth["counts"]["pairs"] > 0
    assert synth["model"]["embedded"] is True and synth["extra"]["answer_mode"] == "extractive"
    assert synth["endpoints"]["blocked"] == [] and synth["endpoints"]["contacted"]
    curate = json.loads((project / "out" / "curate" / "manifest.json").read_text())
    judge = curate["extra"]["funnel"]["judge"]
    assert curate["status"] == "ok" and judge["mode"] == "report" and 0 < judge["graded"] <= 12
    unrated = sum(n for kind, n in judge["failures"].items() if kind != "inconsistent")  # inconsistent: rated
    assert sum(judge["ratings"].values()) + unrated == judge["graded"]
    assert curate["counts"]["kept"] == curate["counts"]["pairs"]  # report-only: the judge removed nothing
    records = [json.loads(line) for split in ("train", "val", "eval")
               for line in (project / "out" / "curate" / f"{split}.jsonl").read_text().splitlines()]
    assert len(records) >= curate["counts"]["kept"]
    assert "splits (grouped by section)" in proc.stdout  # --quick: 4 documents, fewer than min_documents
    train = json.loads((project / "out" / "train" / "manifest.json").read_text())
    adapter = project / "out" / "train" / "adapter"
    assert train["status"] == "ok" and train["counts"]["steps"] == 4 and train["extra"]["audit"]["train"]["passed"]
    stop = train["extra"]["stop_check"]
    # the --quick stop check asks at most 8 val prompts (fewer when the val split is smaller)
    assert stop["prompts"] == min(8, train["counts"]["val_examples"]) > 0 and 0 <= stop["base_rate"] <= 1 and 0 <= stop["adapter_rate"] <= 1
    flat = " ".join(proc.stdout.split())
    assert f"adapter {adapter}" in flat and train["extra"]["mlflow"]["run_id"] in flat and "mlflow ui" in flat

    # eval: base vs the new adapter through the restarted embedded server, report and MLflow
    evaluation = json.loads((project / "out" / "eval" / "manifest.json").read_text())
    assert evaluation["status"] == "ok" and evaluation["counts"]["items"] == 8
    summary = json.loads((project / "out" / "eval" / "summary.json").read_text())
    calibration = train["extra"]["refusal_calibration"]  # None when the quick val sample lacks a kind of item
    assert summary["models"] == [{"label": "base", "served_as": "smollm2-135m-instruct"},
                                 {"label": "acme", "served_as": "acme",
                                  "refusal_bias": calibration["bias"] if calibration else None,
                                  "refusal_support_weight": (calibration["support"] or {"weight": 0.0})["weight"]
                                  if calibration else None,
                                  "refusal_line_weight": (calibration["support"] or {"line_weight": 0.0})["line_weight"]
                                  if calibration else None}]
    gold = summary["table"]["gold"]
    assert gold["base"]["items"] == gold["acme"]["items"] == 8 and gold["acme"]["unanswerable"] >= 1
    assert summary["comparisons"]["gold"]["acme"]["f1"]["resamples"] == 10_000
    assert summary["judge"]["agreement"]["items"] == 6  # --quick: 6 of the hand-labelled gold items
    assert summary["table"]["retrieved"]["acme"]["items"] == 4  # --quick: 4 answerable items, retrieved context
    assert (project / "out" / "eval" / "report.html").stat().st_size > 2000
    assert "gold context" in proc.stdout and "report:" in proc.stdout and "sovllm serve --project" in proc.stdout
    assert "peak memory" in flat
    import mlflow

    run = mlflow.MlflowClient(train["extra"]["mlflow"]["tracking_uri"]).get_run(train["extra"]["mlflow"]["run_id"])
    assert "test/gold/acme/f1" in run.data.metrics

    # the adapter loads in `sovllm serve` unchanged and answers
    import openai

    from sovllm.serve.launch import EmbeddedServer

    with EmbeddedServer("smollm2-135m-instruct", adapters={"acme": str(adapter)}) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="x")
        assert "acme" in {m.id for m in client.models.list().data}
        reply = client.chat.completions.create(model="acme", max_tokens=8,
                                               messages=[{"role": "user", "content": "Hello"}])
        assert reply.choices[0].message.content
