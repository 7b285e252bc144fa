"""`sovllm render k8s`, when the project has gateway tenants: the multi-tenant gateway in front of the server.

- a ConfigMap with the gateway's project config (`/project/sovllm.yaml`): the project's `gateway:`
  section with its upstream rewritten to the serving Service (its API key from the serving Secret),
  file keys moved to one Secret (`cluster.gateway.keys_secret`: item `tenant.<tenant>` with that
  tenant's keys, one per line, and `admin.keys`), mounted as a folder so a rotated Secret reaches
  the running gateway (it re-reads key files that change); `env` keys come from the same Secret,
  item named like the variable; sha256 digests stay as they are. No key is ever in the ConfigMap.
- a Deployment of `sovllm gateway serve /project` with the serving Deployment's hardening; its
  usage store is either the database whose URL the Secret `cluster.gateway.database_secret` holds
  (`gateway.usage_database_env`: `cluster.gateway.replicas`, a PodDisruptionBudget) or SQLite on
  a volume of its own (then one replica, replaced not rolled: SQLite is not shared across pods).
- a Service, a ServiceMonitor for `/metrics`, and NetworkPolicies: the gateway admits its clients
  (`cluster.gateway.clients`) and Prometheus, and reaches only DNS, the serving pods and, with a
  database URL, `cluster.gateway.database_peer`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from urllib.parse import urlsplit

from sovllm.config import Config, KeySource
from sovllm.deploy import workload
from sovllm.deploy.workload import TMP, Block, secret_env
from sovllm.egress import PRIVACY_ENV
from sovllm.errors import ConfigError
from sovllm.text import dns_name

PROJECT = "/project"  # the ConfigMap: sovllm.yaml
KEYS = "/etc/sovllm/keys"  # the keys Secret's file items
USAGE = "/var/lib/sovllm"  # the SQLite usage store's volume (project.output_dir)
UPSTREAM_KEY_ENV = "SOVLLM_GATEWAY_UPSTREAM_KEY"
ADMIN_ITEM = "admin.keys"


@dataclass(frozen=True)
class Upstream:
    """The serving Service the gateway forwards to, and the names its server serves."""

    service: str
    selector: dict
    port: int
    models: tuple[str, ...]

    def url(self, namespace: str) -> str:
        return f"http://{self.service}.{namespace}.svc:{self.port}/v1"


def name(cfg: Config) -> str:
    return f"{dns_name(cfg.project.name)}-gateway"


def labels(cfg: Config) -> dict[str, str]:
    """The gateway pods' labels; `app.kubernetes.io/name: sovllm-gateway` is what the server admits."""
    return {"app.kubernetes.io/name": "sovllm-gateway", "app.kubernetes.io/instance": dns_name(cfg.project.name),
            "app.kubernetes.io/part-of": "sovllm", "sovllm.io/component": "gateway"}


def selector(cfg: Config) -> dict[str, str]:
    return {"app.kubernetes.io/name": "sovllm-gateway", "app.kubernetes.io/instance": dns_name(cfg.project.name)}


def tenant_item(tenant: str) -> str:
    """The keys Secret's item holding a tenant's file keys."""
    return f"tenant.{tenant}"


def shared_database(cfg: Config) -> bool:
    """Whether the usage store is a database URL (else SQLite on the gateway's volume); refuses URLs that
    cannot go into a ConfigMap or cannot work in the pod."""
    gw = cfg.gateway
    if gw.usage_database_env:
        return True
    if not gw.usage_database:
        return False
    url = urlsplit(gw.usage_database)
    if url.scheme.startswith("sqlite"):
        raise ConfigError(f"gateway.usage_database {gw.usage_database!r}: a SQLite file cannot be rendered for the "
                          "cluster", hint="leave it unset (SQLite on the gateway's own volume) or give a shared "
                                          "database in gateway.usage_database_env (--set gateway.usage_database=null)")
    if url.password:
        raise ConfigError("gateway.usage_database holds a password, which would land in a ConfigMap",
                          hint=f"put the URL into the Secret {cfg.cluster.gateway.database_secret} (key "
                               f"{cfg.cluster.gateway.database_key}) and set gateway.usage_database_env instead")
    return True


def _check_routes(cfg: Config, upstream: Upstream) -> None:
    gw = cfg.gateway
    known = {*upstream.models, *gw.adapters, *gw.aliases}
    wrong = [f"gateway.aliases.{alias}.routes: {target}" for alias, spec in gw.aliases.items()
             for target in spec.routes if target not in known]
    wrong += [f"gateway.tenants.{tenant}.models: {model}" for tenant, spec in gw.tenants.items()
              for model in spec.models if model not in known]
    if wrong:
        raise ConfigError(f"{len(wrong)} gateway name(s) the rendered server does not serve: {'; '.join(wrong)}",
                          hint=f"it serves {', '.join(sorted(upstream.models))} (cluster.serving.adapters and the "
                               "base model); add the adapter there, or under gateway.adapters for a runtime load")


