"""Start the embedded server: load the base model, start the engine, load start-up adapters, serve.

`/health` answers 503 until a warm-up generation has run on the base model and on every start-up
adapter. With `port=0` the operating system picks a free port; `ready_file` then receives
`{"host", "port", "pid", "model"}` as JSON once the server is healthy, which is how sovllm's own
stages and tests find a server they started.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from sovllm.artifacts import write_atomic

log = logging.getLogger("sovllm.serve")


def parse_adapter_specs(specs: list[str]) -> list[tuple[str, str]]:
    """`name=path` pairs from repeated --adapter options."""
    from sovllm.errors import ConfigError

    pairs = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter {spec!r}: expected NAME=PATH, e.g. --adapter hr=out/train/adapter")
        pairs.append((name.strip(), path.strip()))
    return pairs


def build(model: str, *, served_name: str | None = None, adapters: list[tuple[str, str]] = (),
          adapter_roots: list[Path] = (), max_lora_rank: int = 64, max_num_seqs: int = 16,
          max_model_len: int = 2048, on_start=None):
    """The app and its service, with the engine started and start-up adapters loaded."""
    from sovllm.models import registry
    from sovllm.models.tokenizer import load_tokenizer
    from sovllm.serve.engine import Engine
    from sovllm.serve.protocol import APIError
    from sovllm.serve.routes import create_app
    from sovllm.serve.service import Service
    from sovllm.errors import AdapterError

    info = registry.prepare(model)
    tokenizer = load_tokenizer(info.path)
    engine = Engine(info.path, tokenizer, max_num_seqs=max_num_seqs, max_model_len=max_model_len)
    engine.start()
    name = served_name or (info.name if info.kind == "bundled" else Path(info.path).name)
    service = Service(engine, tokenizer, served_name=name, base_path=str(info.path), base_id=info.base_id,
                      adapter_roots=list(adapter_roots) or [Path.cwd()], max_lora_rank=max_lora_rank)
    for adapter_name, path in adapters:
        try:
            service.load_adapter_now(adapter_name, path, from_api=False)
        except APIError as exc:
            engine.shutdown()
            raise AdapterError(f"--adapter {adapter_name}={path}: {exc.message}") from None
    return create_app(service, on_start), service


def serve(model: str, *, host: str = "127.0.0.1", port: int = 8000, ready_file: str | None = None,
          log_level: str = "info", **kwargs) -> None:
    """Run the server until interrupted (blocking)."""
    import uvicorn

    started = time.perf_counter()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        from sovllm.errors import BackendError

        raise BackendError(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                           hint="choose another --port, or --port 0 for any free one") from None
    bound_port = sock.getsockname()[1]

    async def warm(service) -> None:  # runs in uvicorn's loop once the socket accepts connections
        await service.warm_up()
        elapsed = time.perf_counter() - started
        print(f"sovllm serve: {service.served_name} ready on http://{host}:{bound_port}/v1 "
              f"({len(service.adapters)} adapters, {elapsed:.1f} s)", flush=True)
        if ready_file:
            write_atomic(ready_file, json.dumps({"host": host, "port": bound_port, "pid": os.getpid(),
                                                 "model": service.served_name}))

    app, service = build(model, on_start=warm, **kwargs)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    finally:
        service.engine.shutdown()

