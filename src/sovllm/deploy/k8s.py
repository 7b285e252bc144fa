"""`sovllm render k8s`: serving on Kubernetes, as a kustomize-ready folder of plain objects.

From `sovllm.yaml` (`cluster`, `cluster.serving`):

- a Deployment of vLLM (GPU nodes) or, with `cluster.serving.engine: sovllm`, of `sovllm serve`
  (CPU nodes). Its init container runs `sovllm models fetch`: the base model and the adapters come
  from the in-cluster S3-compatible store onto the pod's own volume, each file checked against the
  sha256 the adapter manifest records (no model hub is ever asked). The server's flags are the ones
  sovllm starts vLLM with here (`sovllm.serve.vllm_server.server_args`: LoRA, the adapters, the
  refusal-calibration plugin), with runtime loading and the filesystem resolver on the adapters
  folder; hub and telemetry are off by environment, the API key comes from a Secret.
  Pod Security "restricted": non-root, no privilege escalation, seccomp RuntimeDefault, no
  capabilities, read-only root filesystem with explicit writable volumes.
- a Service, a PodDisruptionBudget, a KEDA ScaledObject on `vllm:num_requests_waiting`, a
  ServiceMonitor and a PrometheusRule;
- NetworkPolicies: default-deny ingress and egress for the namespace; the server admits only its
  clients (the gateway, the pipeline's workflow pods) and Prometheus, and reaches only DNS and the
  object store; each client may reach the server (and DNS).
- with gateway tenants (`gateway.tenants`), the multi-tenant gateway in front of the server
  (`sovllm.deploy.k8s_gateway`): its config, Deployment, Service, ServiceMonitor and policies.
"""

from __future__ import annotations

from pathlib import Path

from sovllm.config import Config
from sovllm.deploy import k8s_gateway, workload
from sovllm.deploy.workload import TMP, env, secret_env
from sovllm.egress import PRIVACY_ENV
from sovllm.models.adapter import adapter_name
from sovllm.monitoring import dashboards
from sovllm.monitoring import rules as alert_rules
from sovllm.serve.vllm_server import SOVEREIGN_ENV, server_args, server_env
from sovllm.text import dns_name

MODELS = "/models"  # the pod's models volume: base/ and adapters/<name>/
METRICS_QUERY = 'sum(vllm:num_requests_waiting{{namespace="{ns}", job="{job}"}})'


def names(cfg: Config) -> dict[str, str]:
    engine = cfg.cluster.serving.engine
    base = f"{dns_name(cfg.project.name)}-{'vllm' if engine == 'vllm' else 'serve'}"
    return {"server": base, "pdb": base, "scaler": base, "monitor": base, "rules": f"{base}-alerts",
            "deny": "default-deny", "ingress": f"{base}-ingress", "egress": f"{base}-egress"}


def server_labels(cfg: Config) -> dict[str, str]:
    """The server pods' labels; `app.kubernetes.io/name: vllm` is what the pipeline's egress policy
    (`cluster.llm_peer`) and the gateway look for, whichever engine serves."""
    return {"app.kubernetes.io/name": "vllm", "app.kubernetes.io/instance": dns_name(cfg.project.name),
            "app.kubernetes.io/part-of": "sovllm", "sovllm.io/component": "serving"}


def selector(cfg: Config) -> dict[str, str]:
    return {"app.kubernetes.io/name": "vllm", "app.kubernetes.io/instance": dns_name(cfg.project.name)}


def served_adapters(cfg: Config) -> dict[str, str]:
    """Served name → object key of its archive ({} in the config: the pipeline's adapter output)."""
    serving = cfg.cluster.serving
    if serving.adapters:
        return dict(serving.adapters)
    prefix = cfg.cluster.object_store.prefix or f"sovllm/{cfg.project.name}"
    return {adapter_name(cfg): f"{prefix}/adapter.tgz"}


def base_key(cfg: Config) -> str:
    return cfg.cluster.serving.base_model_key or f"models/{Path(cfg.model.base).name}.tgz"


def served_name(cfg: Config) -> str:
    return Path(cfg.model.base).name


