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


def test_a_torn_manifest_makes_the_stage_run_again(tmp_path):
    work = Counter()
    run_stage("demo", tmp_path, work)
    text = (tmp_path / "manifest.json").read_text()
    (tmp_path / "manifest.json").write_text(text[: len(text) // 2])  # a write cut off by a crash
    assert load_manifest(tmp_path) is None
    assert not run_stage("demo", tmp_path, work).skipped and work.calls == 2
    assert load_manifest(tmp_path).status == "ok"


def test_write_atomic_syncs_the_file_before_the_rename_and_then_its_folder(tmp_path, monkeypatch):
    import os

    from sovllm.artifacts import write_atomic

    target = tmp_path / "stage" / "manifest.json"
    synced = []  # (inode, whether the target already was that inode when it was synced)
    real_fsync = os.fsync

    def spy(fd):
        inode = os.fstat(fd).st_ino
        synced.append((inode, target.exists() and target.stat().st_ino == inode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    write_atomic(target, '{"stage": "demo"}\n')
    file_inode, dir_inode = target.stat().st_ino, target.parent.stat().st_ino
    inodes = [inode for inode, _ in synced]
    assert (file_inode, False) in synced  # the data is on disk before the rename publishes it
    assert dir_inode in inodes and inodes.index(dir_inode) > inodes.index(file_inode)  # then the rename itself
    assert target.read_text() == '{"stage": "demo"}\n' and os.listdir(target.parent) == ["manifest.json"]


def test_a_torn_last_line_is_cut_off_before_the_next_append(tmp_path):
    from sovllm.artifacts import append_jsonl, truncate_partial_line

    path = tmp_path / "cache.jsonl"
    assert truncate_partial_line(path) == 0 and not path.exists()
    append_jsonl(path, [{"id": 1, "text": "Grüße"}, {"id": 2, "text": "Grüße"}])
    whole = path.read_bytes()
    assert truncate_partial_line(path) == 0 and path.read_bytes() == whole
    second = whole.index(b'{"id": 2')
    for cut in (whole.index(b"\xc3", second) + 1, second + 5):  # inside "ü" / inside the JSON
        path.write_bytes(whole[:cut])
        assert truncate_partial_line(path) == cut - second
        append_jsonl(path, [{"id": 3}])
        assert list(read_jsonl(path)) == [{"id": 1, "text": "Grüße"}, {"id": 3}]
    path.write_bytes(whole[:-1])  # only the newline is missing: the record is whole and kept
    assert truncate_partial_line(path) == 0
    assert path.read_bytes() == whole


def test_a_line_cut_inside_a_character_is_a_partial_line_or_a_clear_error(tmp_path):
    path = tmp_path / "qa.jsonl"
    record = '{"id": 2, "text": "Grüße"}'.encode()
    cut = record[: record.index(b"\xc3") + 1]
    path.write_bytes(b'{"id": 1}\n' + cut)
    assert list(read_jsonl(path, skip_partial_last_line=True)) == [{"id": 1}]
    path.write_bytes(b'{"id": 1}\n' + cut + b'{"id": 3}\n')  # torn in the middle: real corruption
    with pytest.raises(InputError, match=r"qa.jsonl:2: not valid UTF-8") as err:
        list(read_jsonl(path, skip_partial_last_line=True))
    assert "delete that line" in str(err.value)


def test_replace_dir_without_a_one_step_swap_puts_the_old_folder_back_after_a_crash(tmp_path, monkeypatch):
    import os

    from sovllm import artifacts

    monkeypatch.setattr(artifacts, "_exchange", lambda a, b: False)  # a filesystem without RENAME_EXCHANGE
    dst, src = tmp_path / "adapter", tmp_path / ".adapter.tmp"
    for folder, tag in ((dst, "old"), (src, "new")):
        folder.mkdir()
        (folder / "weights").write_text(tag)
    real_rename, calls = os.rename, []

    def crash_on_second_rename(a, b):
        calls.append((a, b))
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed between moving the old folder aside and the new one in
        real_rename(a, b)

    monkeypatch.setattr(os, "rename", crash_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        artifacts.replace_dir(src, dst)
    monkeypatch.setattr(os, "rename", real_rename)
    assert not dst.exists()
    artifacts.recover_dir(dst)  # what the next run does first
    assert (dst / "weights").read_text() == "old" and not (tmp_path / ".adapter.old").exists()
    artifacts.replace_dir(src, dst)
    assert (dst / "weights").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["adapter"]
