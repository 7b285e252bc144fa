"""`sovllm serve`: the embedded OpenAI-compatible multi-LoRA server."""

from __future__ import annotations

from pathlib import Path

import typer


def serve(
    model: str = typer.Option(None, "--model", help="Registry name or local model directory "
                                                     "(default: model.base of the project in --project, else the bundled model)."),
    project: Path = typer.Option(Path("."), "--project", "-p", help="Project whose sovllm.yaml supplies defaults."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8000, "--port", help="Port (0: any free port; see --ready-file)."),
    served_model_name: str = typer.Option(None, "--served-model-name", help="Name clients use for the base model."),
    adapter: list[str] = typer.Option([], "--adapter", help="Load a LoRA adapter at start: NAME=PATH (repeatable)."),
    adapter_root: list[Path] = typer.Option([], "--adapter-root",
                                            help="Folders /v1/load_lora_adapter may load from (repeatable; default: cwd)."),
    max_lora_rank: int = typer.Option(64, "--max-lora-rank", help="Refuse adapters of higher rank."),
    max_num_seqs: int = typer.Option(16, "--max-num-seqs", help="Sequences decoded together (KV-cache slots)."),
    max_model_len: int = typer.Option(2048, "--max-model-len", help="Prompt + completion tokens per sequence."),
    enable_prefix_caching: bool = typer.Option(True, "--enable-prefix-caching/--no-enable-prefix-caching",
                                               help="Reuse the keys and values of shared prompt prefixes."),
    refusal_calibration: bool = typer.Option(True, "--refusal-calibration/--no-refusal-calibration",
                                             help="Apply the refusal bias an adapter's manifest carries "
                                                  "(refusal_calibration, chosen on val by sovllm train)."),
    threads: int = typer.Option(0, "--threads", help="torch threads for the engine (0: all cores)."),
    max_queue: int = typer.Option(128, "--max-queue", help="Waiting requests beyond this get 503 with Retry-After "
                                                           "(0: unbounded)."),
    api_key_file: Path = typer.Option(None, "--api-key-file", help="File with the API key(s) clients must send, one "
                                                                  "per line (or set SOVLLM_API_KEY)."),
    api_key: str = typer.Option(None, "--api-key", help="API key on the command line (visible in the process "
                                                        "list: prefer --api-key-file)."),
    adapters_dir: Path = typer.Option(None, "--adapters-dir", help="Watch this folder: each subfolder with an "
                                                                   "adapter loads under its name, removed ones unload."),
    max_body_bytes: int = typer.Option(4 * 2**20, "--max-body-bytes", help="Larger request bodies get 413 (0: no "
                                                                            "limit)."),
    limit_concurrency: int = typer.Option(512, "--limit-concurrency", help="Open connections beyond this get 503 "
                                                                          "(0: no limit)."),
    grace_period: float = typer.Option(30.0, "--grace-period", help="Seconds running requests may finish after "
                                                                    "SIGTERM before they are aborted."),
    ready_file: Path = typer.Option(None, "--ready-file", help="Write {host, port, pid, model} here when healthy."),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level."),
) -> None:
    """Serve the base model and LoRA adapters with an OpenAI-compatible API (vLLM-style)."""
    import logging
    import os

    from sovllm import egress
    from sovllm.config import CONFIG_FILE, load_config
    from sovllm.serve.server import parse_adapter_specs, read_api_keys
    from sovllm.serve.server import serve as run_server

    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(project if (project / CONFIG_FILE).is_file() else None)
    egress.install(cfg.egress.allow, proxy=cfg.egress.proxy)
    keys = read_api_keys(api_key_file, api_key, os.environ.get("SOVLLM_API_KEY"),
                         warn=lambda msg: typer.echo(f"warning: {msg}", err=True))
    run_server(model or cfg.model.base, host=host, port=port, ready_file=str(ready_file) if ready_file else None,
               log_level=log_level, served_name=served_model_name, adapters=parse_adapter_specs(adapter),
               adapter_roots=list(adapter_root), max_lora_rank=max_lora_rank, max_num_seqs=max_num_seqs,
               max_model_len=max_model_len, threads=threads or (os.cpu_count() or 1), max_queue=max_queue,
               api_keys=keys, adapters_dir=adapters_dir, grace_period=grace_period, max_body_bytes=max_body_bytes,
               limit_concurrency=limit_concurrency, prefix_caching=enable_prefix_caching,
               refusal_calibration=refusal_calibration)


def register(app: typer.Typer) -> None:
    app.command()(serve)
