"""A new user's project, run here and as the rendered Argo workflow, executed for real on this machine.

The README's path: `sovllm init`, the small example's documents (all but one), `sovllm run --quick`
(with a Pushgateway receiving the stages' metrics). Then the rendered workflow: every DAG task's
container command as a subprocess in dependency order, artifacts through a real S3-compatible
server on loopback (moto's server); it must produce what `sovllm run --quick` produced. Then one
new document, here and through the workflow: only its work is redone, and the eval gate decides
whether the retrained adapter replaces the champion."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from sovllm.config import load_config
from sovllm.pipeline import argo
from sovllm.procs import dies_with_parent
from sovllm.serve.vllm_server import free_port
from tests.argo_local import LocalArgo, tar_folder
from tests.conftest import require

pytestmark = pytest.mark.integration  # the whole pipeline, here and as a workflow, on the bundled model

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "klinik"
SECRETS = {"sovllm-object-store": {"accessKey": "testing", "secretKey": "testing"}}


# the document added later: its chunks hash into the train split, so training has new data
NEW = "fortbildung.md"
# --quick, with every document and chunk (the defaults sample 4 documents and 12 chunks, so an added
# document would change the sample instead of adding its own work)
QUICK_ALL = (("quick_documents: 4 ", "quick_documents: 50"), ("quick_chunks: 12 ", "quick_chunks: 500"))


def sovllm(*args, env: dict) -> subprocess.CompletedProcess:
    exe = str(Path(sys.executable).with_name("sovllm"))
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=1800, env=env, check=False)


def _new_user_project(root: Path, env: dict) -> Path:
    """`sovllm init`, its first mistakes (no documents, one tiny document), then the small example's
    documents except NEW, with --quick taking every document and chunk, and judge gold labels."""
    assert sovllm("init", root, env=env).returncode == 0
    empty = sovllm("run", root, "--quick", env=env)
    assert empty.returncode == 2 and "no usable document" in empty.stderr  # nothing to ingest yet
    (root / "documents" / "tiny.md").write_text("# VPN\n\nTunnelwerk disconnects after 9 hours.\n", encoding="utf-8")
    tiny = sovllm("run", root, env=env)
    assert tiny.returncode == 2 and "too small to split" in tiny.stderr and "at least 3" in tiny.stderr
    (root / "documents" / "tiny.md").unlink()
    for path in (EXAMPLE / "documents").iterdir():
        if path.name != NEW:
            shutil.copy(path, root / "documents" / path.name)
    config = root / "sovllm.yaml"
    text = config.read_text(encoding="utf-8")
    for default, everything in QUICK_ALL:
        assert default in text
        text = text.replace(default, everything)
    config.write_text(text, encoding="utf-8")
    (root / "labels").mkdir()  # acme's judge gold labels are self-contained judge items
    shutil.copy(EXAMPLE.parent / "acme" / "labels" / "judge-gold.jsonl", root / "labels" / "judge-gold.jsonl")
    return root


def _download(client, bucket: str, key: str, target: Path) -> Path:
    from tests.argo_local import _untar

    _untar(client.get_object(Bucket=bucket, Key=key)["Body"].read(), target)
    return target


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _pairs(folder: Path) -> list[dict]:  # the generator's endpoint is a different loopback port in each run
    return [{**r, "generator": {**r["generator"], "endpoint": None}} for r in _records(folder / "qa.jsonl")]


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text(encoding="utf-8"))


def _same_outputs(got: dict[str, Path], want: dict[str, Path]) -> None:
    """The workflow's stage outputs are `sovllm run`'s: chunks, pairs, splits, the adapter's data, eval."""
    assert (got["chunks"] / "chunks.jsonl").read_bytes() == (want["chunks"] / "chunks.jsonl").read_bytes()
    assert _pairs(got["pairs"]) == _pairs(want["pairs"])  # the merged shards, in the unsharded run's order
    for split in ("train", "val", "eval"):
        assert (got["splits"] / f"{split}.jsonl").read_bytes() == (want["splits"] / f"{split}.jsonl").read_bytes()
    ours = json.loads((got["adapter"] / "adapter" / "manifest.json").read_text())
    theirs = json.loads((want["adapter"] / "adapter" / "manifest.json").read_text())
    assert ours["data"] == theirs["data"] and ours["metrics"]["steps"] == theirs["metrics"]["steps"]
    summary = lambda folder: json.loads((folder / "summary.json").read_text())  # noqa: E731
    assert summary(got["report"]).keys() == summary(want["report"]).keys()
    assert summary(got["report"])["judge"]["agreement"]["items"] == summary(want["report"])["judge"]["agreement"]["items"] > 0


