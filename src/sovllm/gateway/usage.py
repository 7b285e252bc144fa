"""The gateway's store: one row per proxied request, feedback on responses, and live alias splits.

SQLite by default (a file in the project's output folder), PostgreSQL (or any SQLAlchemy URL) for a
gateway with several replicas. Rows are written by one background thread in batches, never on the
request path: a request only appends to an in-memory queue. `close()` drains the queue.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from pathlib import Path

from sqlalchemy import (
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    func,
    insert,
    select,
)
from sqlalchemy.engine import make_url

from sovllm.errors import ConfigError

log = logging.getLogger("sovllm.gateway")

metadata = MetaData()

requests_table = Table(
    "gateway_requests", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("time", Float, nullable=False, index=True),
    Column("tenant", String(64), nullable=False, index=True),
    Column("model", String(256), nullable=False),        # the name the client asked for
    Column("adapter", String(256), nullable=False),      # the upstream model it went to
    Column("alias", String(256)),                       # set when `model` is an alias (an A/B variant)
    Column("user_hash", String(64)),
    Column("response_id", String(128), index=True),
    Column("upstream", String(512)),
    Column("status", Integer, nullable=False),
    Column("stream", Integer, nullable=False),
    Column("prompt_tokens", Integer, nullable=False, default=0),
    Column("completion_tokens", Integer, nullable=False, default=0),
    Column("latency_s", Float, nullable=False),
    Column("ttft_s", Float),
    Column("finish_reason", String(32)),
    Column("error", Text),
)

feedback_table = Table(
    "gateway_feedback", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("time", Float, nullable=False),
    Column("tenant", String(64), nullable=False, index=True),
    Column("response_id", String(128), nullable=False, index=True),
    Column("alias", String(256)),
    Column("adapter", String(256), nullable=False),
    Column("rating", Float, nullable=False),
    Column("comment", Text),
)

splits_table = Table(
    "gateway_splits", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("time", Float, nullable=False),
    Column("alias", String(256), nullable=False, index=True),
    Column("routes", Text, nullable=False),  # JSON {adapter: weight}
    Column("adapters", Text),  # JSON {adapter: path} for routes the gateway may have to load at run time
    Column("reason", Text),
)


def database_url(url: str | None, output_dir: Path, env: str | None = None) -> str:
    """The configured URL (or the one in environment variable `env`), else SQLite in <output>/gateway/usage.db."""
    if env:
        url = os.environ.get(env, "").strip()
        if not url:
            raise ConfigError(f"gateway.usage_database_env: environment variable {env} is empty or unset",
                              hint="set it to the database URL, e.g. from a Secret")
    if url:
        try:
            make_url(url)
        except Exception:  # noqa: BLE001 - SQLAlchemy's parse errors vary by version
            raise ConfigError(f"gateway.usage_database {url!r} is not a database URL",
                              hint="e.g. postgresql+psycopg://user@db.internal/sovllm or sqlite:///usage.db") from None
        return url
    path = Path(output_dir) / "gateway" / "usage.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def open_engine(url: str):
    """An engine with the tables created (idempotent)."""
    engine = create_engine(url, pool_pre_ping=True, future=True)
    if engine.dialect.name == "sqlite":
        from sqlalchemy import event

        @event.listens_for(engine, "connect")
        def _wal(conn, _):  # readers (sovllm usage) never block the writer
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA busy_timeout=5000")
    try:
        metadata.create_all(engine)
    except Exception as exc:  # noqa: BLE001 - driver errors differ; the message names the problem
        raise ConfigError(f"usage database {engine.url.render_as_string(hide_password=True)}: cannot open it "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    return engine


class UsageWriter:
    """Appends rows from the request path; a background thread inserts them in batches."""

    def __init__(self, engine, batch: int = 500, interval: float = 0.25):
        self.engine = engine
        self.batch, self.interval = batch, interval
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self.written = 0
        self.failures = 0
        self._thread = threading.Thread(target=self._run, name="usage-writer", daemon=True)
        self._thread.start()

    def request(self, **row) -> None:
        self._queue.put((requests_table, row))

    def feedback(self, **row) -> None:
        self._queue.put((feedback_table, row))

    def _drain(self) -> list:
        items = []
        try:
            while len(items) < self.batch:
                items.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        return items

    def _write(self, items: list) -> None:
        by_table: dict = {}
        for table, row in items:
            by_table.setdefault(table, []).append(row)
        for attempt in range(3):
            try:
                with self.engine.begin() as conn:
                    for table, rows in by_table.items():
                        conn.execute(insert(table), rows)
                self.written += len(items)
                return
            except Exception as exc:  # noqa: BLE001 - a database hiccup must not kill the writer
                log.warning("usage: writing %d rows failed (%s); attempt %d of 3", len(items), exc, attempt + 1)
                time.sleep(0.5 * (attempt + 1))
        self.failures += len(items)
        log.error("usage: %d rows lost after 3 attempts", len(items))

    def _run(self) -> None:
        while True:
            stopping = self._stop.wait(self.interval)
            while items := self._drain():
                self._write(items)
            if stopping:
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def latest_splits(engine, with_adapters: bool = False):
    """The newest split of every alias that has one ({alias: {adapter: weight}}); `with_adapters`: also
    the adapter paths those splits brought ({adapter: path})."""
    with engine.connect() as conn:
        newest = select(splits_table.c.alias, func.max(splits_table.c.id).label("id")).group_by(
            splits_table.c.alias).subquery()
        rows = conn.execute(select(splits_table.c.alias, splits_table.c.routes, splits_table.c.adapters)
                            .join(newest, splits_table.c.id == newest.c.id)).all()
    splits = {alias: json.loads(routes) for alias, routes, _ in rows}
    if not with_adapters:
        return splits
    paths: dict[str, str] = {}
    for _, _, adapters in rows:
        paths.update(json.loads(adapters or "{}"))
    return splits, paths


def set_split(engine, alias: str, routes: dict[str, float], reason: str, adapters: dict[str, str] | None = None):
    """Record a new split for `alias`; running gateways pick it up within a health interval. `adapters`
    names where a new route's adapter lies, for the runtime load."""
    with engine.begin() as conn:
        conn.execute(insert(splits_table), [{"time": time.time(), "alias": alias, "routes": json.dumps(routes),
                                             "adapters": json.dumps(adapters or {}), "reason": reason}])


def split_history(engine, alias: str) -> list[dict]:
    with engine.connect() as conn:
        rows = conn.execute(select(splits_table).where(splits_table.c.alias == alias)
                            .order_by(splits_table.c.id)).mappings().all()
    return [dict(r, routes=json.loads(r["routes"])) for r in rows]


def response_owner(engine, response_id: str) -> dict | None:
    """The request row of a response id (tenant, alias, adapter), or None."""
    with engine.connect() as conn:
        row = conn.execute(select(requests_table.c.tenant, requests_table.c.alias, requests_table.c.adapter)
                           .where(requests_table.c.response_id == response_id).limit(1)).mappings().first()
    return dict(row) if row else None
