"""`sovllm synth` as a real process: killed with SIGKILL and resumed; refused egress."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from sovllm.artifacts import read_jsonl
from sovllm.project import init_project
from tests.synth.conftest import CHUNKS, chunk_for, good_free


def make_project(tmp_path, base_url, concurrency=1):
    root = init_project(tmp_path / "p").parent
    config = root / "sovllm.yaml"
    text = config.read_text().replace("base_url: null", f"base_url: {base_url}").replace("model: null", "model: fake")
    config.write_text(text.replace("concurrency: 32", f"concurrency: {concurrency}", 1))
    (root / "out" / "ingest").mkdir(parents=True)
    (root / "out" / "ingest" / "chunks.jsonl").write_text("".join(json.dumps(c) + "\n" for c in CHUNKS))
    return root


def synth(root, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "sovllm", "synth", str(root)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.mark.integration  # a real `sovllm synth` process against a slowed endpoint, killed and rerun
def test_kill_9_then_resume_loses_and_duplicates_nothing(fake, tmp_path):
    endpoint = fake(good_free, delay=0.5)
    root = make_project(tmp_path, endpoint.base_url)
    cache = root / "out" / "synth" / "cache.jsonl"
    proc = synth(root)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if cache.exists() and cache.read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {r["chunk_id"] for r in read_jsonl(cache, skip_partial_last_line=True)}
    assert 2 <= len(done_before) < len(CHUNKS)
    requests_before = len(endpoint.requests)

    endpoint.delay = 0.0
    proc = synth(root)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    pairs = list(read_jsonl(root / "out" / "synth" / "qa.jsonl"))
    assert len(pairs) == len({p["id"] for p in pairs})
    assert len([p for p in pairs if p["generator"]["method"] == "model"]) == len(CHUNKS) * 3
    assert {p["chunk_id"] for p in pairs} == {c["id"] for c in CHUNKS}
    later = [chunk_for(body)["id"] for body in endpoint.requests[requests_before:]]
    assert not set(later) & done_before  # finished chunks were not asked for again
    manifest = json.loads((root / "out" / "synth" / "manifest.json").read_text())
    assert manifest["counts"]["reused"] == len(done_before)


def test_non_allow_listed_endpoint_fails_with_the_egress_error(tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.2", 0))
    listener.listen(4)
    listener.settimeout(0.3)
    port = listener.getsockname()[1]
    root = make_project(tmp_path, f"http://127.0.0.2:{port}/v1")
    proc = synth(root)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    assert "egress blocked" in err and "127.0.0.2" in err and "egress.allow" in err
    assert "Connection refused" not in err
    with pytest.raises(TimeoutError):
        listener.accept()  # nothing ever connected
    listener.close()
    manifest = json.loads((root / "out" / "synth" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "127.0.0.2" in json.dumps(manifest["endpoints"]["blocked"])
