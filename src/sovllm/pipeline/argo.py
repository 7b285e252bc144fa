"""`sovllm render argo`: the stage graph (`pipeline.graph`) as Argo Workflows objects, built with hera.

Rendered: a WorkflowTemplate (one container template per stage and a DAG), a Workflow that
references it, with `schedule` a CronWorkflow (Argo 4.0's `schedules`, concurrency `Forbid`: no
overlapping runs), and a NetworkPolicy for the workflow pods. Each step runs the stage's own
`sovllm` command in the pinned sovllm image, its project folder `/work/project` holding only
`sovllm.yaml` (and the judge's gold labels):

- the config comes from the `config` parameter (a raw artifact), the documents from the
  object-store key in the `documents` parameter;
- every other input is an artifact in the in-cluster S3-compatible store under
  `<prefix>/<artifact>.tgz` (the `prefix` parameter; `chunks`, `pairs`, `splits`, …), unpacked to
  `/work/artifacts/<location>`; the command names each folder it reads or writes explicitly
  (`--set project.documents=…`, `--set project.locations.<location>=…`), so no step relies on
  the project's `out/` layout. A stage's own previous output comes back as an optional input, so
  an up-to-date stage skips and synth reuses its cache (new documents redo only their chunks);
- outputs go back under the same keys; the judge's gold labels, when uploaded to
  `<prefix>/judge-gold.tgz`, reach eval.

Steps retry with exponential backoff; each requests its resources; train runs on a GPU node
(node selector and tolerations from `cluster`) unless `train.device: cpu`. Workflow pods carry
the labels the serving NetworkPolicy admits and get their own policy: egress only to DNS, the LLM
endpoint, MLflow, the object store and the Kubernetes API.
"""

from __future__ import annotations

from pathlib import Path

from sovllm import __version__
from sovllm.config import Config
from sovllm.pipeline.graph import Stage, artifacts, stages
from sovllm.text import dns_name

WORKDIR = "/work"
PROJECT = f"{WORKDIR}/project"  # holds sovllm.yaml (and the judge's gold labels)
ARTIFACTS = f"{WORKDIR}/artifacts"  # one folder per artifact, named on each command line
POD_LABELS = {"app.kubernetes.io/part-of": "sovllm", "sovllm.io/component": "pipeline"}


def image(cfg: Config) -> str:
    return f"{cfg.cluster.image}:{cfg.cluster.image_tag or __version__}"


def prefix(cfg: Config) -> str:
    return cfg.cluster.object_store.prefix or f"sovllm/{cfg.project.name}"


def names(cfg: Config) -> dict[str, str]:
    base = dns_name(cfg.project.name)
    return {"template": f"{base}-pipeline", "workflow": f"{base}-", "cron": f"{base}-scheduled",
            "policy": f"{base}-pipeline-egress"}


def labels(cfg: Config) -> dict[str, str]:
    """The labels of the workflow objects and pods (what the serving NetworkPolicy admits)."""
    return {**POD_LABELS, "sovllm.io/project": dns_name(cfg.project.name)}


def _s3(cfg: Config, name: str, path: str, key: str, *, optional: bool = False):
    from hera.workflows import S3Artifact
    from hera.workflows.models import SecretKeySelector

    store = cfg.cluster.object_store
    return S3Artifact(name=name, path=path, key=key, bucket=store.bucket, endpoint=store.endpoint,
                      insecure=store.insecure, optional=optional or None,
                      access_key_secret=SecretKeySelector(name=store.credentials_secret, key=store.access_key_key),
                      secret_key_secret=SecretKeySelector(name=store.credentials_secret, key=store.secret_key_key))


def _container_class():
    from hera.workflows import Container

    class Main(Container):
        """hera's container template, its container named `main` (Argo's name for it; the Kubernetes
        Container schema requires a name)."""

        def _build_container(self):
            container = super()._build_container()
            container.name = "main"
            return container

    return Main