def fetch_container(cfg: Config) -> dict:
    """The init container: base model and adapters from the object store, sha256-verified."""
    store = cfg.cluster.object_store
    scheme = "http" if store.insecure else "https"
    args = ["models", "fetch", "--endpoint", f"{scheme}://{store.endpoint}", "--bucket", store.bucket,
            "--base", base_key(cfg), "--to", MODELS]
    for name, key in served_adapters(cfg).items():
        args += ["--adapter", f"{name}={key}"]
    return {
        "name": "fetch-models", "image": workload.image(cfg),
        "command": ["sovllm"], "args": args,
        "env": [secret_env("AWS_ACCESS_KEY_ID", store.credentials_secret, store.access_key_key),
                secret_env("AWS_SECRET_ACCESS_KEY", store.credentials_secret, store.secret_key_key),
                *env({**PRIVACY_ENV, "HOME": TMP})],
        "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
        "securityContext": workload.restricted(),
        "volumeMounts": [{"name": "models", "mountPath": MODELS}, {"name": "tmp", "mountPath": TMP}],
    }


def vllm_container(cfg: Config) -> dict:
    serving = cfg.cluster.serving
    adapters = {name: f"{MODELS}/adapters/{name}" for name in served_adapters(cfg)}
    args = server_args(f"{MODELS}/base", served_name=served_name(cfg), host="0.0.0.0", port=serving.port,
                       dtype=serving.dtype, max_model_len=serving.max_model_len, max_lora_rank=serving.max_lora_rank,
                       max_loras=serving.max_loras, max_cpu_loras=serving.max_cpu_loras, adapters=adapters,
                       log_stats=True)
    if serving.gpus > 1:
        args += ["--tensor-parallel-size", str(serving.gpus)]
    variables = {**server_env(runtime_lora=True, resolver_dir=f"{MODELS}/adapters"),
                 # only the filesystem resolver: never the Hugging Face Hub resolver
                 "VLLM_PLUGINS": "lora_filesystem_resolver",
                 "HOME": TMP, "XDG_CACHE_HOME": f"{TMP}/cache", "VLLM_CACHE_ROOT": f"{TMP}/vllm",
                 "HF_HOME": f"{TMP}/hf", "TRITON_CACHE_DIR": f"{TMP}/triton"}
    limits = {"memory": serving.memory, **({"nvidia.com/gpu": str(serving.gpus)} if serving.gpus else {})}
    return workload.server_container(
        "vllm", f"{serving.vllm_image}:{serving.vllm_image_tag}", ["python3"], args,
        [secret_env("VLLM_API_KEY", serving.api_key_secret, serving.api_key_key), *env(variables)], serving.port,
        {"requests": {"cpu": serving.cpu, "memory": serving.memory}, "limits": limits},
        [{"name": "models", "mountPath": MODELS, "readOnly": True}, {"name": "tmp", "mountPath": TMP},
         {"name": "shm", "mountPath": "/dev/shm"}])


def sovllm_container(cfg: Config) -> dict:
    """`sovllm serve` for CPU-only clusters: the same API, metrics names and adapter folder."""
    serving = cfg.cluster.serving
    args = ["serve", "--model", f"{MODELS}/base", "--served-model-name", served_name(cfg), "--host", "0.0.0.0",
            "--port", str(serving.port), "--max-model-len", str(serving.max_model_len),
            "--max-lora-rank", str(serving.max_lora_rank), "--adapters-dir", f"{MODELS}/adapters",
            "--adapter-root", f"{MODELS}/adapters"]
    for name in served_adapters(cfg):
        args += ["--adapter", f"{name}={MODELS}/adapters/{name}"]
    return workload.server_container(
        "sovllm", workload.image(cfg), ["sovllm"], args,
        [secret_env("SOVLLM_API_KEY", serving.api_key_secret, serving.api_key_key),
         *env({**SOVEREIGN_ENV, "HOME": TMP, "SOVLLM_HOME": f"{TMP}/sovllm"})], serving.port,
        {"requests": {"cpu": serving.cpu, "memory": serving.memory}, "limits": {"memory": serving.memory}},
        [{"name": "models", "mountPath": MODELS, "readOnly": True}, {"name": "tmp", "mountPath": TMP}])