def _local(root: Path) -> dict[str, Path]:
    return {name: root / "out" / stage for name, stage in
            (("chunks", "ingest"), ("pairs", "synth"), ("splits", "curate"), ("adapter", "train"), ("report", "eval"),
             ("mlflow", "mlflow"))}


def _registry(folders: dict[str, Path]):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{folders['mlflow'] / 'mlflow.db'}")
    return client, _manifest(folders["adapter"])["extra"]["mlflow"]["registered_model"]


def _champion(folders: dict[str, Path]) -> str | None:
    """The registered model's `champion` version in the project's MLflow store (None: no champion)."""
    client, name = _registry(folders)
    try:
        return str(client.get_model_version_by_alias(name, "champion").version)
    except Exception:  # noqa: BLE001 - no champion alias
        return None


def _champion_after(folders: dict[str, Path], decision: dict) -> str:
    """The champion the next run competes with: the first adapter, promoted by the gate or else by hand
    (as an operator accepts a first adapter in the MLflow UI), so that the gate's candidate-versus-champion
    path runs whatever the first decision was."""
    if not decision["promoted"]:
        client, name = _registry(folders)
        client.set_registered_model_alias(name, "champion", decision["candidate_version"])
    assert _champion(folders) == decision["candidate_version"]
    return decision["candidate_version"]


def _gate_decided(folders: dict[str, Path], champion_before: str | None, how: str) -> dict:
    """The eval gate ran on the new candidate (registered by training) against the champion, or the base
    model without one, and the MLflow `champion` alias is what its decision says."""
    version = _manifest(folders["adapter"])["extra"]["mlflow"]["version"]
    assert version, (how, "the --quick adapter passed the stop check, so training registered it")
    decision = json.loads((folders["report"] / "summary.json").read_text())["promotion"]
    assert decision["candidate_version"] == version and decision["champion_version"] == champion_before, (how, decision)
    assert decision["versus"] == ("champion" if champion_before else "base"), (how, decision)
    assert decision["f1"]["verdict"] in ("better", "worse", "no difference"), (how, decision)
    assert decision["promoted"] == (decision["f1"]["verdict"] == "better"), (how, decision)
    assert _champion(folders) == (version if decision["promoted"] else champion_before), (how, decision)
    return decision


def _synth_counts(folders: dict[str, Path]) -> dict[str, int]:
    """Chunks synth took from its cache (reused) and asked the model about (generated), over the shards."""
    manifests = [_manifest(d) for name, d in folders.items() if name.startswith("synth-shard-")] or \
        [_manifest(folders["pairs"])]
    return {k: sum(m["counts"][k] for m in manifests) for k in ("reused", "generated")}


