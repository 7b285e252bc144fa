"""What `sovllm usage` and `sovllm ab` print and change: usage per tenant and model, A/B tables, splits."""

from __future__ import annotations

from sqlalchemy import select

from sovllm.config import Config
from sovllm.errors import ConfigError
from sovllm.gateway.usage import latest_splits, requests_table, set_split
from sovllm.stats import percentile


def usage_rows(engine, since: float) -> list[dict]:
    """One row per (tenant, requested model, adapter): requests, errors, tokens, latency quantiles."""
    c = requests_table.c
    with engine.connect() as conn:
        rows = conn.execute(select(c.tenant, c.model, c.adapter, c.status, c.prompt_tokens, c.completion_tokens,
                                   c.latency_s).where(c.time >= since)).all()
    groups: dict[tuple, list] = {}
    for row in rows:
        groups.setdefault((row.tenant, row.model, row.adapter), []).append(row)
    out = []
    for (tenant, model, adapter), group in sorted(groups.items()):
        ok = [r.latency_s for r in group if r.status < 400]
        out.append({"tenant": tenant, "model": model, "adapter": adapter, "requests": len(group),
                    "errors": sum(1 for r in group if r.status >= 400),
                    "prompt_tokens": sum(r.prompt_tokens for r in group),
                    "completion_tokens": sum(r.completion_tokens for r in group),
                    "latency_p50_s": percentile(ok, 0.5) if ok else None,
                    "latency_p95_s": percentile(ok, 0.95) if ok else None})
    return out


def current_routes(engine, cfg: Config, alias: str) -> dict[str, float]:
    """The alias's live split: the newest one set through the store, else the config's."""
    return latest_splits(engine).get(alias) or dict(cfg.gateway.aliases[alias].routes)


def parse_routes(pairs: list[str]) -> dict[str, float]:
    routes = {}
    for pair in pairs:
        name, sep, weight = pair.partition("=")
        try:
            value = float(weight)
        except ValueError:
            value = -1.0
        if not sep or not name or value < 0:
            raise ConfigError(f"{pair!r}: expected ADAPTER=WEIGHT with a weight >= 0, e.g. acme-v4=0.1")
        routes[name.strip()] = value
    if sum(routes.values()) <= 0:
        raise ConfigError("the weights add up to 0: at least one route needs a weight above 0")
    return routes


def set_routes(cfg: Config, engine, alias: str, routes: dict[str, float], reason: str,
               adapters: dict[str, str] | None = None) -> str:
    """Record a new split after checking the alias exists and every route is a routable name."""
    if alias not in cfg.gateway.aliases:
        raise ConfigError(f"gateway.aliases has no '{alias}'", hint="add it to sovllm.yaml first")
    known = set(cfg.gateway.adapters) | set(cfg.gateway.aliases[alias].routes) | set(adapters or {})
    known |= set(latest_splits(engine, with_adapters=True)[1]) | set(current_routes(engine, cfg, alias))
    for tenant in cfg.gateway.tenants.values():
        known |= set(tenant.models)
    unknown = [name for name in routes if name not in known or name in cfg.gateway.aliases]
    if unknown:
        raise ConfigError(f"{alias}: cannot route to {', '.join(unknown)}",
                          hint="route to a name in gateway.adapters, the alias's configured routes or a tenant's models")
    set_split(engine, alias, routes, reason, adapters)
    total = sum(routes.values())
    shares = ", ".join(f"{name} {weight / total:.0%}" for name, weight in routes.items())
    return f"{alias}: {shares} (gateways pick it up within gateway.health_interval_s)"


def apply_split(cfg: Config, engine, alias: str, routes: dict[str, float], reason: str) -> list[str]:
    return [set_routes(cfg, engine, alias, routes, f"sovllm ab report --apply: {reason}")]


def render_ab(console, result: dict) -> None:
    from rich.table import Table

    table = Table(title=f"A/B: {result['alias']} (control {result['control']})")
    for column in ("variant", "weight", "requests", "errors", "p50 s", "p95 s", "feedback", "score [95% CI]",
                   "p", "recommendation"):
        table.add_column(column, justify="left" if column in ("variant", "recommendation") else "right")
    total = sum(result["routes"].values()) or 1.0
    for v in result["variants"]:
        ci = v["score_ci"]
        score = "-" if v["score"] is None else f"{v['score']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
        p = v["p_score"] if v["p_score"] is not None else v["p_errors"]
        table.add_row(v["adapter"], f"{v['weight'] / total:.0%}", str(v["requests"]), str(v["errors"]),
                      "-" if v["latency_p50"] is None else f"{v['latency_p50']:.3f}",
                      "-" if v["latency_p95"] is None else f"{v['latency_p95']:.3f}",
                      f"{v['feedback']} ({v['feedback_rate']:.0%})", score, "-" if p is None else f"{p:.3g}",
                      f"{v['recommendation']}: {v['reason']}")
    console.print(table)
    if result.get("apply"):
        console.print(f"--apply would set {result['apply']['routes']} ({result['apply']['reason']})")


def start_challenger(cfg: Config, engine, alias: str, name: str, path: str, weight: float, reason: str) -> dict:
    """Give `name` (the adapter at `path`) `weight` of the alias's traffic; the control keeps the rest.

    The control is the alias's heaviest route now; other routes drop out of the split."""
    current = current_routes(engine, cfg, alias)
    control = max(current, key=lambda route: current[route])
    if control == name:
        raise ConfigError(f"{alias}: '{name}' already is the control of the split")
    routes = {control: round(1.0 - weight, 6), name: weight}
    set_routes(cfg, engine, alias, routes, reason, adapters={name: path})
    return {"alias": alias, "routes": routes, "control": control, "challenger": name}
