"""What every sovllm workload that `sovllm render k8s` writes shares: Pod Security "restricted"
settings, environment from Secrets, HTTP probes, the server container's shape (port `http`, probes,
a pre-stop pause, resources), the pod's settings (no service account token, non-root user 1000,
seccomp) and the NetworkPolicy pieces (DNS, a peer namespace). The serving Deployment
(`sovllm.deploy.k8s`) and the gateway's (`sovllm.deploy.k8s_gateway`) are built from these, so a
hardening change reaches both.
"""

from __future__ import annotations

from sovllm import __version__
from sovllm.config import Config, PeerSection

TMP = "/tmp"  # the one writable folder every container gets (caches, Python's temp files)


class Block(str):
    """A multi-line string rendered as a YAML literal block (`|`), e.g. a config file in a ConfigMap."""


def image(cfg: Config) -> str:
    """The sovllm image, pinned: `cluster.image:cluster.image_tag` (default this sovllm's version)."""
    return f"{cfg.cluster.image}:{cfg.cluster.image_tag or __version__}"


def restricted(read_only: bool = True) -> dict:
    return {"allowPrivilegeEscalation": False, "runAsNonRoot": True, "readOnlyRootFilesystem": read_only,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


def secret_env(name: str, secret: str, key: str) -> dict:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def env(values: dict[str, str]) -> list[dict]:
    return [{"name": k, "value": v} for k, v in sorted(values.items())]


def probes(*, ready: str = "/health", alive: str = "/health", startup_failures: int = 120) -> dict:
    """Startup and liveness on `alive`, readiness on `ready` (port `http`)."""
    get = lambda path: {"path": path, "port": "http"}  # noqa: E731
    return {
        # loading a large base model onto the GPU takes minutes: up to 20 before liveness counts
        "startupProbe": {"httpGet": get(alive), "periodSeconds": 10, "failureThreshold": startup_failures,
                         "timeoutSeconds": 5},
        "readinessProbe": {"httpGet": get(ready), "periodSeconds": 5, "failureThreshold": 3, "timeoutSeconds": 5},
        "livenessProbe": {"httpGet": get(alive), "periodSeconds": 15, "failureThreshold": 4, "timeoutSeconds": 10},
    }


def server_container(name: str, image_: str, command: list[str], args: list[str], env_: list[dict], port: int,
                     resources: dict, mounts: list[dict], probes_: dict | None = None) -> dict:
    """An HTTP server container: port `http`, probes, a pre-stop pause, restricted, read-only root."""
    return {
        "name": name, "image": image_, "command": command, "args": args, "env": env_,
        "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
        **(probes_ or probes()),
        "lifecycle": {"preStop": {"sleep": {"seconds": 5}}},  # let the Service stop routing before shutdown
        "resources": resources,
        "securityContext": restricted(),
        "volumeMounts": mounts,
    }


def pod_spec(containers: list[dict], volumes: list[dict], init_containers: list[dict] = ()) -> dict:
    pod = {
        "automountServiceAccountToken": False,  # sovllm's servers never call the Kubernetes API
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 60,  # running requests finish after SIGTERM (--grace-period 30)
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                            "seccompProfile": {"type": "RuntimeDefault"}},
    }
    if init_containers:
        pod["initContainers"] = list(init_containers)
    pod["containers"] = containers
    pod["volumes"] = volumes
    return pod


def policy(cfg: Config, name: str, spec: dict) -> dict:
    """A NetworkPolicy of the namespace."""
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": cfg.cluster.namespace,
                         "labels": {"app.kubernetes.io/part-of": "sovllm"}},
            "spec": spec}


def dns() -> dict:
    """The egress rule to the cluster's DNS."""
    return {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                    "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
            "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}


def peer(section: PeerSection, *, port: int | None = None) -> dict:
    """The egress rule to the pods of `section` (a namespace, optionally pod labels) on its port."""
    to = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": section.namespace}}}
    if section.pod_labels:
        to["podSelector"] = {"matchLabels": dict(section.pod_labels)}
    return {"to": [to], "ports": [{"protocol": "TCP", "port": port or section.port}]}


def prometheus_source(cfg: Config) -> dict:
    """The ingress peer for the Prometheus that scrapes sovllm's servers."""
    prometheus = cfg.cluster.serving.prometheus_peer
    return {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": prometheus.namespace}},
            "podSelector": {"matchLabels": dict(prometheus.pod_labels)}}


def service(name: str, namespace: str, labels: dict, selector: dict, port: int) -> dict:
    """A ClusterIP Service on `port` to the pods' port `http`."""
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"type": "ClusterIP", "selector": selector,
                     "ports": [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}]}}


def disruption_budget(name: str, namespace: str, labels: dict, selector: dict) -> dict:
    """At least one pod stays up during node drains."""
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"minAvailable": 1, "selector": {"matchLabels": selector}}}


def service_monitor(name: str, namespace: str, labels: dict, selector: dict) -> dict:
    """A Prometheus Operator scrape of the Service's `/metrics` every 15 s."""
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"selector": {"matchLabels": selector}, "namespaceSelector": {"matchNames": [namespace]},
                     "endpoints": [{"port": "http", "path": "/metrics", "interval": "15s"}]}}


def client_egress(cfg: Config, name: str, client: dict, target: dict, port: int) -> dict:
    """The default deny also stops a client's egress: the client pods may reach the `target` pods on
    `port` (and DNS for their name)."""
    return policy(cfg, name, {"podSelector": {"matchLabels": dict(client)}, "policyTypes": ["Egress"],
                              "egress": [dns(), {"to": [{"podSelector": {"matchLabels": dict(target)}}],
                                                 "ports": [{"protocol": "TCP", "port": port}]}]})
