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
"""

from __future__ import annotations

from pathlib import Path

from sovllm import __version__
from sovllm.config import Config
from sovllm.egress import PRIVACY_ENV
from sovllm.models.adapter import adapter_name
from sovllm.monitoring import dashboards
from sovllm.monitoring import rules as alert_rules
from sovllm.serve.vllm_server import SOVEREIGN_ENV, server_args, server_env
from sovllm.text import dns_name

MODELS = "/models"  # the pod's models volume: base/ and adapters/<name>/
TMP = "/tmp"  # the one other writable folder (caches, Python's temp files)
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


def _restricted(read_only: bool = True) -> dict:
    return {"allowPrivilegeEscalation": False, "runAsNonRoot": True, "readOnlyRootFilesystem": read_only,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


def _secret_env(name: str, secret: str, key: str) -> dict:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def _env(values: dict[str, str]) -> list[dict]:
    return [{"name": k, "value": v} for k, v in sorted(values.items())]


def fetch_container(cfg: Config) -> dict:
    """The init container: base model and adapters from the object store, sha256-verified."""
    store = cfg.cluster.object_store
    scheme = "http" if store.insecure else "https"
    args = ["models", "fetch", "--endpoint", f"{scheme}://{store.endpoint}", "--bucket", store.bucket,
            "--base", base_key(cfg), "--to", MODELS]
    for name, key in served_adapters(cfg).items():
        args += ["--adapter", f"{name}={key}"]
    return {
        "name": "fetch-models", "image": f"{cfg.cluster.image}:{cfg.cluster.image_tag or __version__}",
        "command": ["sovllm"], "args": args,
        "env": [_secret_env("AWS_ACCESS_KEY_ID", store.credentials_secret, store.access_key_key),
                _secret_env("AWS_SECRET_ACCESS_KEY", store.credentials_secret, store.secret_key_key),
                *_env({**PRIVACY_ENV, "HOME": TMP})],
        "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
        "securityContext": _restricted(),
        "volumeMounts": [{"name": "models", "mountPath": MODELS}, {"name": "tmp", "mountPath": TMP}],
    }


def _probes(port: int) -> dict:
    http = {"path": "/health", "port": "http"}
    return {
        # loading a large base model onto the GPU takes minutes: up to 20 before liveness counts
        "startupProbe": {"httpGet": http, "periodSeconds": 10, "failureThreshold": 120, "timeoutSeconds": 5},
        "readinessProbe": {"httpGet": http, "periodSeconds": 5, "failureThreshold": 3, "timeoutSeconds": 5},
        "livenessProbe": {"httpGet": http, "periodSeconds": 15, "failureThreshold": 4, "timeoutSeconds": 10},
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
    env = {**server_env(runtime_lora=True, resolver_dir=f"{MODELS}/adapters"),
           # only the filesystem resolver: never the Hugging Face Hub resolver
           "VLLM_PLUGINS": "lora_filesystem_resolver",
           "HOME": TMP, "XDG_CACHE_HOME": f"{TMP}/cache", "VLLM_CACHE_ROOT": f"{TMP}/vllm", "HF_HOME": f"{TMP}/hf",
           "TRITON_CACHE_DIR": f"{TMP}/triton"}
    limits = {"memory": serving.memory, **({"nvidia.com/gpu": str(serving.gpus)} if serving.gpus else {})}
    return {
        "name": "vllm", "image": f"{serving.vllm_image}:{serving.vllm_image_tag}",
        "command": ["python3"], "args": args,
        "env": [_secret_env("VLLM_API_KEY", serving.api_key_secret, serving.api_key_key), *_env(env)],
        "ports": [{"name": "http", "containerPort": serving.port, "protocol": "TCP"}],
        **_probes(serving.port),
        "lifecycle": {"preStop": {"sleep": {"seconds": 5}}},  # let the Service stop routing before shutdown
        "resources": {"requests": {"cpu": serving.cpu, "memory": serving.memory}, "limits": limits},
        "securityContext": _restricted(),
        "volumeMounts": [{"name": "models", "mountPath": MODELS, "readOnly": True},
                         {"name": "tmp", "mountPath": TMP}, {"name": "shm", "mountPath": "/dev/shm"}],
    }


def sovllm_container(cfg: Config) -> dict:
    """`sovllm serve` for CPU-only clusters: the same API, metrics names and adapter folder."""
    serving = cfg.cluster.serving
    args = ["serve", "--model", f"{MODELS}/base", "--served-model-name", served_name(cfg), "--host", "0.0.0.0",
            "--port", str(serving.port), "--max-model-len", str(serving.max_model_len),
            "--max-lora-rank", str(serving.max_lora_rank), "--adapters-dir", f"{MODELS}/adapters",
            "--adapter-root", f"{MODELS}/adapters"]
    for name in served_adapters(cfg):
        args += ["--adapter", f"{name}={MODELS}/adapters/{name}"]
    return {
        "name": "sovllm", "image": f"{cfg.cluster.image}:{cfg.cluster.image_tag or __version__}",
        "command": ["sovllm"], "args": args,
        "env": [_secret_env("SOVLLM_API_KEY", serving.api_key_secret, serving.api_key_key),
                *_env({**SOVEREIGN_ENV, "HOME": TMP, "SOVLLM_HOME": f"{TMP}/sovllm"})],
        "ports": [{"name": "http", "containerPort": serving.port, "protocol": "TCP"}],
        **_probes(serving.port),
        "lifecycle": {"preStop": {"sleep": {"seconds": 5}}},
        "resources": {"requests": {"cpu": serving.cpu, "memory": serving.memory}, "limits": {"memory": serving.memory}},
        "securityContext": _restricted(),
        "volumeMounts": [{"name": "models", "mountPath": MODELS, "readOnly": True}, {"name": "tmp", "mountPath": TMP}],
    }


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
    pod = {
        "automountServiceAccountToken": False,  # the server never calls the Kubernetes API
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 60,  # running requests finish after SIGTERM (sovllm serve: --grace-period 30)
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "initContainers": [fetch_container(cfg)],
        "containers": [vllm_container(cfg) if serving.engine == "vllm" else sovllm_container(cfg)],
        "volumes": volumes,
    }
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
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": names(cfg)["server"], "namespace": cfg.cluster.namespace, "labels": server_labels(cfg)},
            "spec": {"type": "ClusterIP", "selector": selector(cfg),
                     "ports": [{"name": "http", "port": cfg.cluster.serving.port, "targetPort": "http",
                                "protocol": "TCP"}]}}


def disruption_budget(cfg: Config) -> dict:
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": {"name": names(cfg)["pdb"], "namespace": cfg.cluster.namespace, "labels": server_labels(cfg)},
            "spec": {"minAvailable": 1, "selector": {"matchLabels": selector(cfg)}}}


def scaled_object(cfg: Config) -> dict:
    """KEDA scales on the waiting requests per replica (vLLM's own queue metric, which sovllm serve exports too)."""
    serving, ns = cfg.cluster.serving, cfg.cluster.namespace
    prometheus = cfg.cluster.serving.prometheus_peer
    return {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
            "metadata": {"name": names(cfg)["scaler"], "namespace": ns, "labels": server_labels(cfg)},
            "spec": {"scaleTargetRef": {"name": names(cfg)["server"]},
                     "minReplicaCount": serving.replicas, "maxReplicaCount": max(serving.max_replicas, serving.replicas),
                     "pollingInterval": 15, "cooldownPeriod": 600,
                     "triggers": [{"type": "prometheus", "metadata": {
                         "serverAddress": f"http://prometheus-operated.{prometheus.namespace}.svc:9090",
                         "query": METRICS_QUERY.format(ns=ns, job=names(cfg)["server"]),
                         "threshold": str(serving.queue_target)}}]}}


def service_monitor(cfg: Config) -> dict:
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
            "metadata": {"name": names(cfg)["monitor"], "namespace": cfg.cluster.namespace, "labels": server_labels(cfg)},
            "spec": {"selector": {"matchLabels": selector(cfg)}, "namespaceSelector": {"matchNames": [cfg.cluster.namespace]},
                     "endpoints": [{"port": "http", "path": "/metrics", "interval": "15s"}]}}


