"""The record of egress attempts: what each process contacted or was refused, for the manifests.

Every attempt the guard judges is recorded once per recording window (`mark()`, e.g. one per
stage) in this process, and, with `SOVLLM_EGRESS_LOG` set, appended to that file as one JSON line,
so a stage can list the endpoints its child processes contacted too.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time

ENV_LOG = "SOVLLM_EGRESS_LOG"
log = logging.getLogger("sovllm.egress")

_lock = threading.Lock()
_events: list[dict] = []
_seen: set[tuple] = set()


def record(kind: str, host: str, port, allowed: bool, via: str | None = None) -> None:
    """Record one attempt (`via`: the proxy that carried it), once per window."""
    key = (kind, host, port, allowed, via)
    if key in _seen:
        return
    _seen.add(key)
    event = {"time": time.time(), "pid": os.getpid(), "kind": kind, "host": host, "port": port, "allowed": allowed}
    if via:
        event["via"] = via
    _events.append(event)
    path = os.environ.get(ENV_LOG)
    if path:
        try:
            with open(path, "a", encoding="utf-8") as fh:
                # a line of its own even after a fragment that a process stopped mid-write left behind
                fh.write("\n" + json.dumps(event) + "\n")
        except OSError:
            pass  # recording must never break the connection it records


def mark() -> int:
    """Start a new recording window (e.g. a stage) and return its start index into `events()`.

    Repeated attempts are recorded once per window, so each stage lists every endpoint it used.
    """
    with _lock:
        _seen.clear()
        return len(_events)


def events() -> list[dict]:
    """All distinct egress attempts recorded in this process, in order."""
    return list(_events)


def read_log(path) -> list[dict]:
    """Events that processes wrote to a `SOVLLM_EGRESS_LOG` file (missing file: none).

    A process stopped in the middle of a write leaves part of one record. Every record starts a line
    of its own (`record`), so such a fragment never holds a complete record: it is skipped, with a
    warning, instead of failing the stage before it writes its manifest.
    """
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            lines = fh.readlines()
    except FileNotFoundError:
        return []
    found, torn = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if isinstance(event, dict):
            found.append(event)
        else:
            torn.append(number)
    if torn:
        log.warning("%s: skipped %d incomplete egress record(s) (line %s), left by a process stopped while "
                    "writing; the manifest may miss that attempt", path, len(torn), ", ".join(map(str, torn)))
    return found


def summarise(evts: list[dict]) -> dict:
    """Manifest form: distinct endpoints contacted and attempts blocked, as `host:port` strings."""
    def fmt(e):
        host = f"[{e['host']}]" if ":" in str(e["host"]) and not str(e["host"]).startswith("[") else e["host"]
        return host if e.get("port") is None else f"{host}:{e['port']}"

    contacted = sorted({fmt(e) for e in evts if e["allowed"]})
    blocked = sorted({fmt(e) for e in evts if not e["allowed"]})
    return {"contacted": contacted, "blocked": blocked}
