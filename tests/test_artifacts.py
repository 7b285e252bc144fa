"""Manifests, JSONL I/O and stage skipping by input/config hash."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from sovllm import egress
from sovllm.artifacts import load_manifest, read_jsonl, run_stage, sha256_path, write_jsonl
from sovllm.errors import InputError


class Counter:
    def __init__(self):
        self.calls = 0

    def __call__(self, ctx):
        self.calls += 1
        (ctx.out_dir / "out.txt").write_text(str(self.calls))
        ctx.counts["items"] = 3


def test_stage_runs_once_then_skips_until_inputs_or_config_change(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("a")
    out = tmp_path / "stage"
    work = Counter()
    first = run_stage("demo", out, work, inputs=[src], config={"k": 1})
    assert not first.skipped and work.calls == 1
    manifest = load_manifest(out)
    assert manifest.status == "ok" and manifest.counts == {"items": 3}
    assert manifest.inputs[0].sha256 == sha256_path(src) and manifest.config == {"k": 1}
    assert manifest.versions["python"] and "wall_s" in manifest.timings

    assert run_stage("demo", out, work, inputs=[src], config={"k": 1}).skipped and work.calls == 1
    assert not run_stage("demo", out, work, inputs=[src], config={"k": 2}).skipped and work.calls == 2
    src.write_text("b")
    assert not run_stage("demo", out, work, inputs=[src], config={"k": 2}).skipped and work.calls == 3
    assert not run_stage("demo", out, work, inputs=[src], config={"k": 2}, force=True).skipped
    assert not run_stage("demo", out, work, inputs=[src], config={"k": 2}, verify=lambda m: False).skipped
    assert work.calls == 5


def test_a_copied_project_skips_its_finished_stages(tmp_path):
    import shutil

    project = tmp_path / "a"
    (project / "out").mkdir(parents=True)
    (project / "in.txt").write_text("a")
    work = Counter()
    run_stage("demo", project / "out" / "stage", work, inputs=[project / "in.txt"], config={"k": 1})
    shutil.copytree(project, tmp_path / "b")
    copy = tmp_path / "b"
    assert run_stage("demo", copy / "out" / "stage", work, inputs=[copy / "in.txt"], config={"k": 1}).skipped
    (copy / "in.txt").write_text("changed")
    assert not run_stage("demo", copy / "out" / "stage", work, inputs=[copy / "in.txt"], config={"k": 1}).skipped
    assert work.calls == 2


def test_folder_inputs_hash_names_and_contents(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.md").write_text("x")
    before = sha256_path(tmp_path / "d")
    (tmp_path / "d" / "a.md").rename(tmp_path / "d" / "b.md")
    assert sha256_path(tmp_path / "d") != before


def test_failed_stage_leaves_failed_manifest_and_is_retried(tmp_path):
    out = tmp_path / "stage"

    def boom(ctx):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        run_stage("demo", out, boom)
    manifest = load_manifest(out)
    assert manifest.status == "failed" and manifest.error == "RuntimeError: disk full"
    work = Counter()
    assert not run_stage("demo", out, work).skipped and work.calls == 1


def test_manifest_records_endpoints_of_the_stage_and_its_children(tmp_path):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    port = server.getsockname()[1]
    egress.install([])

    def work(ctx):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        code = f"import socket\ntry: socket.create_connection(('127.0.0.2', {port}), timeout=2)\nexcept OSError: pass"
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60)

    manifest = run_stage("demo", tmp_path / "stage", work).manifest
    server.close()
    assert manifest.endpoints == {"contacted": [f"127.0.0.1:{port}"], "blocked": [f"127.0.0.2:{port}"]}
    assert not (tmp_path / "stage" / ".egress.jsonl").exists()


def test_jsonl_round_trip_and_errors_name_file_and_line(tmp_path):
    path = tmp_path / "qa.jsonl"
    write_jsonl(path, [{"id": 1, "text": "Grüße"}, {"id": 2}])
    assert list(read_jsonl(path)) == [{"id": 1, "text": "Grüße"}, {"id": 2}]
    path.write_text('{"id": 1}\n{"id": 2\n{"id": 3}\n')
    with pytest.raises(InputError, match=r"qa.jsonl:2: not valid JSON"):
        list(read_jsonl(path))
    path.write_text('{"id": 1}\n[1, 2]\n')
    with pytest.raises(InputError, match=r"qa.jsonl:2: expected a JSON object"):
        list(read_jsonl(path))
    path.write_text('{"id": 1}\n{"id": 2, "te')  # a write cut off by kill -9
    assert list(read_jsonl(path, skip_partial_last_line=True)) == [{"id": 1}]
    with pytest.raises(InputError, match="file not found"):
        list(read_jsonl(tmp_path / "none.jsonl"))


def test_manifest_is_valid_json_on_disk(tmp_path):
    run_stage("demo", tmp_path, Counter())
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["stage"] == "demo" and data["key"]
