"""`sovllm render argo`: the pipeline as Argo Workflows objects (WorkflowTemplate, Workflow, CronWorkflow)
and the workflow pods' NetworkPolicy, rendered with hera from the stage graph. `sovllm render k8s`:
serving on Kubernetes (Deployment, Service, autoscaler, monitoring, NetworkPolicies) as a kustomize folder."""

from __future__ import annotations

from pathlib import Path

import typer

from sovllm.cli import options
from sovllm.progress import make_console

console = make_console()
app = typer.Typer(help="Render the project for a cluster.", no_args_is_help=True)


def config_text(root: Path, overrides: list[str]) -> str:
    """The project's sovllm.yaml as the workflow's `config` parameter: the file itself, with any
    `--set` overrides written in (the workflow's steps load it as their project config)."""
    import yaml

    from sovllm.config import CONFIG_FILE, load_config

    text = (root / CONFIG_FILE).read_text(encoding="utf-8")
    if not overrides:
        return text
    return yaml.safe_dump(load_config(root, overrides).model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def render_argo(directory, out: Path, set_: list[str], *, schedule: str | None, shards: int | None,
                quick: bool, promote: bool | None = None) -> dict[str, Path]:
    from sovllm.pipeline import argo

    root, cfg = options.load_project(directory, set_)
    return argo.render(cfg, config_text(root, set_), out, schedule=schedule, shards=shards, quick=quick,
                       promote=promote)


@app.command("argo")
def argo_command(
    directory: Path = options.project_dir(),
    out: Path = typer.Option(..., "-o", "--out", help="Folder for the YAML files."),
    schedule: str = typer.Option(None, "--schedule", help="Also render a CronWorkflow on this cron schedule "
                                                          "(e.g. '0 3 * * *'); runs never overlap."),
    shards: int = typer.Option(None, "--shards", help="synth steps side by side (default: cluster.synth_shards)."),
    quick: bool = options.quick("Every step runs with --quick (a smoke run of the cluster setup)."),
    promote: bool = typer.Option(None, "--promote/--no-promote", help="eval runs the eval gate (--promote: the "
                                 "MLflow 'champion' alias moves when the new adapter is better). Default: on, "
                                 "off with --quick."),
    set_: list[str] = options.overrides(),
) -> None:
    """Render the pipeline as an Argo WorkflowTemplate, a Workflow (and a CronWorkflow) plus a NetworkPolicy."""
    files = render_argo(directory, out, set_, schedule=schedule, shards=shards, quick=quick, promote=promote)
    for kind, path in files.items():
        console.print(f"{kind}: {path}")
    console.print(f"Apply: kubectl apply -f {out}/workflow-template.yaml -f {out}/network-policy.yaml"
                  + (f" -f {out}/cron-workflow.yaml" if schedule else "")
                  + f"; run once: argo submit {out}/workflow.yaml (or kubectl create -f)")


@app.command("k8s")
def k8s_command(
    directory: Path = options.project_dir(),
    out: Path = typer.Option(..., "-o", "--out", help="Folder for the YAML files and kustomization.yaml."),
    engine: str = typer.Option(None, "--engine", help="vllm (GPU nodes) or sovllm (sovllm serve on CPU nodes); "
                                                      "default: cluster.serving.engine."),
    set_: list[str] = options.overrides(),
) -> None:
    """Render serving on Kubernetes: the server Deployment (models fetched from the object store and
    verified), Service, PodDisruptionBudget, KEDA autoscaler, ServiceMonitor, PrometheusRule and
    NetworkPolicies, and with gateway tenants the multi-tenant gateway in front of it, as a
    kustomize-ready folder."""
    from sovllm.deploy import k8s, k8s_gateway

    overrides = [*set_, f"cluster.serving.engine={engine}"] if engine else set_
    _, cfg = options.load_project(directory, overrides)
    files = k8s.render(cfg, out)
    for stem, path in files.items():
        console.print(f"{stem}: {path}")
    secrets = [cfg.cluster.serving.api_key_secret, cfg.cluster.object_store.credentials_secret]
    if cfg.gateway.tenants and (k8s_gateway.key_items(cfg) or k8s_gateway.env_keys(cfg)):
        secrets.append(cfg.cluster.gateway.keys_secret)
    if cfg.gateway.tenants and cfg.gateway.usage_database_env:
        secrets.append(cfg.cluster.gateway.database_secret)
    console.print(f"Apply: kubectl apply -k {out}  (first: the namespace {cfg.cluster.namespace}, the Secrets "
                  f"{', '.join(secrets)}, and the model archives in the object store; docs/operations.md)")


def register(root_app: typer.Typer) -> None:
    root_app.add_typer(app, name="render")
