"""Start `sovllm serve` as a subprocess on a free loopback port, for stages and tests.

`EmbeddedServer` is a context manager: it starts the server, waits until it is healthy (its
ready file appears), exposes `base_url`, and stops it (SIGTERM, then SIGKILL) on exit. If the
server dies while starting, the error carries the end of its output. Should this process die
without stopping it (SIGKILL, OOM killer), the server notices within a second and shuts down.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sovllm.errors import BackendError
from sovllm.serve.server import PARENT_ENV


def file_tail(path: Path, lines: int) -> str:
    """The last `lines` lines of a server's log file ("" when it cannot be read)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class EmbeddedServer:
    def __init__(self, model: str, *, adapters: dict[str, str] | None = None, adapter_roots: list[str] = (),
                 extra_args: list[str] = (), startup_timeout: float = 180, host: str = "127.0.0.1"):
        self.model = model
        self.adapters = adapters or {}
        self.adapter_roots = list(adapter_roots)
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self.host = host
        self.process: subprocess.Popen | None = None
        self.port: int | None = None
        self.served_name: str | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="sovllm-serve-")
        self.log_path = Path(self._dir.name) / "server.log"

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> "EmbeddedServer":
        ready = Path(self._dir.name) / "ready.json"
        cmd = [sys.executable, "-m", "sovllm", "serve", "--model", self.model, "--host", self.host, "--port", "0",
               "--ready-file", str(ready), *self.extra_args]
        for name, path in self.adapters.items():
            cmd += ["--adapter", f"{name}={path}"]
        for root in self.adapter_roots:
            cmd += ["--adapter-root", str(root)]
        log = open(self.log_path, "w")
        # the server watches this pid and shuts down if this process dies without stopping it (SIGKILL)
        env = {**os.environ, PARENT_ENV: str(os.getpid())}
        self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.startup_timeout
        while not ready.exists():
            if self.process.poll() is not None:
                raise BackendError(f"sovllm serve exited with code {self.process.returncode} while starting:\n"
                                   + self.log_tail())
            if time.monotonic() > deadline:
                self.stop()
                raise BackendError(f"sovllm serve was not ready after {self.startup_timeout:.0f} s:\n" + self.log_tail())
            time.sleep(0.1)
        info = json.loads(ready.read_text())
        self.port, self.served_name = info["port"], info["model"]
        return self

    def log_tail(self, lines: int = 30) -> str:
        return file_tail(self.log_path, lines)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> "EmbeddedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        self._dir.cleanup()