def _keys(sources: list[KeySource], item: str) -> list[dict]:
    """sha256 and env sources as they are; file sources become one file: the Secret's `item`."""
    kept = [s.model_dump(exclude_none=True) for s in sources if not s.file]
    return kept + ([{"file": f"{KEYS}/{item}"}] if any(s.file for s in sources) else [])


def key_items(cfg: Config) -> list[str]:
    """The keys Secret's file items the gateway needs."""
    gw = cfg.gateway
    items = [tenant_item(t) for t, spec in gw.tenants.items() if any(s.file for s in spec.keys)]
    return items + ([ADMIN_ITEM] if any(s.file for s in gw.admin_keys) else [])


def env_keys(cfg: Config) -> list[str]:
    """The keys Secret's items read as environment variables (`env` key sources)."""
    gw = cfg.gateway
    sources = [s for spec in gw.tenants.values() for s in spec.keys] + gw.admin_keys
    return list(dict.fromkeys(s.env for s in sources if s.env))


def config_text(cfg: Config, upstream: Upstream) -> str:
    """The gateway's sovllm.yaml: the project's gateway section with cluster paths, URLs and Secrets."""
    import yaml

    _check_routes(cfg, upstream)
    gw, ns = cfg.gateway, cfg.cluster.namespace
    shared = shared_database(cfg)
    allow = [f"{upstream.service}.{ns}.svc"]
    if gw.usage_database_env:  # the URL is unknown here: a Service in the database's namespace
        allow += [f"*.{cfg.cluster.gateway.database_peer.namespace}.svc",
                  f"*.{cfg.cluster.gateway.database_peer.namespace}.svc.cluster.local"]
    elif gw.usage_database:
        allow.append(urlsplit(gw.usage_database).hostname)
    allow = list(dict.fromkeys([*allow, *cfg.egress.allow]))
    section = gw.model_dump(mode="json", exclude_defaults=True)
    section["upstreams"] = [{"url": upstream.url(ns), "api_key_env": UPSTREAM_KEY_ENV}]
    for tenant, spec in section.get("tenants", {}).items():
        spec["keys"] = _keys(gw.tenants[tenant].keys, tenant_item(tenant))
    if gw.admin_keys:
        section["admin_keys"] = _keys(gw.admin_keys, ADMIN_ITEM)
    project = {"name": cfg.project.name, **({} if shared else {"output_dir": USAGE})}
    # egress.proxy is left out: the gateway reaches its upstream directly, as its NetworkPolicy allows
    data = {"version": 1, "project": project, "egress": {"allow": allow}, "gateway": section}
    secret = cfg.cluster.gateway.keys_secret
    store = (f"the database URL in ${gw.usage_database_env} (Secret {cfg.cluster.gateway.database_secret})"
             if gw.usage_database_env else "gateway.usage_database" if shared
             else f"SQLite in {USAGE}, so one replica (SQLite is not shared across pods)")
    header = (f"# sovllm render k8s: the gateway's config (sovllm gateway serve {PROJECT}).\n"
              f"# Upstream: the serving Service, its API key in ${UPSTREAM_KEY_ENV}.\n"
              f"# Keys: sha256 digests, files in {KEYS} and variables, both from the Secret {secret}.\n"
              f"# Usage store: {store}.\n")
    return header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)


def container_env(cfg: Config) -> list[dict]:
    """The upstream key, the database URL and env keys from Secrets, then the fixed variables."""
    gw, deploy = cfg.gateway, cfg.cluster.gateway
    fixed = {**PRIVACY_ENV, "HOME": TMP, "SOVLLM_HOME": f"{TMP}/sovllm"}
    secrets = {UPSTREAM_KEY_ENV: (cfg.cluster.serving.api_key_secret, cfg.cluster.serving.api_key_key)}
    if gw.usage_database_env:
        secrets[gw.usage_database_env] = (deploy.database_secret, deploy.database_key)
    reserved = {*fixed, *secrets}
    for var in env_keys(cfg):
        if var in reserved:
            raise ConfigError(f"gateway key variable {var} is one the gateway's container sets itself",
                              hint=f"name it otherwise; the gateway sets {', '.join(sorted(reserved))}")
        secrets[var] = (deploy.keys_secret, var)
    return [*(secret_env(var, *ref) for var, ref in secrets.items()), *workload.env(fixed)]


def config_map(cfg: Config, text: str) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": f"{name(cfg)}-config", "namespace": cfg.cluster.namespace, "labels": labels(cfg)},
            "data": {"sovllm.yaml": Block(text)}}


