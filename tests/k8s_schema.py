"""Validate Kubernetes and Argo objects against schemas published independently of hera: the npm
packages in tools/k8s-validate (installed by `make schemas`), run with the machine's node."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from tests.conftest import require

TOOL = Path(__file__).resolve().parents[1] / "tools" / "k8s-validate"


def validate(objects: list[dict]) -> list[dict]:
    """One result per object: {kind, name, valid, error}."""
    require(shutil.which("node") is not None and (TOOL / "node_modules" / ".installed").is_file(),
            "node with tools/k8s-validate's schemas (make schemas)")
    done = subprocess.run(["node", str(TOOL / "validate.mjs")], input=json.dumps(objects), capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]