def _only_the_new_document_was_redone(before: dict[str, Path], after: dict[str, Path], how: str) -> None:
    """After adding one document: its chunks are the only ones synth asked the model about, the old
    chunks' pairs are unchanged, no old chunk moved between splits, and training and eval ran again."""
    old = {c["id"] for c in _records(before["chunks"] / "chunks.jsonl")}
    now = _records(after["chunks"] / "chunks.jsonl")
    added = {c["id"] for c in now if c["source"]["path"].endswith(NEW)}
    assert added and {c["id"] for c in now} == old | added, how
    was, now = _synth_counts(before), _synth_counts(after)
    # every chunk the model answered before comes from its cache (only new chunks could go to the model)
    assert now["reused"] == was["reused"] + was["generated"], (how, was, now)
    kept = [p for p in _pairs(after["pairs"]) if p["chunk_id"] in old]
    assert kept == _pairs(before["pairs"]), how  # the old chunks' pairs, reused as they were
    assert any(p["chunk_id"] in added for p in _pairs(after["pairs"])), how
    old_split, new_split = (json.loads((d["splits"] / "splits.json").read_text())["chunks"] for d in (before, after))
    assert {c: new_split[c] for c in old_split} == old_split, how  # no old chunk moved between splits
    for folder in ("adapter", "report"):  # retrained on the new splits, evaluated again (and gated)
        assert _manifest(after[folder])["created_at"] >= _manifest(before[folder])["created_at"], (how, folder)
        assert _manifest(after[folder])["key"] != _manifest(before[folder])["key"], (how, folder)
    assert any(new_split[c] == "train" for c in added), how  # (so training had new data)


