"""Run a rendered Argo WorkflowTemplate's DAG on this machine, the way Argo's executor would run it
in pods: each task's container command as a subprocess, in dependency order, in a fresh folder
standing in for the container's filesystem, with its input artifacts fetched from a real
S3-compatible server (raw artifacts written out, `{{workflow.parameters.*}}` substituted, optional
ones skipped when absent) and its output artifacts uploaded there as .tgz archives (Argo's default:
the folder under its own name). A failed step is retried as its retryStrategy allows.

What it does not do: schedule pods, pull the image (the `sovllm` command is this checkout's), apply
resources, node selectors or network policies. It proves the rendered commands, parameters and
artifact paths and keys.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

_PARAM = re.compile(r"\{\{workflow\.parameters\.([A-Za-z0-9_-]+)\}\}")


@dataclass
class StepRun:
    name: str
    argv: list[str]
    returncode: int
    attempts: int
    fetched: list[str] = field(default_factory=list)
    skipped_optional: list[str] = field(default_factory=list)
    uploaded: list[str] = field(default_factory=list)
    output: str = ""  # stdout and stderr


class LocalArgo:
    """`s3` is a boto3 client for the rendered endpoint; `secrets` stands in for the Kubernetes
    Secrets the artifacts name ({secret: {key: value}}); `sovllm` is the command the image runs."""

    def __init__(self, template: dict, *, s3, secrets: dict, workdir: Path, sovllm: str, env: dict | None = None):
        self.template, self.s3, self.secrets, self.workdir = template, s3, secrets, workdir
        self.sovllm, self.env = sovllm, env

    def parameters(self, overrides: dict | None = None) -> dict:
        params = {p["name"]: p.get("value", "") for p in self.template["spec"]["arguments"]["parameters"]}
        return {**params, **(overrides or {})}

    def order(self) -> list[dict]:
        spec = self.template["spec"]
        templates = {t["name"]: t for t in spec["templates"]}
        tasks = templates[spec["entrypoint"]]["dag"]["tasks"]
        done, ordered = set(), []
        while len(ordered) < len(tasks):
            ready = [t for t in tasks if t["name"] not in done
                     and all(d in done for d in re.findall(r"[A-Za-z0-9-]+", t.get("depends", "")))]
            assert ready, f"DAG has unresolvable dependencies: {[t['name'] for t in tasks if t['name'] not in done]}"
            for task in ready:
                done.add(task["name"])
                ordered.append(task)
        return ordered

    def run(self, overrides: dict | None = None) -> list[StepRun]:
        params = self.parameters(overrides)
        templates = {t["name"]: t for t in self.template["spec"]["templates"]}
        runs = []
        for task in self.order():
            step = self.step(task["name"], templates[task["template"]], params)
            runs.append(step)
            if step.returncode != 0:
                raise AssertionError(f"step {step.name} failed ({step.returncode}): {' '.join(step.argv)}\n"
                                     f"{step.output[-4000:]}")
        return runs

    def _local(self, pod: Path, path: str) -> Path:
        assert path.startswith("/"), path
        return pod / path.lstrip("/")

    def _check_credentials(self, s3spec: dict) -> None:
        for field_name in ("accessKeySecret", "secretKeySecret"):
            ref = s3spec[field_name]
            assert ref["key"] in self.secrets.get(ref["name"], {}), f"the pod cannot read secret {ref}"

    def step(self, name: str, template: dict, params: dict) -> StepRun:
        container = template["container"]
        limit = int((template.get("retryStrategy") or {}).get("limit", 0))
        attempt = 0
        while True:
            attempt += 1
            pod = self.workdir / f"{name}-{attempt}"
            shutil.rmtree(pod, ignore_errors=True)
            pod.mkdir(parents=True)
            run = StepRun(name, [], -1, attempt)
            for art in (template.get("inputs") or {}).get("artifacts", []):
                target = self._local(pod, art["path"])
                if "raw" in art:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text(_PARAM.sub(lambda m: params[m.group(1)], art["raw"]["data"]), encoding="utf-8")
                    continue
                spec = art["s3"]
                self._check_credentials(spec)
                key = _PARAM.sub(lambda m: params[m.group(1)], spec["key"])
                try:
                    blob = self.s3.get_object(Bucket=spec["bucket"], Key=key)["Body"].read()
                except self.s3.exceptions.NoSuchKey:
                    assert art.get("optional"), f"step {name}: required input artifact {art['name']} ({key}) missing"
                    run.skipped_optional.append(art["name"])
                    continue
                _untar(blob, target)
                run.fetched.append(art["name"])
            mapping = {"/work": str(pod / "work")}
            argv = [self.sovllm if a == "sovllm" else _remap(a, mapping) for a in container["command"]]
            argv += [_remap(a, mapping) for a in container.get("args", [])]
            run.argv = argv
            done = subprocess.run(argv, cwd=_remap(container.get("workingDir", "/work"), mapping), capture_output=True,
                                  text=True, env=self.env, timeout=1800, check=False)
            run.returncode, run.output = done.returncode, done.stdout + done.stderr
            if done.returncode == 0:
                for art in (template.get("outputs") or {}).get("artifacts", []):
                    spec = art["s3"]
                    self._check_credentials(spec)
                    key = _PARAM.sub(lambda m: params[m.group(1)], spec["key"])
                    source = self._local(pod, art["path"])
                    assert source.exists(), f"step {name}: output {art['name']} not written at {art['path']}"
                    self.s3.put_object(Bucket=spec["bucket"], Key=key, Body=_tar(source))
                    run.uploaded.append(art["name"])
                return run
            if attempt > limit:
                return run


def _remap(arg: str, mapping: dict) -> str:
    """A container path (or the path in a `key=/path` option value) as its folder on this machine."""
    if "=" in arg and not arg.startswith("/"):
        key, value = arg.split("=", 1)
        return f"{key}={_remap(value, mapping)}"
    for prefix, local in mapping.items():
        if arg == prefix or arg.startswith(prefix + "/"):
            return local + arg[len(prefix):]
    return arg


def _tar(path: Path) -> bytes:
    """Argo's packing: a .tgz holding the folder under its own name."""
    from sovllm.objectstore import pack

    return pack(path)


def _untar(blob: bytes, target: Path) -> None:
    """Argo's unpacking: the archive holds one top-level entry, which becomes `target`."""
    staging = target.parent / f".{target.name}.unpack"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        tar.extractall(staging, filter="data")
    entries = list(staging.iterdir())
    assert len(entries) == 1, f"an artifact archive must hold one top-level entry, found {[e.name for e in entries]}"
    if target.exists():
        shutil.rmtree(target)
    os.replace(entries[0], target)
    staging.rmdir()


def tar_folder(path: Path) -> bytes:
    """How a user uploads the documents folder: `tar czf documents.tgz documents`."""
    return _tar(path)
