"""`sovllm render k8s`: serving objects validated strictly (core kinds with kubernetes-validate, the
custom resources with independently published schemas), compared with golden files, checked for
what a bank's platform team requires, and their NetworkPolicies evaluated over enumerated flows."""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
from pathlib import Path

import pytest
import yaml

from sovllm.config import load_config
from sovllm.deploy import k8s, k8s_gateway
from sovllm.errors import ConfigError
from sovllm.pipeline import argo
from tests.k8s_schema import strict_core, unknown_fields, validate
from tests.netpol import Outside, Pod, allowed

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "acme"
GATEWAY = Path(__file__).parent / "gateway-project"  # two tenants, an alias with an A/B split
GOLDEN = Path(__file__).parent / "golden"
PINNED = ("cluster.image_tag=v0.1.0",)  # golden files must not change with the package version
CORE = {"Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy", "ConfigMap", "PersistentVolumeClaim"}
SQLITE = ("gateway.usage_database_env=null",)  # the gateway project with its default usage store


def render(tmp_path: Path, *settings: str, project: Path = EXAMPLE) -> tuple[list[dict], dict[str, Path]]:
    files = k8s.render(load_config(project, (*PINNED, *settings)), tmp_path)
    objects = [doc for stem, path in files.items() if stem not in ("kustomization", "rules") and not stem.startswith("grafana/")
               for doc in yaml.safe_load_all(path.read_text(encoding="utf-8"))]
    return objects, files


ENGINES = [("vllm", ()), ("sovllm", ("cluster.serving.engine=sovllm",))]
# golden folder, project, settings
RENDERS = [(engine, EXAMPLE, settings) for engine, settings in ENGINES] + [("gateway", GATEWAY, ())]
KINDS = ["ConfigMap", "Deployment", "NetworkPolicy", "PodDisruptionBudget", "PrometheusRule", "ScaledObject", "Service",
         "ServiceMonitor"]


@pytest.mark.parametrize("case,project,settings,extra", [(*r, []) for r in RENDERS] +
                         [("gateway-sqlite", GATEWAY, SQLITE, ["PersistentVolumeClaim"])])
def test_every_object_validates(tmp_path, case, project, settings, extra):
    objects, _ = render(tmp_path, *settings, project=project)
    kinds = sorted({o["kind"] for o in objects})
    assert kinds == sorted(KINDS + extra)
    for obj in objects:
        if obj["kind"] in CORE:
            assert strict_core(obj) is None, (obj["kind"], obj["metadata"]["name"], strict_core(obj))
    results = validate(objects)  # every kind, the custom resources included
    assert all(r["valid"] for r in results), [r for r in results if not r["valid"]]
    assert unknown_fields(objects) == []  # the custom resources: no field their published types lack


def test_the_checks_can_fail(tmp_path):
    objects, _ = render(tmp_path)
    by_kind = {o["kind"]: o for o in objects}
    deployment = copy.deepcopy(by_kind["Deployment"])
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"  # a typo
    assert "imagePullPolicyy" in strict_core(deployment)
    assert "SchemaNotFound" in strict_core({"apiVersion": "apps/v1", "kind": "Deploymnet", "metadata": {"name": "x"}})
    scaler = copy.deepcopy(by_kind["ScaledObject"])
    scaler["spec"]["minReplicaCount"] = "two"
    monitor = copy.deepcopy(by_kind["ServiceMonitor"])
    monitor["spec"]["endpoints"] = "http"
    rule = copy.deepcopy(by_kind["PrometheusRule"])
    del rule["spec"]["groups"][0]["name"]
    assert not any(r["valid"] for r in validate([scaler, monitor, rule]))
    typo = copy.deepcopy(by_kind["ServiceMonitor"])
    typo["spec"]["endpoints"][0]["intervall"] = "15s"
    extra = copy.deepcopy(by_kind["ScaledObject"])
    extra["spec"]["triggers"][0]["metadata"]["query"] = "up"  # fine: trigger metadata is a free map
    extra["spec"]["minReplicas"] = 2  # HPA's name, not KEDA's
    errors = unknown_fields([typo, extra])
    assert len(errors) == 2 and "intervall" in errors[0] and "minReplicas" in errors[1], errors