def deployment(cfg: Config) -> dict:
    serving, cluster = cfg.cluster.serving, cfg.cluster
    gpu = serving.engine == "vllm" and serving.gpus > 0
    claim = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": serving.storage}}}
    if serving.storage_class:
        claim["storageClassName"] = serving.storage_class
    volumes = [{"name": "models", "ephemeral": {"volumeClaimTemplate": {
                    "metadata": {"labels": server_labels(cfg)}, "spec": claim}}},
               {"name": "tmp", "emptyDir": {"sizeLimit": "2Gi"}}]
    if serving.engine == "vllm":
        volumes.append({"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}})
    pod = workload.pod_spec([vllm_container(cfg) if serving.engine == "vllm" else sovllm_container(cfg)], volumes,
                            [fetch_container(cfg)])
    if gpu:
        pod["nodeSelector"] = dict(cluster.gpu_node_selector)
        pod["tolerations"] = [dict(t) for t in cluster.gpu_tolerations]
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": names(cfg)["server"], "namespace": cluster.namespace, "labels": server_labels(cfg)},
        "spec": {"replicas": serving.replicas, "selector": {"matchLabels": selector(cfg)},
                 "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
                 "template": {"metadata": {"labels": server_labels(cfg)}, "spec": pod}},
    }


def service(cfg: Config) -> dict:
    return workload.service(names(cfg)["server"], cfg.cluster.namespace, server_labels(cfg), selector(cfg),
                            cfg.cluster.serving.port)


def disruption_budget(cfg: Config) -> dict:
    return workload.disruption_budget(names(cfg)["pdb"], cfg.cluster.namespace, server_labels(cfg), selector(cfg))


def scaled_object(cfg: Config) -> dict:
    """KEDA scales on the waiting requests per replica (vLLM's own queue metric, which sovllm serve exports too)."""
    serving, ns = cfg.cluster.serving, cfg.cluster.namespace
    prometheus = cfg.cluster.serving.prometheus_peer
    return {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
            "metadata": {"name": names(cfg)["scaler"], "namespace": ns, "labels": server_labels(cfg)},
            "spec": {"scaleTargetRef": {"name": names(cfg)["server"]},
                     "minReplicaCount": serving.replicas,
                     "maxReplicaCount": max(serving.max_replicas, serving.replicas),
                     "pollingInterval": 15, "cooldownPeriod": 600,
                     "triggers": [{"type": "prometheus", "metadata": {
                         "serverAddress": f"http://prometheus-operated.{prometheus.namespace}.svc:9090",
                         "query": METRICS_QUERY.format(ns=ns, job=names(cfg)["server"]),
                         "threshold": str(serving.queue_target)}}]}}


def service_monitor(cfg: Config) -> dict:
    return workload.service_monitor(names(cfg)["monitor"], cfg.cluster.namespace, server_labels(cfg), selector(cfg))


def prometheus_rule(cfg: Config) -> dict:
    """The alert rules of `sovllm.monitoring.rules` as a Prometheus Operator PrometheusRule."""
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
            "metadata": {"name": names(cfg)["rules"], "namespace": cfg.cluster.namespace, "labels": server_labels(cfg)},
            "spec": {"groups": [alert_rules.group(cfg)]}}


def network_policies(cfg: Config) -> list[dict]:
    """Default deny for the namespace; the server's ingress (its clients, Prometheus) and egress (DNS, the
    object store); each client's egress to the server; with gateway tenants, the gateway's policies."""
    serving, policy = cfg.cluster.serving, workload.policy
    port = [{"protocol": "TCP", "port": serving.port}]
    sources = [{"podSelector": {"matchLabels": dict(labels)}} for labels in serving.clients]
    deny = policy(cfg, names(cfg)["deny"], {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]})
    ingress = policy(cfg, names(cfg)["ingress"], {
        "podSelector": {"matchLabels": selector(cfg)}, "policyTypes": ["Ingress"],
        "ingress": [{"from": [*sources, workload.prometheus_source(cfg)], "ports": port}]})
    egress = policy(cfg, names(cfg)["egress"], {
        "podSelector": {"matchLabels": selector(cfg)}, "policyTypes": ["Egress"],
        "egress": [workload.dns(), workload.peer(cfg.cluster.object_store_peer)]})
    clients = [workload.client_egress(cfg, f"{names(cfg)['server']}-client-{k}", labels, selector(cfg), serving.port)
               for k, labels in enumerate(serving.clients, 1)]
    gateway = k8s_gateway.network_policies(cfg, upstream(cfg)) if cfg.gateway.tenants else []
    return [deny, ingress, egress, *clients, *gateway]