def test_a_new_users_project_runs_here_and_as_the_rendered_workflow_and_redoes_only_a_new_document(
        tmp_path, s3_server, bundled_model):
    port, client = s3_server
    env = {**{k: v for k, v in os.environ.items() if k != "CI"}, "COLUMNS": "200"}
    push_port = free_port("127.0.0.1")
    # Debian's build persists to /var/lib/prometheus by default: each test gets its own file
    gateway = subprocess.Popen([_pushgateway(), f"--web.listen-address=127.0.0.1:{push_port}",
                                f"--persistence.file={tmp_path / 'pushgateway.data'}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                               preexec_fn=dies_with_parent())  # never outlives a killed test run
    try:
        _run(tmp_path, port, client, env, f"http://127.0.0.1:{push_port}", bundled_model)
    finally:
        gateway.terminate()
        gateway.wait(timeout=30)


def _pushgateway() -> str:
    path = shutil.which("prometheus-pushgateway")
    require(path is not None, "Debian's prometheus-pushgateway (make monitoring)")
    return path




def _run(tmp_path: Path, port: int, client, env: dict, pushgateway: str, bundled_model) -> None:
    def run_here(project: Path) -> subprocess.CompletedProcess:
        done = sovllm("run", project, "--quick", "--promote", "--set", f"monitoring.pushgateway={pushgateway}",
                      env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "could not push" not in done.stdout + done.stderr
        return done

    local = _new_user_project(tmp_path / "local", env)
    cluster = tmp_path / "cluster"
    shutil.copytree(local, cluster)
    proc = run_here(local)
    # what a new user gets from a small corpus with the defaults
    manifest = json.loads((local / "out" / "manifest.json").read_text())
    assert manifest["model"]["base_id"] == bundled_model.base_id and manifest["endpoints"]["blocked"] == []
    assert "splits (grouped by section)" in proc.stdout and "split by section" in " ".join(proc.stdout.split())
    splits = json.loads((local / "out" / "curate" / "splits.json").read_text())
    assert splits["unit"] == "section" and set(splits["chunks"].values()) == {"train", "val", "eval"}
    assert json.loads((local / "out" / "synth" / "summary.json").read_text())["pairs_per_chunk"] >= 3
    summary = json.loads((local / "out" / "eval" / "summary.json").read_text())
    assert summary["split"]["unit"] == "section" and summary["split"]["leakage"]
    doctor = sovllm("doctor", local, env=env)
    assert doctor.returncode == 0 and "prepared at" in doctor.stdout
    first_local = tmp_path / "first-local"
    shutil.copytree(local / "out", first_local / "out")
    gated = {"local": _gate_decided(_local(local), None, "sovllm run")}
    champions = {"local": _champion_after(_local(local), gated["local"])}

    cfg = load_config(cluster, (f"cluster.object_store.endpoint=127.0.0.1:{port}", "cluster.object_store.insecure=true"))
    files = argo.render(cfg, (cluster / "sovllm.yaml").read_text(encoding="utf-8"), tmp_path / "rendered",
                        shards=2, quick=True, promote=True)
    template = yaml.safe_load(files["WorkflowTemplate"].read_text(encoding="utf-8"))
    bucket, prefix = cfg.cluster.object_store.bucket, argo.prefix(cfg)
    client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key=f"{prefix}/documents.tgz", Body=tar_folder(cluster / "documents"))
    client.put_object(Bucket=bucket, Key=f"{prefix}/judge-gold.tgz",
                      Body=tar_folder(cluster / "labels" / "judge-gold.jsonl"))

    runner = LocalArgo(template, s3=client, secrets=SECRETS, workdir=tmp_path / "pods",
                       sovllm=str(Path(sys.executable).with_name("sovllm")), env=env)
    steps = runner.run()
    assert [s.name for s in steps] == ["ingest", "synth-1", "synth-2", "synth-merge", "curate", "train", "eval"]
    assert all(s.attempts == 1 for s in steps)
    first = {s.name: s for s in steps}
    assert "chunks" in first["ingest"].skipped_optional  # a first run: no previous output to reuse
    assert "judge-gold" in first["eval"].fetched

    def fetch(root: Path) -> dict[str, Path]:
        return {name: _download(client, bucket, f"{prefix}/{name}.tgz", root / name)
                for name in ("chunks", "synth-shard-1", "synth-shard-2", "pairs", "splits", "adapter", "report", "mlflow")}

    first_cluster = fetch(tmp_path / "got-1")
    _same_outputs(first_cluster, _local(local))
    gated["cluster"] = _gate_decided(first_cluster, None, "the workflow")

    again = runner.run()  # a second run finds every stage's previous output and skips it
    for step in again:
        assert not step.skipped_optional, (step.name, step.skipped_optional)
        if step.name != "synth-merge":  # merging is cheap and always redone
            assert "(up to date, skipped)" in step.output, (step.name, step.output[-800:])

    champions["cluster"] = _champion_after(first_cluster, gated["cluster"])
    client.put_object(Bucket=bucket, Key=f"{prefix}/mlflow.tgz", Body=tar_folder(first_cluster["mlflow"]))

    # one new document: here and through the workflow, only its work is redone
    for project in (local, cluster):
        shutil.copy(EXAMPLE / "documents" / NEW, project / "documents" / NEW)
    run_here(local)
    _only_the_new_document_was_redone(_local(first_local), _local(local), "sovllm run")
    again_local = _gate_decided(_local(local), champions["local"], "sovllm run, new document")
    pushed = httpx.get(f"{pushgateway}/metrics", timeout=30).text  # every stage of the runs pushed its group
    for stage in ("ingest", "synth", "curate", "train", "eval"):
        assert f'sovllm:pipeline_stage_failed{{instance="",job="sovllm-pipeline",project="local",stage="{stage}"}} 0' in pushed, stage
    refused = int(not again_local["promoted"])  # the last run's gate decision, as pushed
    assert f'sovllm:pipeline_eval_gate_refused{{instance="",job="sovllm-pipeline",project="local",stage="eval"}} {refused}' in pushed
    from sovllm.monitoring import dashboards

    for panel in dashboards.pipeline_panels():  # every series the pipeline dashboard reads was pushed by a real run
        for expr, _ in panel.queries:
            name = expr.split("(")[-1].split("{")[0]
            assert f"\n{name}{{" in pushed, (panel.title, name)
    client.put_object(Bucket=bucket, Key=f"{prefix}/documents.tgz", Body=tar_folder(cluster / "documents"))
    third = {s.name: s for s in runner.run()}
    assert "(up to date, skipped)" not in third["synth-1"].output + third["synth-2"].output
    second_cluster = fetch(tmp_path / "got-2")
    _only_the_new_document_was_redone(first_cluster, second_cluster, "the workflow")
    _gate_decided(second_cluster, champions["cluster"], "the workflow, new document")
    _same_outputs(second_cluster, _local(local))
