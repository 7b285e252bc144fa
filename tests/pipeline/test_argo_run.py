"""The rendered Argo workflow, executed for real on this machine: every DAG task's container command
as a subprocess in dependency order, artifacts through a real S3-compatible server on loopback
(moto's server), on the klinik example's --quick setting; it must produce what `sovllm run --quick`
produces."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sovllm.config import load_config
from sovllm.pipeline import argo
from tests.argo_local import LocalArgo, tar_folder

pytestmark = pytest.mark.integration  # the whole pipeline twice, on the bundled model

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "klinik"
SECRETS = {"sovllm-object-store": {"accessKey": "testing", "secretKey": "testing"}}


# the document added later: its one chunk has no structure pairs, so synth must ask the model about it
NEW = "medication-room-access.md"
# --quick, with every document and chunk (the defaults sample 4 documents and 12 chunks, so an added
# document would change the sample instead of adding its own work)
QUICK_ALL = "ingest:\n  languages: [en, de]\n  quick_documents: 50\nsynth:\n  quick_chunks: 500\n"


def _project(root: Path) -> Path:
    """The klinik example without one of its documents (added later), --quick over all of them, with
    judge gold labels (so the workflow must carry them to eval)."""
    root.mkdir(parents=True)
    shutil.copytree(EXAMPLE / "documents", root / "documents", ignore=shutil.ignore_patterns(NEW))
    (root / "labels").mkdir()  # klinik has no judge gold labels; acme's are self-contained judge items
    shutil.copy(EXAMPLE.parent / "acme" / "labels" / "judge-gold.jsonl", root / "labels" / "judge-gold.jsonl")
    text = (EXAMPLE / "sovllm.yaml").read_text(encoding="utf-8")
    assert "ingest:\n  languages: [en, de]\n" in text
    (root / "sovllm.yaml").write_text(text.replace("ingest:\n  languages: [en, de]\n", QUICK_ALL), encoding="utf-8")
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
            (("chunks", "ingest"), ("pairs", "synth"), ("splits", "curate"), ("adapter", "train"), ("report", "eval"))}


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
    # every chunk the model answered before comes from the cache; only the new document's go to the model
    assert now["reused"] == was["reused"] + was["generated"] and now["generated"] > 0, (how, was, now)
    kept = [p for p in _pairs(after["pairs"]) if p["chunk_id"] in old]
    assert kept == _pairs(before["pairs"]), how  # the old chunks' pairs, reused as they were
    assert any(p["chunk_id"] in added for p in _pairs(after["pairs"])), how
    old_split, new_split = (json.loads((d["splits"] / "splits.json").read_text())["chunks"] for d in (before, after))
    assert {c: new_split[c] for c in old_split} == old_split, how  # no old chunk moved between splits
    for folder in ("adapter", "report"):  # retrained on the new splits, evaluated again
        assert _manifest(after[folder])["created_at"] >= _manifest(before[folder])["created_at"], (how, folder)
        assert _manifest(after[folder])["key"] != _manifest(before[folder])["key"], (how, folder)


def test_the_rendered_workflow_runs_here_gives_the_outputs_of_sovllm_run_and_redoes_only_a_new_document(
        tmp_path, s3_server):
    port, client = s3_server
    sovllm = str(Path(sys.executable).with_name("sovllm"))
    env = {k: v for k, v in os.environ.items() if k != "CI"}

    def run_here(project: Path) -> None:
        done = subprocess.run([sovllm, "run", str(project), "--quick"], capture_output=True, text=True, timeout=1800,
                              env=env, check=False)
        assert done.returncode == 0, done.stderr[-3000:]

    local = _project(tmp_path / "local")
    run_here(local)
    first_local = tmp_path / "first-local"
    shutil.copytree(local / "out", first_local / "out")

    cluster = _project(tmp_path / "cluster")
    cfg = load_config(cluster, (f"cluster.object_store.endpoint=127.0.0.1:{port}", "cluster.object_store.insecure=true"))
    files = argo.render(cfg, (cluster / "sovllm.yaml").read_text(encoding="utf-8"), tmp_path / "rendered",
                        shards=2, quick=True)
    template = yaml.safe_load(files["WorkflowTemplate"].read_text(encoding="utf-8"))
    bucket, prefix = cfg.cluster.object_store.bucket, argo.prefix(cfg)
    client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key=f"{prefix}/documents.tgz", Body=tar_folder(cluster / "documents"))
    client.put_object(Bucket=bucket, Key=f"{prefix}/judge-gold.tgz",
                      Body=tar_folder(cluster / "labels" / "judge-gold.jsonl"))

    runner = LocalArgo(template, s3=client, secrets=SECRETS, workdir=tmp_path / "pods", sovllm=sovllm, env=env)
    steps = runner.run()
    assert [s.name for s in steps] == ["ingest", "synth-1", "synth-2", "synth-merge", "curate", "train", "eval"]
    assert all(s.attempts == 1 for s in steps)
    first = {s.name: s for s in steps}
    assert "chunks" in first["ingest"].skipped_optional  # a first run: no previous output to reuse
    assert "judge-gold" in first["eval"].fetched

    def fetch(root: Path) -> dict[str, Path]:
        return {name: _download(client, bucket, f"{prefix}/{name}.tgz", root / name)
                for name in ("chunks", "synth-shard-1", "synth-shard-2", "pairs", "splits", "adapter", "report")}

    first_cluster = fetch(tmp_path / "got-1")
    _same_outputs(first_cluster, _local(local))

    again = runner.run()  # a second run finds every stage's previous output and skips it
    for step in again:
        assert not step.skipped_optional, (step.name, step.skipped_optional)
        if step.name != "synth-merge":  # merging is cheap and always redone
            assert "(up to date, skipped)" in step.output, (step.name, step.output[-800:])

    # one new document: here and through the workflow, only its work is redone
    for project in (local, cluster):
        shutil.copy(EXAMPLE / "documents" / NEW, project / "documents" / NEW)
    run_here(local)
    _only_the_new_document_was_redone(_local(first_local), _local(local), "sovllm run")
    client.put_object(Bucket=bucket, Key=f"{prefix}/documents.tgz", Body=tar_folder(cluster / "documents"))
    third = {s.name: s for s in runner.run()}
    assert "(up to date, skipped)" not in third["synth-1"].output + third["synth-2"].output
    second_cluster = fetch(tmp_path / "got-2")
    _only_the_new_document_was_redone(first_cluster, second_cluster, "the workflow")
    _same_outputs(second_cluster, _local(local))
