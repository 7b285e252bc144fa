"""Start the scripted upstream and the gateway as real processes on free loopback ports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from sovllm.gateway.keys import digest
from sovllm.procs import dies_with_parent

REPO = Path(__file__).resolve().parents[2]


def _wait_ready(proc: subprocess.Popen, ready: Path, what: str, timeout: float = 60.0,
                host: str = "127.0.0.1") -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {proc.stdout.read() if proc.stdout else ''}")
        if ready.is_file():
            info = json.loads(ready.read_text())
            try:
                if httpx.get(f"http://{host}:{info['port']}/health", timeout=2).status_code in (200, 503):
                    return info
            except httpx.HTTPError:
                pass
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{what} did not become ready in {timeout:.0f} s")


class Proc:
    def __init__(self, args: list[str], ready: Path, what: str, env: dict | None = None,
                 check_host: str = "127.0.0.1"):
        ready.unlink(missing_ok=True)
        self.args, self.ready, self.what = args, ready, what
        self.log = ready.with_suffix(".log")
        self.proc = subprocess.Popen(args, cwd=REPO, stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, preexec_fn=dies_with_parent())
        try:
            info = _wait_ready(self.proc, ready, what, host=check_host)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{self.log.read_text()[-3000:]}") from None
        self.port = info["port"]
        self.url = f"http://{check_host}:{self.port}"

    def stop(self, kill: bool = False) -> None:
        if self.proc.poll() is None:
            (self.proc.kill if kill else self.proc.terminate)()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def upstream(tmp: Path, *, port: int = 0, adapters=(), loadable=(), tokens: int = 8, interval: float = 0.001,
             base: str = "base-model", name: str = "upstream") -> Proc:
    args = [sys.executable, "-m", "benchmarks.scripted_upstream", "--port", str(port), "--base", base,
            "--adapters", ",".join(adapters), "--loadable", ",".join(loadable), "--tokens", str(tokens),
            "--interval", str(interval), "--ready-file", str(tmp / f"{name}.ready")]
    return Proc(args, tmp / f"{name}.ready", name)


def project(tmp: Path, gateway: dict, name: str = "gw-project") -> Path:
    """A project folder whose sovllm.yaml holds `gateway`; `keys` files are written as given."""
    root = tmp / name
    root.mkdir(parents=True, exist_ok=True)
    (root / "sovllm.yaml").write_text(yaml.safe_dump({"project": {"name": name}, "gateway": gateway}))
    return root


def key_file(root: Path, name: str, *keys: str) -> dict:
    path = root / "keys" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(k + "\n" for k in keys))
    return {"file": f"keys/{name}"}


def hashed(key: str) -> dict:
    return {"sha256": digest(key)}


def gateway(root: Path, name: str = "gateway", env: dict | None = None, overrides: list[str] = ()) -> Proc:
    args = [sys.executable, "-m", "sovllm", "gateway", "serve", str(root), "--port", "0", "--ready-file",
            str(root / f"{name}.ready"), "--log-level", "warning"]
    for override in overrides:
        args += ["--set", override]
    return Proc(args, root / f"{name}.ready", name, env=env)
