"""`sovllm bench serve`: load-test an OpenAI-compatible server with phased request rates and a model mix."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from sovllm.layout import folder
from sovllm.progress import make_console

app = typer.Typer(help="Load tests against a running server (sovllm serve or vLLM).", no_args_is_help=True)
console = make_console()


@app.command()
def serve(
    base_url: str = typer.Option("http://127.0.0.1:8000/v1", "--base-url", help="The server's OpenAI base URL."),
    profile: str = typer.Option("warmup:60s@2rps,spike:60s@12rps", "--profile",
                                help="Phases NAME:DURATION@RATE, comma-separated (duration s or m)."),
    mix: str = typer.Option("adapter=0.7,base=0.3", "--mix",
                            help="Traffic split: base = the base model, adapter = each adapter in turn, or "
                                 "served model names."),
    project: Path = typer.Option(Path("."), "--project", "-p", help="Project whose egress.allow applies and whose "
                                                                    "out/curate/eval.jsonl gives the prompts."),
    prompts: Path = typer.Option(None, "--prompts", help="A split written by curate (default: the project's "
                                                         "eval.jsonl)."),
    max_tokens: int = typer.Option(128, "--max-tokens", min=1),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, max=2.0),
    api_key_env: str = typer.Option(None, "--api-key-env", help="Environment variable holding the server's API key."),
    seed: int = typer.Option(0, "--seed"),
    timeout: float = typer.Option(120.0, "--timeout", help="Seconds per request."),
    out: Path = typer.Option(Path("bench-serve.json"), "--out", help="Where the JSON report goes."),
) -> None:
    """Open-loop load at fixed rates; TTFT, inter-token and end-to-end latency p50/p95/p99, throughput, errors."""
    import asyncio
    import os

    from sovllm import egress
    from sovllm.artifacts import write_atomic
    from sovllm.config import CONFIG_FILE, load_config
    from sovllm.errors import ConfigError
    from sovllm.serve.loadtest import load_prompts, parse_mix, parse_profile, run_load

    phases, weights = parse_profile(profile), parse_mix(mix)
    cfg = load_config(project if (project / CONFIG_FILE).is_file() else None)
    egress.install(cfg.egress.allow, proxy=cfg.egress.proxy)
    path = prompts or folder(project, cfg, "splits") / "eval.jsonl"
    messages = load_prompts(path)
    key = None
    if api_key_env:
        key = os.environ.get(api_key_env)
        if not key:
            raise ConfigError(f"--api-key-env {api_key_env}: the variable is not set")
    total = sum(round(p.seconds * p.rate) for p in phases)
    console.print(f"bench serve: {total} requests over {sum(p.seconds for p in phases):.0f} s against {base_url} "
                  f"({len(messages)} prompts from {path})")
    report = asyncio.run(run_load(base_url, phases=phases, mix=weights, prompts=messages, max_tokens=max_tokens,
                                  temperature=temperature, api_key=key, seed=seed, timeout=timeout))
    write_atomic(out, json.dumps(report, indent=2) + "\n")
    print_report(report)
    console.print(f"report: {out}")


def print_report(report: dict) -> None:
    table = Table(title="sovllm bench serve")
    for column in ("phase", "requests", "ok", "errors", "req/s", "tok/s", "TTFT p50/p95/p99 s",
                   "ITL p50/p95/p99 s", "e2e p50/p95/p99 s"):
        table.add_column(column, justify="left" if column in ("phase", "errors") else "right")

    def q(stats: dict) -> str:
        return "/".join("–" if stats[k] is None else f"{stats[k]:.3f}" for k in ("p50", "p95", "p99"))

    rows = [*report["phases"].items(), ("overall", report["overall"])]
    for name, s in rows:
        errors = ", ".join(f"{k} {v}" for k, v in s["errors"].items()) or "0"
        table.add_row(name, str(s["requests"]), str(s["ok"]), errors, f"{s['requests_per_s']:.2f}",
                      f"{s['output_tokens_per_s']:.1f}", q(s["ttft_s"]), q(s["inter_token_s"]), q(s["e2e_s"]))
    console.print(table)