def prometheus_rule(cfg: Config) -> dict:
    """The alert rules of `sovllm.monitoring.rules` as a Prometheus Operator PrometheusRule."""
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
            "metadata": {"name": names(cfg)["rules"], "namespace": cfg.cluster.namespace, "labels": server_labels(cfg)},
            "spec": {"groups": [alert_rules.group(cfg)]}}


def _peer(section, *, port: int | None = None) -> dict:
    to = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": section.namespace}}}
    if section.pod_labels:
        to["podSelector"] = {"matchLabels": dict(section.pod_labels)}
    return {"to": [to], "ports": [{"protocol": "TCP", "port": port or section.port}]}


def network_policies(cfg: Config) -> list[dict]:
    ns, serving = cfg.cluster.namespace, cfg.cluster.serving
    meta = lambda name: {"name": name, "namespace": ns, "labels": {"app.kubernetes.io/part-of": "sovllm"}}  # noqa: E731
    deny = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta(names(cfg)["deny"]),
            "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}}
    port = [{"protocol": "TCP", "port": serving.port}]
    prometheus = serving.prometheus_peer
    sources = [{"podSelector": {"matchLabels": dict(labels)}} for labels in serving.clients]
    sources.append({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": prometheus.namespace}},
                    "podSelector": {"matchLabels": dict(prometheus.pod_labels)}})
    ingress = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta(names(cfg)["ingress"]),
               "spec": {"podSelector": {"matchLabels": selector(cfg)}, "policyTypes": ["Ingress"],
                        "ingress": [{"from": sources, "ports": port}]}}
    egress = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta(names(cfg)["egress"]),
              "spec": {"podSelector": {"matchLabels": selector(cfg)}, "policyTypes": ["Egress"],
                       "egress": [
                           {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                                    "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
                            "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
                           _peer(cfg.cluster.object_store_peer)]}}
    dns = egress["spec"]["egress"][0]
    # the default deny also stops the clients' egress: each client may reach the server (and DNS for its name)
    clients = [{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": meta(f"{names(cfg)['server']}-client-{k}"),
                "spec": {"podSelector": {"matchLabels": dict(labels)}, "policyTypes": ["Egress"],
                         "egress": [dns, {"to": [{"podSelector": {"matchLabels": selector(cfg)}}], "ports": port}]}}
               for k, labels in enumerate(serving.clients, 1)]
    return [deny, ingress, egress, *clients]


def dashboard_config_map(cfg: Config) -> dict:
    """The Grafana dashboards, for Grafana's dashboard sidecar (label `grafana_dashboard: "1"`)."""
    import json

    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": f"{dns_name(cfg.project.name)}-dashboards", "namespace": cfg.cluster.namespace,
                         "labels": {"app.kubernetes.io/part-of": "sovllm", "grafana_dashboard": "1"}},
            "data": {f"{stem}.json": json.dumps(board, indent=1) for stem, board in dashboards.dashboards().items()}}


def objects(cfg: Config) -> dict[str, dict | list[dict]]:
    """file stem → object(s), in the order kustomize lists them."""
    return {"deployment": deployment(cfg), "service": service(cfg), "pod-disruption-budget": disruption_budget(cfg),
            "scaled-object": scaled_object(cfg), "service-monitor": service_monitor(cfg),
            "prometheus-rule": prometheus_rule(cfg), "grafana-dashboards": dashboard_config_map(cfg),
            "network-policies": network_policies(cfg)}


def _yaml():
    """PyYAML's safe dumper with its own, default string representer: another library (hera adds a
    multi-line string style to SafeDumper when imported) must not change the rendered files."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(str, yaml.representer.SafeRepresenter.represent_str)
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