def dashboard_config_map(cfg: Config) -> dict:
    """The Grafana dashboards, for Grafana's dashboard sidecar (label `grafana_dashboard: "1"`)."""
    import json

    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": f"{dns_name(cfg.project.name)}-dashboards", "namespace": cfg.cluster.namespace,
                         "labels": {"app.kubernetes.io/part-of": "sovllm", "grafana_dashboard": "1"}},
            "data": {f"{stem}.json": json.dumps(board, indent=1) for stem, board in dashboards.dashboards().items()}}


def upstream(cfg: Config) -> k8s_gateway.Upstream:
    """The serving Service as the gateway's upstream."""
    return k8s_gateway.Upstream(names(cfg)["server"], selector(cfg), cfg.cluster.serving.port,
                                (*served_adapters(cfg), served_name(cfg)))


def objects(cfg: Config) -> dict[str, dict | list[dict]]:
    """file stem → object(s), in the order kustomize lists them; the gateway's with gateway tenants."""
    found = {"deployment": deployment(cfg), "service": service(cfg), "pod-disruption-budget": disruption_budget(cfg),
             "scaled-object": scaled_object(cfg), "service-monitor": service_monitor(cfg),
             "prometheus-rule": prometheus_rule(cfg), "grafana-dashboards": dashboard_config_map(cfg),
             "network-policies": network_policies(cfg)}
    if cfg.gateway.tenants:
        found.update(k8s_gateway.objects(cfg, upstream(cfg)))
    return found


def _yaml():
    """PyYAML's safe dumper with its own, default string representer: another library (hera adds a
    multi-line string style to SafeDumper when imported) must not change the rendered files. Block
    strings (a config file) are literal blocks; repeated pieces are written out, never as aliases."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(str, yaml.representer.SafeRepresenter.represent_str)
    Dumper.add_representer(workload.Block, lambda dumper, text: dumper.represent_scalar("tag:yaml.org,2002:str",
                                                                                        str(text), style="|"))
    Dumper.ignore_aliases = lambda self, data: True  # plain YAML: no &id001 anchors for repeated pieces
    return Dumper


def render(cfg: Config, out: Path) -> dict[str, Path]:
    """Write each object (a list: several documents) into `out/<stem>.yaml` and a kustomization.yaml."""
    import json

    import yaml

    out.mkdir(parents=True, exist_ok=True)
    dumper = _yaml()
    files = {}
    for stem, obj in objects(cfg).items():
        docs = obj if isinstance(obj, list) else [obj]
        path = out / f"{stem}.yaml"
        path.write_text(yaml.dump_all(docs, Dumper=dumper, sort_keys=False, allow_unicode=True, width=120),
                        encoding="utf-8")
        files[stem] = path
    kustomization = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                     "namespace": cfg.cluster.namespace, "resources": [p.name for p in files.values()]}
    path = out / "kustomization.yaml"
    path.write_text(yaml.dump(kustomization, Dumper=dumper, sort_keys=False), encoding="utf-8")
    files["kustomization"] = path
    # the same alerts for a Prometheus without the Operator (`rule_files:`); not a Kubernetes object
    path = out / "prometheus" / "sovllm-alerts.rules.yml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.dump(alert_rules.rules_file(cfg), Dumper=dumper, sort_keys=False, allow_unicode=True,
                              width=120), encoding="utf-8")
    files["rules"] = path
    for stem, board in dashboards.dashboards().items():  # for Grafana's "Import dashboard"
        path = out / "grafana" / f"{stem}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(board, indent=1) + "\n", encoding="utf-8")
        files[f"grafana/{stem}"] = path
    return files
