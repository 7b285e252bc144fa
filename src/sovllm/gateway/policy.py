"""Who may call what, where an alias routes, and the per-tenant limits.

A tenant calls the names in its `models` list: aliases, adapter names or the base model's name. A
name it may not call answers exactly like a name that does not exist (404), so a tenant learns
nothing about other tenants' adapters. An alias picks one of its routes by weight; the pick is a
hash of (alias, end user), so one user stays on one variant while the weights stay the same.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from collections import deque
from dataclasses import dataclass, field

from sovllm.config import GatewaySection, TenantLimits

ADMIN = "__admin__"  # the owner of admin keys; never a tenant name (tenant names cannot start with '_')


@dataclass(frozen=True)
class Route:
    """Where one request goes: the name the client used, the upstream model it becomes, the variant."""

    requested: str
    target: str
    alias: str | None = None


def bucket(alias: str, user: str) -> float:
    """A stable number in [0, 1) for (alias, user)."""
    h = hashlib.sha256(f"{alias}\x00{user}".encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def pick(routes: dict[str, float], point: float) -> str:
    """The route whose share of the total weight covers `point` (routes in the order given)."""
    total = sum(routes.values())
    edge = 0.0
    for name, weight in routes.items():
        edge += weight / total
        if point < edge and weight > 0:
            return name
    return next(name for name, weight in reversed(routes.items()) if weight > 0)


class Policy:
    """Resolves a tenant's requested model name to a route; `splits` overrides alias weights live."""

    def __init__(self, cfg: GatewaySection):
        self.cfg = cfg
        self.splits: dict[str, dict[str, float]] = {}

    def routes(self, alias: str) -> dict[str, float]:
        return self.splits.get(alias) or self.cfg.aliases[alias].routes

    def allowed(self, tenant: str) -> list[str]:
        """The names a tenant may call (an admin: every alias and adapter the gateway knows)."""
        if tenant == ADMIN:
            names = list(self.cfg.aliases) + list(self.cfg.adapters)
            for spec in self.cfg.tenants.values():
                names += spec.models
            return list(dict.fromkeys(names))
        return list(self.cfg.tenants[tenant].models)

    def resolve(self, tenant: str, name: str, user: str | None) -> Route | None:
        """The route for `name`, or None when the tenant may not call it (or it does not exist)."""
        if tenant != ADMIN and name not in self.cfg.tenants[tenant].models:
            return None
        if name in self.cfg.aliases:
            routes = self.routes(name)
            point = bucket(name, user) if user else random.random()
            return Route(name, pick(routes, point), alias=name)
        return Route(name, name)


@dataclass
class Verdict:
    ok: bool
    reason: str = ""
    retry_after: float = 0.0


@dataclass
class TenantLimiter:
    """Requests/s (token bucket, burst = one second's worth), tokens/min (a 60 s window of what finished
    requests used) and concurrency. Called from the event loop only, so no locks."""

    limits: TenantLimits
    clock: callable = time.monotonic
    in_flight: int = 0
    _tokens: float = field(default=0.0)
    _stamp: float = field(default=0.0)
    _used: deque = field(default_factory=deque)  # (time, tokens)
    _used_sum: int = 0

    def __post_init__(self) -> None:
        self._tokens = max(self.limits.requests_per_s, 1.0)
        self._stamp = self.clock()

    def admit(self) -> Verdict:
        """Take one request slot, or say why not and when to retry."""
        now = self.clock()
        lim = self.limits
        if lim.concurrency and self.in_flight >= lim.concurrency:
            return Verdict(False, f"more than {lim.concurrency} requests in flight", 1.0)
        if lim.tokens_per_min:
            self._expire(now)
            if self._used_sum >= lim.tokens_per_min:
                wait = self._used[0][0] + 60.0 - now if self._used else 1.0
                return Verdict(False, f"more than {lim.tokens_per_min} tokens per minute", max(wait, 0.001))
        if lim.requests_per_s:
            capacity = max(lim.requests_per_s, 1.0)
            self._tokens = min(capacity, self._tokens + (now - self._stamp) * lim.requests_per_s)
            self._stamp = now
            if self._tokens < 1.0:
                return Verdict(False, f"more than {lim.requests_per_s:g} requests per second",
                               (1.0 - self._tokens) / lim.requests_per_s)
            self._tokens -= 1.0
        self.in_flight += 1
        return Verdict(True)

    def done(self, tokens: int) -> None:
        """Release the slot and count the tokens the request used."""
        self.in_flight -= 1
        if self.limits.tokens_per_min and tokens:
            self._used.append((self.clock(), tokens))
            self._used_sum += tokens

    def _expire(self, now: float) -> None:
        while self._used and self._used[0][0] <= now - 60.0:
            self._used_sum -= self._used.popleft()[1]


def retry_after_header(seconds: float) -> str:
    """Retry-After takes whole seconds: round up, at least 1."""
    return str(max(1, math.ceil(seconds)))
