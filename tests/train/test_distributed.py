"""Training as its own processes: two-process data parallel on CPU (gloo) against one process,
rank 0 alone tracking, kill -9 of one rank then resume, and QLoRA on bitsandbytes' CPU backend."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from sovllm.config import load_config
from sovllm.train import stage
from tests.train.conftest import TRAIN_FAST, complete, curated_project, train_command, train_until_first_checkpoint

pytestmark = pytest.mark.integration  # real training processes


def _weights(adapter: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(adapter / "adapter_model.safetensors"))


def _train(root: Path, *settings: str, log=lambda _: None):
    cfg = load_config(root, (*TRAIN_FAST, "train.max_steps=3", "train.batch_size=2", *settings))
    return stage.run(root, cfg, log=log)


def test_two_processes_train_the_adapter_one_process_trains_at_the_same_global_batch(tmp_path, tiny_model_dir):
    """2 processes × 2 trees per step vs 1 process × 2 trees × 2 accumulation steps: the same
    examples in every optimizer step, the same loss average, so the same adapter; one MLflow run
    and one registered version."""
    from mlflow import MlflowClient

    one, two = (curated_project(tmp_path / name, tiny_model_dir) for name in ("one", "two"))
    single = _train(one, "train.grad_accum=2")
    parallel = _train(two, "train.grad_accum=1", "train.num_processes=2")
    assert parallel.manifest.extra["training"]["processes"] == 2
    assert parallel.manifest.counts["trained_tokens"] == single.manifest.counts["trained_tokens"] > 0
    a, b = (_weights(root / "out" / "train" / "adapter") for root in (one, two))
    assert a.keys() == b.keys()
    scale = max(float(t.abs().max()) for t in a.values())
    assert scale > 0.01  # the adapter moved from its initialisation (B starts at zero)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5 * max(scale, 1.0)

    tracking = parallel.manifest.extra["mlflow"]
    client = MlflowClient(tracking_uri=tracking["tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name(tracking["experiment"]).experiment_id])
    assert [r.info.run_id for r in runs] == [tracking["run_id"]] and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["processes"] == "2"
    versions = client.search_model_versions(f"name='{tracking['registered_model']}'")
    assert [str(v.version) for v in versions] == ["1"]
    assert not (two / "out" / "train" / "checkpoints").exists()


def _rank_pids(parent: int) -> dict[int, int]:
    """RANK → pid of the training processes below `parent` (read from /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ranks = [v[5:] for v in environ if v.startswith(b"RANK=")]
        cmdline = (entry / "cmdline").read_bytes() if ranks else b""
        if ranks and b"sovllm.train.worker" in cmdline and _descends(int(entry.name), parent, stat):
            found[int(ranks[0])] = int(entry.name)
    return found


def _descends(pid: int, ancestor: int, stat: str) -> bool:
    for _ in range(8):
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == ancestor:
            return True
        if ppid <= 1:
            return False
        try:
            stat = Path(f"/proc/{ppid}/stat").read_text()
        except OSError:
            return False
    return False


def test_kill_9_of_one_rank_stops_the_run_and_every_rank_resumes_from_the_same_checkpoint(train_project):
    args = [*TRAIN_FAST, "train.max_steps=30", "train.eval_steps=3", "train.early_stopping_patience=0",
            "train.batch_size=2", "train.num_processes=2"]
    cmd = train_command(train_project, args)
    checkpoints = train_project / "out" / "train" / "checkpoints"
    proc = train_until_first_checkpoint(cmd, checkpoints)
    ranks = _rank_pids(proc.pid)
    assert sorted(ranks) == [0, 1], ranks
    os.kill(ranks[1], signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0, stderr
    assert not any(p.is_dir() for p in (Path(f"/proc/{pid}") for pid in ranks.values())
                   if p.exists() and "zombie" not in (p / "status").read_text().lower())  # no rank left running
    saved = sorted(int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*") if complete(p))
    assert saved and saved[-1] < 30
    first_run = json.loads((checkpoints / "sovllm-run.json").read_text())["mlflow_run_id"]

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    resumed = {line.split(": resuming from ")[1] for line in again.stderr.splitlines() if ": resuming from " in line
               and line.startswith("rank ")}
    assert len(resumed) == 1 and resumed.pop() == f"checkpoint-{saved[-1]}", again.stderr
    assert "rank 0: resuming" in again.stderr and "rank 1: resuming" in again.stderr
    manifest = json.loads((train_project / "out" / "train" / "manifest.json").read_text())
    assert manifest["status"] == "ok" and manifest["counts"]["steps"] == 30
    assert manifest["extra"]["mlflow"]["run_id"] == first_run


def test_qlora_trains_on_a_4bit_base_and_the_adapter_serves_on_the_unquantised_one(train_project, tiny_model_dir):
    pytest.importorskip("bitsandbytes", reason="sovllm[qlora] installs bitsandbytes; make test installs it")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lines = []
    result = _train(train_project, "train.qlora=true", log=lines.append)
    assert any(line.startswith("QLoRA: 14 linear layers of the base hold 4-bit NF4 weights") for line in lines), [x for x in lines if "QLoRA" in x]
    training = result.manifest.extra["training"]
    assert training["qlora"] and training["base_weights"] == "4-bit NF4 (QLoRA)"
    assert "unquantised" in training["served_on"]
    assert result.manifest.extra["stop_check"]["measured_on"] == "the 4-bit base the adapter was trained on"
    adapter = train_project / "out" / "train" / "adapter"
    manifest = json.loads((adapter / "manifest.json").read_text())
    assert manifest["training"]["qlora"]
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter))  # the plain fp32 base takes the adapter
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.inference_mode():
        with_adapter = model(input_ids=ids).logits
        with model.disable_adapter():
            without = model(input_ids=ids).logits
    assert not torch.allclose(with_adapter, without)  # it was trained: it changes the answers

    from fastapi.testclient import TestClient

    from sovllm.serve.server import build

    app, service = build(str(tiny_model_dir), served_name="tiny", adapters=[("qlora", str(adapter))],
                         max_lora_rank=8, max_num_seqs=4, max_model_len=512)
    try:
        with TestClient(app) as client:  # sovllm serve: the fp32 base with the adapter trained on its 4-bit copy
            client.portal.call(service.warm_up)
            answers = {}
            for name in ("tiny", "qlora"):
                response = client.post("/v1/chat/completions", json={
                    "model": name, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 6,
                    "temperature": 0, "logprobs": True})
                assert response.status_code == 200, response.text
                answers[name] = [e["logprob"] for e in response.json()["choices"][0]["logprobs"]["content"]]
            assert answers["tiny"] != answers["qlora"]
    finally:
        service.engine.shutdown()
