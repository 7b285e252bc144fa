"""`sovllm render k8s`: serving objects validated strictly (core kinds with kubernetes-validate, the
custom resources with independently published schemas), compared with golden files, checked for
what a bank's platform team requires, and their NetworkPolicies evaluated over enumerated flows."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

from sovllm.config import load_config
from sovllm.deploy import k8s
from sovllm.errors import ConfigError
from sovllm.pipeline import argo
from tests.k8s_schema import strict_core, unknown_fields, validate
from tests.netpol import Outside, Pod, allowed

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "acme"
GOLDEN = Path(__file__).parent / "golden"
PINNED = ("cluster.image_tag=v0.1.0",)  # golden files must not change with the package version
CORE = {"Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy", "ConfigMap"}


def render(tmp_path: Path, *settings: str) -> tuple[list[dict], dict[str, Path]]:
    files = k8s.render(load_config(EXAMPLE, (*PINNED, *settings)), tmp_path)
    objects = [doc for stem, path in files.items() if stem not in ("kustomization", "rules") and not stem.startswith("grafana/")
               for doc in yaml.safe_load_all(path.read_text(encoding="utf-8"))]
    return objects, files


ENGINES = [("vllm", ()), ("sovllm", ("cluster.serving.engine=sovllm",))]


@pytest.mark.parametrize("engine,settings", ENGINES)
def test_every_object_validates(tmp_path, engine, settings):
    objects, _ = render(tmp_path, *settings)
    kinds = sorted({o["kind"] for o in objects})
    assert kinds == ["ConfigMap", "Deployment", "NetworkPolicy", "PodDisruptionBudget", "PrometheusRule", "ScaledObject", "Service",
                     "ServiceMonitor"]
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


@pytest.mark.parametrize("engine,settings", ENGINES)
def test_rendered_files_match_the_golden_files(tmp_path, engine, settings):
    _, files = render(tmp_path, *settings)
    for stem, path in files.items():
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


def test_network_policies_allow_exactly_the_intended_flows(tmp_path):
    cfg = load_config(EXAMPLE, PINNED)
    policies = k8s.network_policies(cfg) + [argo.network_policy(cfg)]
    for policy in policies:
        for rule in policy["spec"].get("egress", []) + policy["spec"].get("ingress", []):
            for peer in rule.get("to", []) + rule.get("from", []):
                assert peer.get("ipBlock", {}).get("cidr") != "0.0.0.0/0"
    pods = _pods(cfg)
    got = set()
    for src_name, src in pods.items():
        for dst_name, dst in pods.items():
            if src_name == dst_name or NS not in (getattr(src, "namespace", None), getattr(dst, "namespace", None)):
                continue
            for port, proto in PORTS:
                if allowed(policies, src, dst, port, proto):
                    got.add((src_name, dst_name, port, proto))
    assert got - INTENDED == set(), f"flows allowed that should not be: {sorted(got - INTENDED)}"
    assert INTENDED - got == set(), f"intended flows blocked: {sorted(INTENDED - got)}"


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
