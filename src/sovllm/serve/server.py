"""Start the embedded server: load the base model, start the engine, load start-up adapters, serve.

`/health` answers 503 until a warm-up generation has run on the base model and on every start-up
adapter. With `port=0` the operating system picks a free port; `ready_file` then receives
`{"host", "port", "pid", "model"}` as JSON once the server is healthy, which is how sovllm's own
stages and tests find a server they started.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

from sovllm.artifacts import write_atomic
from sovllm.errors import AdapterError, ConfigError
from sovllm.models.tokenizer import load_tokenizer
from sovllm.serve.engine import Engine
from sovllm.serve.protocol import APIError
from sovllm.procs import listening_socket
from sovllm.serve.service import Service

log = logging.getLogger("sovllm.serve")


def parse_adapter_specs(specs: list[str]) -> list[tuple[str, str]]:
    """`name=path` pairs from repeated --adapter options."""
    pairs = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter {spec!r}: expected NAME=PATH, e.g. --adapter hr=out/train/adapter")
        pairs.append((name.strip(), path.strip()))
    return pairs


def read_api_keys(path: Path | None, literal: str | None, env: str | None, warn=print) -> list[str]:
    """API keys from --api-key-file (one per line), --api-key (warns) and SOVLLM_API_KEY; [] = no auth."""
    keys = []
    if path is not None:
        try:
            keys += [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
        except OSError as exc:
            raise ConfigError(f"--api-key-file {path}: cannot read it ({exc.strerror or exc})") from None
        if not keys:
            raise ConfigError(f"--api-key-file {path}: the file holds no key", hint="write one key per line")
    if literal:
        warn("--api-key puts the key into the process list and shell history; use --api-key-file or SOVLLM_API_KEY")
        keys.append(literal.strip())
    if env and env.strip():
        keys.append(env.strip())
    return keys


def build(model: str, *, served_name: str | None = None, adapters: list[tuple[str, str]] = (),
          adapter_roots: list[Path] = (), max_lora_rank: int = 64, max_num_seqs: int = 16,
          max_model_len: int = 2048, threads: int | None = None, max_queue: int = 0, api_keys: list[str] = (),
          max_body_bytes: int = 4 * 2**20, on_start=None, prefix_caching: bool = True,
          refusal_calibration: bool = True):
    """The app and its service, with the engine started and start-up adapters loaded."""
    from sovllm.models import registry
    from sovllm.serve.metrics import Metrics
    from sovllm.serve.routes import create_app

    info = registry.prepare(model)
    tokenizer = load_tokenizer(info.path)
    name = served_name or (info.name if info.kind == "bundled" else Path(info.path).name)
    metrics = Metrics(name)
    engine = Engine(info.path, tokenizer, max_num_seqs=max_num_seqs, max_model_len=max_model_len, threads=threads,
                    metrics=metrics, prefix_caching=prefix_caching)
    engine.start()
    service = Service(engine, tokenizer, served_name=name, base_path=str(info.path), base_id=info.base_id,
                      adapter_roots=list(adapter_roots) or [Path.cwd()], max_lora_rank=max_lora_rank,
                      max_queue=max_queue, metrics=metrics, refusal_calibration=refusal_calibration)
    for adapter_name, path in adapters:
        try:
            service.load_adapter_now(adapter_name, path, from_api=False)
        except APIError as exc:
            engine.shutdown()
            raise AdapterError(f"--adapter {adapter_name}={path}: {exc.message}") from None
    return create_app(service, on_start, api_keys=list(api_keys), max_body_bytes=max_body_bytes), service


PARENT_ENV = "SOVLLM_PARENT_PID"


def _exit_with_parent(server, interval: float = 1.0) -> None:
    """An embedded server (started by a stage, `SOVLLM_PARENT_PID` set) shuts down gracefully when the
    process that started it is gone — killed with SIGKILL, say — instead of holding its memory and port."""
    parent = os.environ.get(PARENT_ENV)
    if not (parent and parent.isdigit()):
        return

    def watch() -> None:
        while not server.should_exit:
            if os.getppid() != int(parent):
                print(f"sovllm serve: parent process {parent} is gone; shutting down", flush=True)
                server.should_exit = True
                return
            time.sleep(interval)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def serve(model: str, *, host: str = "127.0.0.1", port: int = 8000, ready_file: str | None = None,
          log_level: str = "info", grace_period: float = 30.0, adapters_dir: Path | None = None,
          limit_concurrency: int | None = 512, **kwargs) -> None:
    """Run the server until interrupted (blocking).

    On SIGTERM or Ctrl-C the server stops accepting connections, lets running requests finish for
    up to `grace_period` seconds, aborts the rest and returns (exit code 0).
    """
    import uvicorn

    started = time.perf_counter()
    sock = listening_socket(host, port)
    bound_port = sock.getsockname()[1]

    async def warm(service) -> None:  # runs in uvicorn's loop once the socket accepts connections
        await service.warm_up()
        if adapters_dir is not None:
            service.watch_task = asyncio.create_task(service.watch(Path(adapters_dir)))
        elapsed = time.perf_counter() - started
        print(f"sovllm serve: {service.served_name} ready on http://{host}:{bound_port}/v1 "
              f"({len(service.adapters)} adapters, {elapsed:.1f} s)", flush=True)
        if ready_file:
            write_atomic(ready_file, json.dumps({"host": host, "port": bound_port, "pid": os.getpid(),
                                                 "model": service.served_name}))

    if adapters_dir is not None:
        kwargs["adapter_roots"] = [*(kwargs.get("adapter_roots") or [Path.cwd()]), Path(adapters_dir)]
    app, service = build(model, on_start=warm, **kwargs)
    # limit_concurrency: connections beyond it get uvicorn's 503 before any work is done for them
    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            # shortly before uvicorn's grace period ends (it would cancel the handlers mid-flight), answer
            # what is still queued or running with 503, so every client gets a response and the log stays clean
            margin = min(1.0, grace_period / 2)
            handle = asyncio.get_running_loop().call_later(
                max(grace_period - margin, 0), service.engine.abort_all,
                f"the server is shutting down (the {grace_period:g} s grace period ended); retry on another replica")
            try:
                await super().shutdown(sockets)
            finally:
                handle.cancel()

    # loop="asyncio": uvloop would open sockets outside Python, where the egress guard cannot see them
    server = Server(uvicorn.Config(app, loop="asyncio", log_level=log_level, access_log=False,
                                           timeout_graceful_shutdown=grace_period,
                                           limit_concurrency=limit_concurrency or None))
    # uvicorn re-raises the signal it stopped on once it is done; a no-op handler makes that a clean exit 0
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    _exit_with_parent(server)
    try:
        server.run(sockets=[sock])
    finally:
        service.engine.shutdown()

