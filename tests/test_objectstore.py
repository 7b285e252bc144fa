"""Stage folders as `s3://` URLs against a real S3-compatible server on loopback (moto): a stage
command fetches its inputs, runs on local copies and uploads its output only when it succeeded."""

from __future__ import annotations

import io
import os
import tarfile

import pytest

from sovllm.cli import main
from sovllm.project import init_project
from tests.argo_local import tar_folder


def run(*args: str) -> int:
    try:
        main(list(args))
    except SystemExit as exc:
        return exc.code or 0
    return 0


def names(blob: bytes) -> set[str]:
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        return set(tar.getnames())


@pytest.fixture
def project(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    root = tmp_path / "p"
    init_project(root)
    config = root / "sovllm.yaml"
    config.write_text(config.read_text().replace("base: smollm2-135m-instruct", f"base: {tiny_model_dir}"))
    docs = tmp_path / "upload" / "documents"
    docs.mkdir(parents=True)
    (docs / "a.md").write_text("".join(f"# Part {i}\n\n" + f"Rule {i}: hotels cost 110 EUR. " * 40 + "\n\n"
                                       for i in range(4)))
    return root, docs


def test_a_stage_reads_and_writes_s3_locations(project, s3_server):
    root, docs = project
    port, client = s3_server
    client.create_bucket(Bucket="stages")
    client.put_object(Bucket="stages", Key="p/documents.tgz", Body=tar_folder(docs))
    store = ["--set", f"cluster.object_store.endpoint=127.0.0.1:{port}", "--set", "cluster.object_store.insecure=true"]
    where = ["--set", "project.documents=s3://stages/p/documents.tgz", "--set", "project.locations.chunks=s3://stages/p/chunks.tgz"]
    assert run("ingest", str(root), *store, *where) == 0
    uploaded = client.get_object(Bucket="stages", Key="p/chunks.tgz")["Body"].read()
    assert {"chunks/chunks.jsonl", "chunks/manifest.json"} <= names(uploaded)
    assert not (root / "out" / "ingest").exists()  # nothing written into the project's own layout
    # a second run finds its previous output in the store and skips
    assert run("ingest", str(root), *store, *where) == 0
    again = client.get_object(Bucket="stages", Key="p/chunks.tgz")["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(again), mode="r:gz") as tar:
        manifest = tar.extractfile("chunks/manifest.json").read()
    with tarfile.open(fileobj=io.BytesIO(uploaded), mode="r:gz") as tar:
        assert tar.extractfile("chunks/manifest.json").read() == manifest  # skipped: the same manifest
    # a missing input is an error that names the URL; nothing is uploaded for a failed stage
    missing = ["--set", "project.documents=s3://stages/p/nothing.tgz", "--set", "project.locations.chunks=s3://stages/p/other.tgz"]
    assert run("ingest", str(root), *store, *missing) != 0
    assert "Contents" not in client.list_objects_v2(Bucket="stages", Prefix="p/other")
    assert os.environ["AWS_ACCESS_KEY_ID"] == "testing"
