"""`sovllm egress check`: would sovllm be allowed to contact this endpoint?"""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlsplit

import typer

from sovllm import egress
from sovllm.errors import InputError
from sovllm.progress import make_console

app = typer.Typer(help="The sovereignty guard: which hosts sovllm may contact.", no_args_is_help=True)
console = make_console()


def _split_target(target: str) -> tuple[str, int | None]:
    parts = urlsplit(target if "://" in target else f"tcp://{target}")
    try:
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        raise InputError(f"'{target}': invalid port") from None
    if not parts.hostname:
        raise InputError(f"'{target}': expected a URL or HOST[:PORT]")
    return parts.hostname, port


@app.command()
def check(
    target: str = typer.Argument(..., help="URL or HOST[:PORT], e.g. http://vllm.internal:8000/v1"),
    project: Path = typer.Option(Path("."), "--project", "-p", help="Project whose egress.allow applies."),
    connect: bool = typer.Option(False, "--connect", help="Also open a TCP connection (through the guard)."),
) -> None:
    """Say whether TARGET is allowed; with --connect, try to reach it. Exit 3 if blocked."""
    from sovllm.config import CONFIG_FILE, load_config

    allow = load_config(project).egress.allow if (project / CONFIG_FILE).is_file() else []
    policy = egress.install(allow)
    host, port = _split_target(target)
    if not connect:
        if not policy.allows(host):
            raise egress.EgressBlockedError(host, port)
        console.print(f"{host}: allowed")
        return
    if port is None:
        raise InputError(f"'{target}': --connect needs a port or an http(s) URL")
    with socket.create_connection((host, port), timeout=5):
        pass
    console.print(f"{host}:{port}: allowed and reachable")