@pytest.mark.parametrize("engine,project,settings", RENDERS)
def test_rendered_files_match_the_golden_files(tmp_path, engine, project, settings):
    _, files = render(tmp_path, *settings, project=project)
    for stem, path in files.items():
        if engine == "gateway" and not stem.startswith("gateway-") and stem not in ("network-policies",
                                                                                    "kustomization"):
            continue  # the serving files are the vllm folder's (with other adapters)
        golden = GOLDEN / engine / path.relative_to(tmp_path)
        if os.environ.get("SOVLLM_UPDATE_GOLDEN"):
            golden.parent.mkdir(parents=True, exist_ok=True)
            golden.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
        assert golden.is_file(), f"no golden file {golden}; render with SOVLLM_UPDATE_GOLDEN=1 and review it"
        assert path.read_text(encoding="utf-8") == golden.read_text(encoding="utf-8"), \
            f"{path.name} differs from {golden}; if intended, rerun with SOVLLM_UPDATE_GOLDEN=1 and review the diff"


@pytest.mark.parametrize("engine,settings", ENGINES)
def test_what_a_platform_team_requires_is_in_the_deployment(tmp_path, engine, settings):
    objects, files = render(tmp_path, *settings)
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["terminationGracePeriodSeconds"] >= 30 and pod["automountServiceAccountToken"] is False
    mounts_allowed = {"models", "tmp", "shm"}
    for container in pod["initContainers"] + pod["containers"]:
        image = container["image"]
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), image
        sc = container["securityContext"]
        assert sc == {"allowPrivilegeEscalation": False, "runAsNonRoot": True, "readOnlyRootFilesystem": True,
                      "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}
        assert {m["name"] for m in container["volumeMounts"]} <= mounts_allowed  # the only writable places
        env = {e["name"]: e for e in container["env"]}
        assert env["HF_HUB_OFFLINE"]["value"] == "1" and env["TRANSFORMERS_OFFLINE"]["value"] == "1"
        assert env["DO_NOT_TRACK"]["value"] == "1"
        command = " ".join(container["command"] + container["args"])
        assert "api-key" not in command and "secret" not in command.lower()  # secrets never on the command line
        assert "huggingface.co" not in yaml.safe_dump(container)
    server = pod["containers"][0]
    env = {e["name"]: e for e in server["env"]}
    key_var = "VLLM_API_KEY" if engine == "vllm" else "SOVLLM_API_KEY"
    assert env[key_var]["valueFrom"]["secretKeyRef"] == {"name": "sovllm-api-key", "key": "apiKey"}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["httpGet"]["path"] == "/health"
    assert server["resources"]["requests"]["cpu"] and server["resources"]["limits"]["memory"]
    fetch = pod["initContainers"][0]
    assert fetch["args"][:2] == ["models", "fetch"] and "acme=sovllm/acme/adapter.tgz" in fetch["args"]
    assert {e["name"] for e in fetch["env"] if "valueFrom" in e} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    if engine == "vllm":
        args = server["args"]
        for flag in ("--enable-lora", "--max-loras", "--max-lora-rank", "--max-cpu-loras", "--lora-modules",
                     "--middleware", "--logits-processors"):
            assert flag in args, flag
        assert "--disable-log-stats" not in args  # vLLM's Prometheus metrics are part of its statistics
        assert env["VLLM_NO_USAGE_STATS"]["value"] == "1" and env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"]["value"] == "True"
        assert env["VLLM_LORA_RESOLVER_CACHE_DIR"]["value"] == "/models/adapters"
        assert env["VLLM_PLUGINS"]["value"] == "lora_filesystem_resolver"  # never the Hub resolver
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"} and pod["tolerations"]
        assert server["resources"]["limits"]["nvidia.com/gpu"] == "1"
    else:
        assert "nodeSelector" not in pod and "--adapters-dir" in server["args"]
    kustomization = yaml.safe_load(files["kustomization"].read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for s, p in files.items()
                                                        if s not in ("kustomization", "rules") and not s.startswith("grafana/"))
    scaler = next(o for o in objects if o["kind"] == "ScaledObject")
    assert "vllm:num_requests_waiting" in scaler["spec"]["triggers"][0]["metadata"]["query"]


def _gateway(objects: list[dict]) -> dict[str, dict]:
    """The gateway's objects by kind."""
    return {o["kind"]: o for o in objects if o["metadata"]["name"].startswith("acme-gateway")
            and o["kind"] != "NetworkPolicy"}


def test_what_a_platform_team_requires_is_in_the_gateway(tmp_path):
    objects, files = render(tmp_path, project=GATEWAY)
    gateway = _gateway(objects)
    deployment, config = gateway["Deployment"], gateway["ConfigMap"]
    assert deployment["spec"]["replicas"] == 2 and gateway["PodDisruptionBudget"]["spec"]["minAvailable"] == 1
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"]
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False and pod["terminationGracePeriodSeconds"] >= 30
    [container] = pod["containers"]
    assert container["image"] == "registry.internal/sovllm:v0.1.0"
    assert container["command"] + container["args"] == ["sovllm", "gateway", "serve", "/project", "--host", "0.0.0.0",
                                                        "--port", "8080"]
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "runAsNonRoot": True,
                                            "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
                                            "seccompProfile": {"type": "RuntimeDefault"}}
    assert container["startupProbe"]["httpGet"]["path"] == container["livenessProbe"]["httpGet"]["path"] == "/version"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"  # no healthy upstream: out of the Service
    assert container["lifecycle"]["preStop"] and container["resources"]["limits"]["memory"]
    writable = {m["name"] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert writable == {"tmp"}  # with a database URL nothing else: config and keys are read-only
    env = {e["name"]: e for e in container["env"]}
    refs = {name: e["valueFrom"]["secretKeyRef"] for name, e in env.items() if "valueFrom" in e}
    assert refs == {"SOVLLM_GATEWAY_UPSTREAM_KEY": {"name": "sovllm-api-key", "key": "apiKey"},
                    "SOVLLM_USAGE_DATABASE": {"name": "sovllm-gateway-database", "key": "url"},
                    "HR_GATEWAY_KEY": {"name": "sovllm-gateway-keys", "key": "HR_GATEWAY_KEY"}}
    assert env["HF_HUB_OFFLINE"]["value"] == "1" and env["DO_NOT_TRACK"]["value"] == "1"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == config["metadata"]["name"]
    assert volumes["keys"]["secret"]["secretName"] == "sovllm-gateway-keys"
    items = [i["key"] for i in volumes["keys"]["secret"]["items"]]
    assert items == ["tenant.finance", "admin.keys"]
    text = config["data"]["sovllm.yaml"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["sovllm.io/config-sha256"] == hashlib.sha256(text.encode()).hexdigest()
    service, monitor = gateway["Service"], gateway["ServiceMonitor"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"] == [{"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    kustomization = yaml.safe_load(files["kustomization"].read_text())
    assert {"gateway-config.yaml", "gateway-deployment.yaml", "gateway-service.yaml",
            "gateway-pod-disruption-budget.yaml", "gateway-service-monitor.yaml"} <= set(kustomization["resources"])


def test_the_gateway_config_loads_and_holds_no_key(tmp_path):
    """The ConfigMap is a project config sovllm itself loads: the project's tenants, aliases and limits,
    the serving Service as upstream, and keys only as digests, Secret files or Secret variables."""
    project = tmp_path / "project"
    shutil.copytree(GATEWAY, project)
    plaintext = {"keys/finance.txt": "sk-sovllm-finance-1\n", "keys/admin.txt": "sk-sovllm-admin-1\n"}
    for name, key in plaintext.items():  # what running the project here would read
        (project / name).parent.mkdir(exist_ok=True)
        (project / name).write_text(key)
    objects, files = render(tmp_path / "out", project=project)
    for path in files.values():
        rendered = path.read_text()
        assert not any(key.strip() in rendered for key in plaintext.values()), path
    (tmp_path / "cm").mkdir()
    (tmp_path / "cm" / "sovllm.yaml").write_text(_gateway(objects)["ConfigMap"]["data"]["sovllm.yaml"])
    loaded, original = load_config(tmp_path / "cm"), load_config(GATEWAY)
    gw = loaded.gateway
    assert [(u.url, u.api_key_env, u.api_key_file) for u in gw.upstreams] == \
        [("http://acme-vllm.sovllm.svc:8000/v1", "SOVLLM_GATEWAY_UPSTREAM_KEY", None)]
    assert gw.aliases == original.gateway.aliases and gw.usage_database_env == "SOVLLM_USAGE_DATABASE"
    assert {t: (s.models, s.limits) for t, s in gw.tenants.items()} == \
        {t: (s.models, s.limits) for t, s in original.gateway.tenants.items()}
    sources = [s for spec in gw.tenants.values() for s in spec.keys] + gw.admin_keys
    assert sorted(s.model_dump(exclude_none=True).popitem()[1] for s in sources) == sorted([
        "/etc/sovllm/keys/admin.keys", "/etc/sovllm/keys/tenant.finance", "HR_GATEWAY_KEY",
        original.gateway.tenants["finance"].keys[1].sha256])
    assert "acme-vllm.sovllm.svc" in loaded.egress.allow and loaded.egress.proxy is None
    assert loaded.endpoints_outside_allow_list() == {}  # the guard in the pod lets the gateway reach its upstream


def test_the_gateway_with_sqlite_is_one_pod_with_a_volume(tmp_path):
    objects, files = render(tmp_path, *SQLITE, project=GATEWAY)
    gateway = _gateway(objects)
    deployment, claim = gateway["Deployment"], gateway["PersistentVolumeClaim"]
    assert "PodDisruptionBudget" not in gateway  # one replica: a budget of one would block node drains
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert "SQLite" in deployment["metadata"]["annotations"]["sovllm.io/replicas"]
    pod = deployment["spec"]["template"]["spec"]
    usage = next(v for v in pod["volumes"] if v["name"] == "usage")
    assert usage["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    [container] = pod["containers"]
    assert {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")} == {"/tmp", "/var/lib/sovllm"}
    config = yaml.safe_load(gateway["ConfigMap"]["data"]["sovllm.yaml"])
    assert config["project"]["output_dir"] == "/var/lib/sovllm" and "usage_database_env" not in config["gateway"]
    assert "SOVLLM_USAGE_DATABASE" not in {e["name"] for e in container["env"]}
    assert "gateway-volume.yaml" in yaml.safe_load(files["kustomization"].read_text())["resources"]


@pytest.mark.parametrize("settings,message", [
    (("gateway.usage_database_env=null", "gateway.usage_database=postgresql://gw:secret@db.postgres.svc/usage"),
     "password"),
    (("gateway.usage_database_env=null", "gateway.usage_database=sqlite:///usage.db"), "SQLite file"),
    (("gateway.aliases.assistant.routes={acme-v1: 1, acme-v3: 1}",), "acme-v3"),
    (("gateway.usage_database_env=HR_GATEWAY_KEY",), "HR_GATEWAY_KEY"),
    (("cluster.gateway.clients=[{}]",), "empty client would admit every pod"),
])
def test_a_gateway_that_cannot_work_on_the_cluster_is_refused(tmp_path, settings, message):
    with pytest.raises(ConfigError, match=message):
        render(tmp_path, *settings, project=GATEWAY)


def test_without_tenants_no_gateway_is_rendered(tmp_path):
    objects, files = render(tmp_path, "gateway.tenants={}", "gateway.aliases={}", project=GATEWAY)
    assert not any(o["metadata"]["name"].startswith("acme-gateway") for o in objects)
    assert not any(stem.startswith("gateway-") for stem in files)


def test_a_latest_vllm_image_is_refused():
    with pytest.raises(ConfigError, match="latest"):
        load_config(EXAMPLE, ("cluster.serving.vllm_image_tag=latest",))
    with pytest.raises(ConfigError, match="repository only"):
        load_config(EXAMPLE, ("cluster.serving.vllm_image=vllm/vllm-openai:latest",))


# --- NetworkPolicies, evaluated -------------------------------------------------------------------

NS = "sovllm"


def _pods(cfg) -> dict:
    return {
        "server": Pod("server", NS, k8s.server_labels(cfg), "10.0.1.10"),
        "gateway": Pod("gateway", NS, {"app.kubernetes.io/name": "sovllm-gateway"}, "10.0.1.11"),
        "pipeline": Pod("pipeline", NS, argo.labels(cfg), "10.0.1.12"),
        "debug": Pod("debug", NS, {"app": "debug"}, "10.0.1.13"),
        "prometheus": Pod("prometheus", "monitoring", {"app.kubernetes.io/name": "prometheus"}, "10.0.2.10"),
        "grafana": Pod("grafana", "monitoring", {"app": "grafana"}, "10.0.2.11"),
        "minio": Pod("minio", "minio", {"app": "minio"}, "10.0.3.10"),
        "mlflow": Pod("mlflow", "mlflow", {"app": "mlflow"}, "10.0.4.10"),
        "kube-dns": Pod("kube-dns", "kube-system", {"k8s-app": "kube-dns"}, "10.0.5.10"),
        # another team's pod with the gateway's labels: labels alone must not let it in
        "impostor": Pod("impostor", "team-b", {"app.kubernetes.io/name": "sovllm-gateway"}, "10.0.6.10"),
        "internet": Outside("internet", "203.0.113.7"),
        "kube-api": Outside("kube-api", "10.96.0.1"),
    }


PORTS = [(53, "UDP"), (53, "TCP"), (443, "TCP"), (5000, "TCP"), (8000, "TCP"), (9000, "TCP"), (9090, "TCP")]
DNS = [("kube-dns", 53, "UDP"), ("kube-dns", 53, "TCP")]
# every allowed flow that starts or ends in the serving namespace, and why
INTENDED = {
    *{("server", dst, port, proto) for dst, port, proto in [*DNS, ("minio", 9000, "TCP")]},  # models from the store
    *{(client, "server", 8000, "TCP") for client in ("gateway", "pipeline", "prometheus")},
    *{("gateway", dst, port, proto) for dst, port, proto in DNS},
    # the workflow pods' own policy (sovllm render argo): DNS, the LLM endpoint, MLflow, the store, the API
    *{("pipeline", dst, port, proto) for dst, port, proto in
      [*DNS, ("minio", 9000, "TCP"), ("mlflow", 5000, "TCP"), ("kube-api", 443, "TCP")]},
}


def _allowed_flows(policies: list[dict], pods: dict, ports) -> set:
    """Every allowed flow that starts or ends in the serving namespace."""
    for policy in policies:
        for rule in policy["spec"].get("egress", []) + policy["spec"].get("ingress", []):
            for peer in rule.get("to", []) + rule.get("from", []):
                assert peer.get("ipBlock", {}).get("cidr") != "0.0.0.0/0"
    got = set()
    for src_name, src in pods.items():
        for dst_name, dst in pods.items():
            if src_name == dst_name or NS not in (getattr(src, "namespace", None), getattr(dst, "namespace", None)):
                continue
            for port, proto in ports:
                if allowed(policies, src, dst, port, proto):
                    got.add((src_name, dst_name, port, proto))
    return got


def test_network_policies_allow_exactly_the_intended_flows(tmp_path):
    cfg = load_config(EXAMPLE, PINNED)
    got = _allowed_flows(k8s.network_policies(cfg) + [argo.network_policy(cfg)], _pods(cfg), PORTS)
    assert got - INTENDED == set(), f"flows allowed that should not be: {sorted(got - INTENDED)}"
    assert INTENDED - got == set(), f"intended flows blocked: {sorted(INTENDED - got)}"


GATEWAY_INTENDED = {
    *INTENDED,
    # tenants (namespaces labelled sovllm.io/gateway-client) and Prometheus call the gateway; it reaches the database
    *{(client, "gateway", 8080, "TCP") for client in ("tenant", "prometheus")},
    ("gateway", "postgres", 5432, "TCP"),
}


@pytest.mark.parametrize("settings,intended", [((), GATEWAY_INTENDED),
                                               (SQLITE, GATEWAY_INTENDED - {("gateway", "postgres", 5432, "TCP")})])
def test_the_gateway_stands_between_tenants_and_the_server(settings, intended):
    cfg = load_config(GATEWAY, (*PINNED, *settings))
    pods = {**_pods(cfg),
            "gateway": Pod("gateway", NS, k8s_gateway.labels(cfg), "10.0.1.11"),
            "tenant": Pod("tenant", "team-a", {"app": "reports"}, "10.0.7.10", {"sovllm.io/gateway-client": "true"}),
            "stranger": Pod("stranger", "team-c", {"app": "reports"}, "10.0.8.10"),
            "postgres": Pod("postgres", "postgres", {"app": "postgres"}, "10.0.9.10")}
    policies = k8s.network_policies(cfg) + [argo.network_policy(cfg)]
    got = _allowed_flows(policies, pods, [*PORTS, (8080, "TCP"), (5432, "TCP")])
    assert got - intended == set(), f"flows allowed that should not be: {sorted(got - intended)}"
    assert intended - got == set(), f"intended flows blocked: {sorted(intended - got)}"
    # the path is tenant → gateway → server; nothing else of the gateway's leaves the namespace
    assert allowed(policies, pods["tenant"], pods["gateway"], 8080)
    assert not allowed(policies, pods["tenant"], pods["server"], 8000)
    assert allowed(policies, pods["gateway"], pods["server"], 8000)
    for target, port in (("minio", 9000), ("mlflow", 5000), ("internet", 443), ("kube-api", 443)):
        assert not allowed(policies, pods["gateway"], pods[target], port), target
    assert not allowed(policies, pods["stranger"], pods["gateway"], 8080)
    assert not allowed(policies, pods["impostor"], pods["gateway"], 8080)


def test_gateway_clients_by_pod_labels_get_their_egress_to_the_gateway_only():
    cfg = load_config(GATEWAY, (*PINNED, "cluster.gateway.clients=[{pod_labels: {app: reports}}]"))
    policies = k8s.network_policies(cfg)
    gateway = Pod("gateway", NS, k8s_gateway.labels(cfg), "10.0.1.11")
    reports, other = Pod("reports", NS, {"app": "reports"}, "10.0.1.20"), Pod("reports", "team-a", {"app": "reports"})
    server, dns = _pods(cfg)["server"], _pods(cfg)["kube-dns"]
    assert allowed(policies, reports, gateway, 8080) and allowed(policies, reports, dns, 53, "UDP")
    assert not allowed(policies, reports, server, 8000) and not allowed(policies, reports, gateway, 8000)
    assert not allowed(policies, other, gateway, 8080)  # pod labels alone: this namespace only


def test_the_flow_evaluator_follows_kubernetes_semantics():
    """The evaluator itself: no policy allows everything; a podSelector alone means the own namespace;
    a namespaceSelector with a podSelector needs both; ports and protocols count."""
    a, b = Pod("a", "x", {"app": "a"}), Pod("b", "y", {"app": "b"})
    assert allowed([], a, b, 80)
    deny = {"metadata": {"namespace": "y"}, "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}
    assert not allowed([deny], a, b, 80) and allowed([deny], b, a, 80)
    own_ns = {"metadata": {"namespace": "y"}, "spec": {"podSelector": {"matchLabels": {"app": "b"}},
                                                       "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "a"}}}]}]}}
    assert not allowed([own_ns], a, b, 80)  # a is in x, the selector means y
    both = {"metadata": {"namespace": "y"}, "spec": {"podSelector": {}, "ingress": [{"from": [{
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "x"}},
        "podSelector": {"matchLabels": {"app": "a"}}}], "ports": [{"port": 80, "protocol": "TCP"}]}]}}
    assert allowed([both], a, b, 80) and not allowed([both], a, b, 81) and not allowed([both], a, b, 80, "UDP")
    assert not allowed([both], Pod("c", "x", {"app": "c"}), b, 80)
    block = {"metadata": {"namespace": "x"}, "spec": {"podSelector": {}, "policyTypes": ["Egress"],
                                                      "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8",
                                                                                      "except": ["10.9.0.0/16"]}}]}]}}
    assert allowed([block], a, Outside("n", "10.1.2.3"), 443) and not allowed([block], a, Outside("n", "10.9.0.1"), 443)
    assert not allowed([block], a, Outside("internet", "203.0.113.7"), 443)
