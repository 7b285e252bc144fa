"""`sovllm models fetch` (the serving init container) against a real S3-compatible server on loopback:
the base model and adapters are copied, verified by sha256, placed atomically, kept when present,
and refused when corrupt or trained on another base."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.argo_local import tar_folder


@pytest.fixture
def store(s3_server, tiny_model_dir, tmp_path):
    from sovllm.models.tiny import make_random_adapter

    port, client = s3_server
    client.create_bucket(Bucket="models")
    client.put_object(Bucket="models", Key="base/tiny.tgz", Body=tar_folder(Path(tiny_model_dir)))
    adapter = make_random_adapter(tiny_model_dir, tmp_path / "src" / "support", rank=4, seed=3)
    client.put_object(Bucket="models", Key="adapters/support.tgz", Body=tar_folder(adapter))
    # the train stage's output folder (what the Argo pipeline uploads): the adapter in adapter/
    train = tmp_path / "src" / "train"
    make_random_adapter(tiny_model_dir, train / "adapter", rank=4, seed=4)
    (train / "manifest.json").write_text('{"stage": "train"}')
    client.put_object(Bucket="models", Key="pipeline/adapter.tgz", Body=tar_folder(train))
    return port, client, adapter


def fetch(port: int, to: Path, *args: str) -> subprocess.CompletedProcess:
    exe = str(Path(sys.executable).with_name("sovllm"))
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "COLUMNS": "200"}
    return subprocess.run([exe, "models", "fetch", "--endpoint", f"http://127.0.0.1:{port}", "--bucket", "models",
                           "--base", "base/tiny.tgz", "--to", str(to), *args], capture_output=True, text=True,
                          env=env, timeout=300, check=False)


def test_fetch_places_verified_copies_and_keeps_them_on_a_restart(store, tmp_path, tiny_model_dir):
    from sovllm.models.adapter import verify_files
    from sovllm.models.registry import weights_sha256

    port, _, source = store
    to = tmp_path / "models"
    done = fetch(port, to, "--adapter", "support=adapters/support.tgz", "--adapter", "klinik=pipeline/adapter.tgz")
    assert done.returncode == 0, done.stderr[-2000:]
    assert weights_sha256(to / "base") == weights_sha256(tiny_model_dir)
    assert verify_files(to / "adapters" / "support") > 0 and verify_files(to / "adapters" / "klinik") > 0
    assert (to / "adapters" / "support" / "adapter_model.safetensors").read_bytes() == \
        (source / "adapter_model.safetensors").read_bytes()
    assert sorted(p.name for p in to.iterdir()) == ["adapters", "base"]  # no staging folders left
    again = fetch(port, to, "--adapter", "support=adapters/support.tgz", "--adapter", "klinik=pipeline/adapter.tgz")
    assert again.returncode == 0 and again.stdout.count("already present and verified") == 3, again.stdout


def test_a_corrupt_adapter_or_a_foreign_base_is_refused_and_nothing_is_placed(store, tmp_path, tiny_model_dir):
    from sovllm.models.tiny import build_tiny_model_dir, make_random_adapter

    port, client, source = store
    bad = tmp_path / "bad" / "support"
    make_random_adapter(tiny_model_dir, bad, rank=4, seed=3)
    with open(bad / "adapter_model.safetensors", "r+b") as f:  # one flipped byte after training
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 1]))
    client.put_object(Bucket="models", Key="adapters/bad.tgz", Body=tar_folder(bad))
    done = fetch(port, tmp_path / "m1", "--adapter", "support=adapters/bad.tgz")
    assert done.returncode != 0 and "adapter_model.safetensors: sha256" in done.stderr, done.stderr[-1500:]
    assert not (tmp_path / "m1" / "adapters" / "support").exists()

    other = build_tiny_model_dir(tmp_path / "other-base", seed=7)
    foreign = make_random_adapter(other, tmp_path / "foreign" / "x", rank=4, seed=1)
    client.put_object(Bucket="models", Key="adapters/foreign.tgz", Body=tar_folder(foreign))
    done = fetch(port, tmp_path / "m2", "--adapter", "support=adapters/support.tgz", "--adapter", "x=adapters/foreign.tgz")
    assert done.returncode != 0 and "different base models" in done.stderr, done.stderr[-1500:]

    done = fetch(port, tmp_path / "m3", "--adapter", "support=adapters/support.tgz", "--base-id", "0" * 64)
    assert done.returncode != 0 and "different base models" in done.stderr, done.stderr[-1500:]
    done = fetch(port, tmp_path / "m4", "--adapter", "support=adapters/missing.tgz")
    assert done.returncode != 0 and "adapters/missing.tgz" in done.stderr, done.stderr[-1500:]

    manifest = json.loads((source / "manifest.json").read_text())
    manifest.pop("files")
    (source / "manifest.json").write_text(json.dumps(manifest))
    client.put_object(Bucket="models", Key="adapters/old.tgz", Body=tar_folder(source))
    done = fetch(port, tmp_path / "m5", "--adapter", "support=adapters/old.tgz")
    assert done.returncode != 0 and "lists no file hashes" in done.stderr, done.stderr[-1500:]
