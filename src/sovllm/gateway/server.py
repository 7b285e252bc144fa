"""Start the gateway: open the usage store, build the app, serve with uvicorn until interrupted.

The gateway refuses to start without tenants, and checks before listening that every alias route
and tenant model is a name it can route (an alias, an adapter under `gateway.adapters`, or a name
the upstreams list in `/v1/models` when one is reachable).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from sovllm.artifacts import write_atomic
from sovllm.config import Config
from sovllm.errors import ConfigError
from sovllm.gateway.usage import database_url, open_engine
from sovllm.procs import listening_socket


def check(cfg: Config) -> None:
    """Refuse a gateway config that cannot work, naming the key and the fix."""
    gw = cfg.gateway
    if not gw.tenants:
        raise ConfigError("gateway.tenants is empty: nobody could call the gateway",
                          hint="add a tenant with keys and models (docs/gateway.md)")
    outside = {key: url for key, url in cfg.endpoints_outside_allow_list().items() if key.startswith("gateway.")}
    if outside:
        raise ConfigError("the gateway would send requests off this machine",
                          problems=[f"{key}: {url} is outside the egress allow-list; add its host to egress.allow "
                                    "if you run it yourself" for key, url in outside.items()])
    for alias, spec in gw.aliases.items():
        for target in spec.routes:
            if target in gw.aliases:
                raise ConfigError(f"gateway.aliases.{alias}.routes: '{target}' is an alias; route to adapters "
                                  "or the base model")


def build(root: Path, cfg: Config):
    """The app and its Gateway (not started: the app's lifespan starts it)."""
    from sovllm.gateway.routes import create_app
    from sovllm.gateway.service import Gateway

    check(cfg)
    engine = open_engine(database_url(cfg.gateway.usage_database, Path(root) / cfg.project.output_dir,
                                   cfg.gateway.usage_database_env))
    gateway = Gateway(cfg.gateway, root, engine)
    return create_app(gateway), gateway


def serve(root: Path, cfg: Config, *, host: str = "127.0.0.1", port: int = 8080, ready_file: str | None = None,
          log_level: str = "info", grace_period: float = 30.0) -> None:
    """Run until SIGTERM or Ctrl-C; running streams get `grace_period` seconds to finish."""
    import uvicorn

    sock = listening_socket(host, port)
    bound = sock.getsockname()[1]
    app, gateway = build(root, cfg)

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            print(f"sovllm gateway: {len(cfg.gateway.tenants)} tenants, {len(gateway.pool.upstreams)} upstreams, "
                  f"listening on http://{host}:{bound}/v1", flush=True)
            if ready_file:
                write_atomic(ready_file, json.dumps({"host": host, "port": bound, "pid": os.getpid()}))

    # loop="asyncio": uvloop opens sockets outside Python, where the egress guard cannot see them
    server = Server(uvicorn.Config(app, loop="asyncio", log_level=log_level, access_log=False,
                                   timeout_graceful_shutdown=grace_period))
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    server.run(sockets=[sock])