def _template(cfg: Config, stage: Stage, found: dict):
    from hera.workflows import RawArtifact, Resources
    from hera.workflows.models import (
        Backoff,
        Capabilities,
        RetryStrategy,
        SeccompProfile,
        SecurityContext,
        Toleration,
    )

    def where(name: str) -> str:
        art = found[name]
        return f"{ARTIFACTS}/{art.location}" + (f"/{art.sub}" if art.sub else "")

    inputs = [RawArtifact(name="config", path=f"{PROJECT}/sovllm.yaml", data="{{workflow.parameters.config}}")]
    for name in stage.inputs:
        if name == "documents":
            inputs.append(_s3(cfg, "documents", where(name), "{{workflow.parameters.documents}}"))
        else:  # an earlier stage's output, or (optional) this stage's own previous one
            inputs.append(_s3(cfg, name, where(name), f"{{{{workflow.parameters.prefix}}}}/{name}.tgz",
                              optional=name in stage.outputs))
    gold = Path(cfg.eval.judge.gold)
    if stage.name == "eval" and cfg.eval.judge.enabled and not gold.is_absolute():  # the project's labels, if uploaded
        inputs.append(_s3(cfg, "judge-gold", f"{PROJECT}/{gold.as_posix()}",
                          "{{workflow.parameters.prefix}}/judge-gold.tgz", optional=True))
    outputs = [_s3(cfg, name, where(name), f"{{{{workflow.parameters.prefix}}}}/{name}.tgz") for name in stage.outputs]
    # every folder the stage reads or writes, named on its command line (no project layout assumed)
    locations = {found[n].location: f"{ARTIFACTS}/{found[n].location}" for n in (*stage.inputs, *stage.outputs)}
    argv = stage.argv(PROJECT, locations)
    res = stage.resources
    gpu = stage.needs_gpu
    return _container_class()(
        name=stage.name, image=image(cfg), command=argv[:1], args=argv[1:],
        working_dir=WORKDIR, inputs=inputs, outputs=outputs,
        resources=Resources(cpu_request=res.cpu, memory_request=res.memory, memory_limit=res.memory,
                            gpus=res.gpus if gpu else None),
        retry_strategy=RetryStrategy(limit=cfg.cluster.retries, retry_policy="Always",
                                     backoff=Backoff(duration=cfg.cluster.retry_backoff, factor=2, cap="10m")),
        node_selector=dict(cfg.cluster.gpu_node_selector) if gpu else None,
        tolerations=[Toleration(**t) for t in cfg.cluster.gpu_tolerations] if gpu else None,
        labels={"sovllm.io/stage": stage.name},
        security_context=SecurityContext(allow_privilege_escalation=False, run_as_non_root=True,
                                         capabilities=Capabilities(drop=["ALL"]),
                                         seccomp_profile=SeccompProfile(type="RuntimeDefault")),
    )


def workflow_template(cfg: Config, config_text: str, *, shards: int | None = None, quick: bool = False,
                      promote: bool | None = None):
    """The WorkflowTemplate: parameters, one template per stage, the DAG."""
    from hera.workflows import DAG, Parameter, Task, WorkflowTemplate
    from hera.workflows.models import Metadata, PodSecurityContext

    shards = shards or cfg.cluster.synth_shards
    graph = stages(cfg, shards, quick=quick, promote=promote)
    found = artifacts(cfg, shards)
    n = names(cfg)
    with WorkflowTemplate(
        name=n["template"], namespace=cfg.cluster.namespace, entrypoint="pipeline",
        service_account_name=cfg.cluster.service_account,
        labels=labels(cfg),
        pod_metadata=Metadata(labels=labels(cfg)),
        security_context=PodSecurityContext(run_as_non_root=True, run_as_user=1000, fs_group=1000),
        arguments=[Parameter(name="documents", value=f"{prefix(cfg)}/documents.tgz",
                             description="object-store key of the documents (a .tgz of the folder)"),
                   Parameter(name="config", value=config_text, description="the project's sovllm.yaml"),
                   Parameter(name="prefix", value=prefix(cfg), description="key prefix of the stage artifacts")],
    ) as template:
        containers = {stage.name: _template(cfg, stage, found) for stage in graph}
        with DAG(name="pipeline"):
            tasks = {stage.name: Task(name=stage.name, template=containers[stage.name]) for stage in graph}
            for stage in graph:
                for dependency in stage.after:
                    tasks[dependency] >> tasks[stage.name]
    return template


