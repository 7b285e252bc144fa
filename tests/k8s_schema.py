"""Validate Kubernetes and Argo objects against schemas published independently of hera: the npm
packages in tools/k8s-validate (installed by `make schemas`), run with the machine's node."""

from __future__ import annotations

import json
import os
import re
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


# The custom resources' published types (the same npm packages' TypeScript declarations): TypeScript's
# excess-property check rejects an unknown field at any depth of an object literal, which the
# packages' JSON-schema validators above let through.
TYPES = {
    **{("argoproj.io/v1alpha1", kind): f"@kubernetes-models/argo-workflows/argoproj.io/v1alpha1/{kind}"
       for kind in ("WorkflowTemplate", "Workflow", "CronWorkflow")},
    ("keda.sh/v1alpha1", "ScaledObject"): "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject",
    ("monitoring.coreos.com/v1", "ServiceMonitor"):
        "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor",
    ("monitoring.coreos.com/v1", "PrometheusRule"):
        "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule",
}


def unknown_fields(objects: list[dict]) -> list[str]:
    """TypeScript's errors for the custom resources among `objects` ([] when every field is known).
    Each error names the object's index in `objects`. Other kinds are ignored (kubernetes-validate
    checks the core kinds strictly)."""
    require(shutil.which("node") is not None and (TOOL / "node_modules" / "typescript").is_dir(),
            "node with tools/k8s-validate's schemas and typescript (make schemas)")
    lines, index = [], {}
    for i, obj in enumerate(objects):
        module = TYPES.get((obj.get("apiVersion"), obj.get("kind")))
        if module is None:
            continue
        alias = f"T{i}"
        lines.insert(0, f'import type {{ I{obj["kind"]} as {alias} }} from "{module}";')
        index[len(lines)] = i
        lines.append(f"export const o{i}: {alias} = {json.dumps(obj)};")
    if not index:
        return []
    source = TOOL / f".check-{os.getpid()}.ts"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    try:
        done = subprocess.run(["node", str(TOOL / "node_modules" / "typescript" / "bin" / "tsc"), "--noEmit", "--strict",
                               "--module", "nodenext", "--moduleResolution", "nodenext", "--skipLibCheck", source.name],
                              cwd=TOOL, capture_output=True, text=True, timeout=300, check=False)
    finally:
        source.unlink(missing_ok=True)
    errors = []
    for line in done.stdout.splitlines():
        found = re.match(r".*\.ts\((\d+),\d+\): error (TS\d+: .*)", line)
        if found:
            row = lines[int(found.group(1)) - 1]
            which = re.match(r"export const o(\d+):", row)
            errors.append(f"object {which.group(1) if which else '?'}: {found.group(2)}")
    assert done.returncode == 0 or errors, done.stdout + done.stderr
    return errors


KUBERNETES = "1.33"  # the Kubernetes version core kinds are validated for


def strict_core(obj: dict, version: str = KUBERNETES) -> str | None:
    """A core kind with kubernetes-validate in strict mode (an unknown kind or field fails): None when
    valid, else the error."""
    try:
        import kubernetes_validate
    except ImportError:
        require(False, "kubernetes-validate (pip install -e '.[dev]')")
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except Exception as exc:  # noqa: BLE001 - its ValidationError and SchemaNotFoundError
        return f"{type(exc).__name__}: {str(exc)[:300]}"
    return None