def deployment(cfg: Config, text: str) -> dict:
    deploy, shared = cfg.cluster.gateway, shared_database(cfg)
    volumes = [{"name": "config", "configMap": {"name": f"{name(cfg)}-config"}},
               {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}]
    mounts = [{"name": "config", "mountPath": PROJECT, "readOnly": True}, {"name": "tmp", "mountPath": TMP}]
    if key_items(cfg):  # the folder, not subPath: a rotated Secret reaches the running gateway
        volumes.append({"name": "keys", "secret": {"secretName": deploy.keys_secret, "defaultMode": 0o440,
                                                   "items": [{"key": i, "path": i} for i in key_items(cfg)]}})
        mounts.append({"name": "keys", "mountPath": KEYS, "readOnly": True})
    if not shared:
        volumes.append({"name": "usage", "persistentVolumeClaim": {"claimName": f"{name(cfg)}-usage"}})
        mounts.append({"name": "usage", "mountPath": USAGE})
    args = ["gateway", "serve", PROJECT, "--host", "0.0.0.0", "--port", str(deploy.port)]
    container = workload.server_container(
        "gateway", workload.image(cfg), ["sovllm"], args, container_env(cfg), deploy.port,
        {"requests": {"cpu": deploy.cpu, "memory": deploy.memory}, "limits": {"memory": deploy.memory}}, mounts,
        # alive = the process answers; ready = an upstream is healthy (vLLM down must not restart the gateway)
        workload.probes(ready="/health", alive="/version", startup_failures=30))
    metadata = {"name": name(cfg), "namespace": cfg.cluster.namespace, "labels": labels(cfg)}
    if shared:
        strategy = {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    else:  # the volume and its SQLite file belong to one pod at a time
        strategy = {"type": "Recreate"}
        metadata["annotations"] = {"sovllm.io/replicas": "1: the usage store is SQLite on this pod's volume; set "
                                                         "gateway.usage_database_env for more replicas"}
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()  # a changed config rolls the pods
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": metadata,
            "spec": {"replicas": deploy.replicas if shared else 1, "selector": {"matchLabels": selector(cfg)},
                     "strategy": strategy,
                     "template": {"metadata": {"labels": labels(cfg),
                                               "annotations": {"sovllm.io/config-sha256": digest}},
                                  "spec": workload.pod_spec([container], volumes)}}}


def volume_claim(cfg: Config) -> dict:
    deploy = cfg.cluster.gateway
    spec = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": deploy.storage}}}
    if deploy.storage_class:
        spec["storageClassName"] = deploy.storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": f"{name(cfg)}-usage", "namespace": cfg.cluster.namespace, "labels": labels(cfg)},
            "spec": spec}


def _client(client) -> dict:
    source = {}
    if client.namespace_labels:
        source["namespaceSelector"] = {"matchLabels": dict(client.namespace_labels)}
    if client.pod_labels:
        source["podSelector"] = {"matchLabels": dict(client.pod_labels)}
    return source


def network_policies(cfg: Config, upstream: Upstream) -> list[dict]:
    """The gateway's ingress (clients, Prometheus) and egress (DNS, the server, the database), and the
    egress of clients in this namespace."""
    deploy, policy = cfg.cluster.gateway, workload.policy
    port = [{"protocol": "TCP", "port": deploy.port}]
    ingress = policy(cfg, f"{name(cfg)}-ingress", {
        "podSelector": {"matchLabels": selector(cfg)}, "policyTypes": ["Ingress"],
        "ingress": [{"from": [*map(_client, deploy.clients), workload.prometheus_source(cfg)], "ports": port}]})
    rules = [workload.dns(), {"to": [{"podSelector": {"matchLabels": dict(upstream.selector)}}],
                              "ports": [{"protocol": "TCP", "port": upstream.port}]}]
    if shared_database(cfg):
        rules.append(workload.peer(deploy.database_peer))
    egress = policy(cfg, f"{name(cfg)}-egress", {"podSelector": {"matchLabels": selector(cfg)},
                                                 "policyTypes": ["Egress"], "egress": rules})
    # clients of other namespaces: their own namespace's policies decide their egress
    local = [c for c in deploy.clients if not c.namespace_labels]
    clients = [workload.client_egress(cfg, f"{name(cfg)}-client-{k}", c.pod_labels, selector(cfg), deploy.port)
               for k, c in enumerate(local, 1)]
    return [ingress, egress, *clients]


def objects(cfg: Config, upstream: Upstream) -> dict[str, dict]:
    """file stem → object (the NetworkPolicies go with the namespace's others: `network_policies`)."""
    text = config_text(cfg, upstream)
    name_, ns, port = name(cfg), cfg.cluster.namespace, cfg.cluster.gateway.port
    found = {"gateway-config": config_map(cfg, text), "gateway-deployment": deployment(cfg, text),
             "gateway-service": workload.service(name_, ns, labels(cfg), selector(cfg), port)}
    if not shared_database(cfg):
        found["gateway-volume"] = volume_claim(cfg)
    elif cfg.cluster.gateway.replicas > 1:
        found["gateway-pod-disruption-budget"] = workload.disruption_budget(name_, ns, labels(cfg), selector(cfg))
    found["gateway-service-monitor"] = workload.service_monitor(name_, ns, labels(cfg), selector(cfg))
    return found
