"""A new user's path with the real bundled model, as CI runs it: init, run --quick, doctor."""

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
    exe = shutil.which("sovllm", path=str(Path(sys.executable).parent)) or "sovllm"
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=600, env=env)


def test_init_then_quick_run_with_the_bundled_model(tmp_path, bundled_model):
    env = {**os.environ, "COLUMNS": "200"}
    assert sovllm("init", tmp_path / "acme", env=env).returncode == 0
    proc = sovllm("run", tmp_path / "acme", "--quick", env=env)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "acme" / "out" / "manifest.json").read_text())
    assert manifest["model"]["base_id"] == bundled_model.base_id
    assert manifest["endpoints"]["blocked"] == []
    doctor = sovllm("doctor", tmp_path / "acme", env=env)
    assert doctor.returncode == 0 and "prepared at" in doctor.stdout