def workflow(cfg: Config, *, documents: str | None = None):
    """A Workflow that runs the WorkflowTemplate (generateName: one name per run)."""
    from hera.workflows import Parameter, Workflow
    from hera.workflows.models import WorkflowTemplateRef

    arguments = [Parameter(name="documents", value=documents)] if documents else None
    return Workflow(generate_name=names(cfg)["workflow"], namespace=cfg.cluster.namespace,
                    workflow_template_ref=WorkflowTemplateRef(name=names(cfg)["template"]), arguments=arguments,
                    labels=labels(cfg))


def cron_workflow(cfg: Config, schedule: str, *, timezone: str = "UTC"):
    """A CronWorkflow that runs the WorkflowTemplate on `schedule`, never two runs at once."""
    from hera.workflows import CronWorkflow
    from hera.workflows.models import WorkflowTemplateRef

    return CronWorkflow(name=names(cfg)["cron"], namespace=cfg.cluster.namespace, schedules=[schedule],
                        timezone=timezone, concurrency_policy="Forbid", starting_deadline_seconds=600,
                        successful_jobs_history_limit=3, failed_jobs_history_limit=3,
                        workflow_template_ref=WorkflowTemplateRef(name=names(cfg)["template"]),
                        labels=labels(cfg))


def network_policy(cfg: Config) -> dict:
    """The workflow pods' NetworkPolicy: no ingress; egress to DNS, the LLM endpoint, MLflow, the
    object store, the Kubernetes API and (when `monitoring.pushgateway` is set) the Pushgateway only."""
    def peer(section) -> dict:
        return {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": section.namespace}},
                        **({"podSelector": {"matchLabels": dict(section.pod_labels)}} if section.pod_labels else {})}],
                "ports": [{"protocol": "TCP", "port": section.port}]}

    c = cfg.cluster
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": names(cfg)["policy"], "namespace": c.namespace, "labels": dict(POD_LABELS)},
        "spec": {
            "podSelector": {"matchLabels": labels(cfg)},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [],
            "egress": [
                {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                         "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
                 "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
                peer(c.llm_peer), peer(c.mlflow_peer), peer(c.object_store_peer),
                *([peer(c.pushgateway_peer)] if cfg.monitoring.pushgateway else []),
                {"to": [{"ipBlock": {"cidr": c.kubernetes_api_cidr}}],
                 "ports": [{"protocol": "TCP", "port": c.kubernetes_api_port}]},
            ],
        },
    }


def render(cfg: Config, config_text: str, out: Path, *, schedule: str | None = None, shards: int | None = None,
           quick: bool = False, promote: bool | None = None) -> dict[str, Path]:
    """Write the objects as YAML files into `out`; returns kind → file."""
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    objects = {"WorkflowTemplate": workflow_template(cfg, config_text, shards=shards, quick=quick,
                                                       promote=promote).to_dict(),
               "Workflow": workflow(cfg).to_dict(), "NetworkPolicy": network_policy(cfg)}
    if schedule:
        objects["CronWorkflow"] = cron_workflow(cfg, schedule).to_dict()
    files = {}
    for kind, obj in objects.items():
        path = out / f"{_kebab(kind)}.yaml"
        path.write_text(yaml.safe_dump(obj, sort_keys=False, allow_unicode=True, width=120), encoding="utf-8")
        files[kind] = path
    return files


def _kebab(kind: str) -> str:
    return "".join(f"-{c.lower()}" if c.isupper() else c for c in kind).lstrip("-")
