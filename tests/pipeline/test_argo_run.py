"""The rendered Argo workflow, executed for real on this machine: every DAG task's container command
as a subprocess in dependency order, artifacts through a real S3-compatible server on loopback
(moto's server), on the klinik example's --quick setting; it must produce what `sovllm run --quick`
produces."""

from __future__ import annotations

import json
import os
import shutil
import socket
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def s3_server():
    """moto's S3-compatible server on loopback, and a client for it."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    try:
        yield port, client
    finally:
        server.stop()


def _project(root: Path) -> Path:
    root.mkdir(parents=True)
    shutil.copytree(EXAMPLE / "documents", root / "documents")
    shutil.copy(EXAMPLE / "sovllm.yaml", root / "sovllm.yaml")
    return root


def _download(client, bucket: str, key: str, target: Path) -> Path:
    from tests.argo_local import _untar

    _untar(client.get_object(Bucket=bucket, Key=key)["Body"].read(), target)
    return target


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_the_rendered_workflow_runs_here_and_gives_the_outputs_of_sovllm_run(tmp_path, s3_server):
    port, client = s3_server
    sovllm = str(Path(sys.executable).with_name("sovllm"))
    env = {k: v for k, v in os.environ.items() if k != "CI"}

    local = _project(tmp_path / "local")
    done = subprocess.run([sovllm, "run", str(local), "--quick"], capture_output=True, text=True,
                          timeout=1800, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]

    cluster = _project(tmp_path / "cluster")
    cfg = load_config(cluster, (f"cluster.object_store.endpoint=127.0.0.1:{port}", "cluster.object_store.insecure=true"))
    files = argo.render(cfg, (cluster / "sovllm.yaml").read_text(encoding="utf-8"), tmp_path / "rendered",
                        shards=2, quick=True)
    template = yaml.safe_load(files["WorkflowTemplate"].read_text(encoding="utf-8"))
    bucket, prefix = cfg.cluster.object_store.bucket, argo.prefix(cfg)
    client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key=f"{prefix}/documents.tgz", Body=tar_folder(cluster / "documents"))

    runner = LocalArgo(template, s3=client, secrets=SECRETS, workdir=tmp_path / "pods", sovllm=sovllm, env=env)
    steps = runner.run()
    assert [s.name for s in steps] == ["ingest", "synth-1", "synth-2", "synth-merge", "curate", "train", "eval"]
    assert all(s.attempts == 1 for s in steps)
    first = {s.name: s for s in steps}
    assert "chunks" in first["ingest"].skipped_optional  # a first run: no previous output to reuse

    got = tmp_path / "got"
    for stage in ("ingest", "synth", "curate", "train", "eval"):
        _download(client, bucket, f"{prefix}/out/{stage}.tgz", got / stage)
    want = local / "out"
    assert (got / "ingest" / "chunks.jsonl").read_bytes() == (want / "ingest" / "chunks.jsonl").read_bytes()
    def pairs(root: Path) -> list[dict]:  # the generator's endpoint is a different loopback port in each run
        return [{**r, "generator": {**r["generator"], "endpoint": None}} for r in _records(root / "qa.jsonl")]

    assert pairs(got / "synth") == pairs(want / "synth")  # the merged shards, in the unsharded run's order
    for split in ("train", "val", "eval"):
        assert (got / "curate" / f"{split}.jsonl").read_bytes() == (want / "curate" / f"{split}.jsonl").read_bytes()
    ours = json.loads((got / "train" / "adapter" / "manifest.json").read_text())
    theirs = json.loads((want / "train" / "adapter" / "manifest.json").read_text())
    assert ours["data"] == theirs["data"] and ours["metrics"]["steps"] == theirs["metrics"]["steps"]
    summary = lambda root: json.loads((root / "summary.json").read_text())  # noqa: E731
    assert summary(got / "eval").keys() == summary(want / "eval").keys()

    again = runner.run()  # a second run finds every stage's previous output and skips it
    for step in again:
        assert not step.skipped_optional, (step.name, step.skipped_optional)
        if step.name != "synth-merge":  # merging is cheap and always redone
            assert "(up to date, skipped)" in step.output, (step.name, step.output[-800:])
