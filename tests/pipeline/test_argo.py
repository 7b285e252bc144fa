"""`sovllm render argo`: the stage graph as Argo objects built with hera, validated against schemas
published independently of hera, compared with golden files, and checked for what a cluster needs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from sovllm.config import load_config
from sovllm.errors import ConfigError
from sovllm.pipeline import argo
from sovllm.pipeline.graph import Stage, order, stages
from tests.k8s_schema import strict_core, unknown_fields, validate

GOLDEN = Path(__file__).parent / "golden" / "argo"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "klinik"
PINNED = ("cluster.image_tag=v0.1.0",)  # golden files must not change with the package version


def _render(tmp_path, *settings, schedule="0 3 * * *", shards=None, quick=False):
    cfg = load_config(EXAMPLE, (*PINNED, *settings))
    files = argo.render(cfg, (EXAMPLE / "sovllm.yaml").read_text(encoding="utf-8"), tmp_path, schedule=schedule,
                        shards=shards, quick=quick)
    return {kind: yaml.safe_load(path.read_text(encoding="utf-8")) for kind, path in files.items()}, files


def test_the_graph_orders_the_stages_and_fans_synth_out():
    cfg = load_config(EXAMPLE)
    graph = stages(cfg, 3)
    assert order(graph) == ["ingest", "synth-1", "synth-2", "synth-3", "synth-merge", "curate", "train", "eval"]
    by_name = {s.name: s for s in graph}
    assert by_name["synth-2"].argv("/p") == ["sovllm", "synth", "/p", "--shard", "2/3"]
    assert by_name["synth-merge"].argv("/p") == ["sovllm", "synth", "merge", "/p", "--shards", "3"]
    assert by_name["train"].needs_gpu and not by_name["ingest"].needs_endpoint and by_name["curate"].needs_endpoint
    assert [s.name for s in stages(cfg, 1)][:3] == ["ingest", "synth", "curate"]
    assert not {s.name: s for s in stages(load_config(EXAMPLE, ("train.device=cpu",)))}["train"].needs_gpu
    with pytest.raises(ConfigError, match="cycle"):
        order([Stage("a", (), (), (), after=("b",)), Stage("b", (), (), (), after=("a",))])


def test_eval_runs_the_gate_in_full_runs_and_under_quick_only_when_asked():
    cfg = load_config(EXAMPLE)
    evaluation = lambda **kw: {s.name: s for s in stages(cfg, 1, **kw)}["eval"].argv("/p")  # noqa: E731
    assert evaluation() == ["sovllm", "eval", "/p", "--promote"]
    assert evaluation(quick=True) == ["sovllm", "eval", "/p", "--quick"]
    assert evaluation(quick=True, promote=True) == ["sovllm", "eval", "/p", "--promote", "--quick"]
    assert evaluation(promote=False) == ["sovllm", "eval", "/p"]


def test_rendered_objects_validate_against_independently_published_schemas(tmp_path):
    objects, _ = _render(tmp_path)
    results = validate(list(objects.values()))
    assert sorted(r["kind"] for r in results) == ["CronWorkflow", "NetworkPolicy", "Workflow", "WorkflowTemplate"]
    assert all(r["valid"] for r in results), results
    assert unknown_fields(list(objects.values())) == []  # no field Argo's published types lack, at any depth
    assert strict_core(objects["NetworkPolicy"]) is None


def test_the_schema_check_can_fail(tmp_path):
    """The validator is not hera's own models: an Argo 3 CronWorkflow (`schedule`) and a container
    without a name fail it."""
    objects, _ = _render(tmp_path)
    cron = objects["CronWorkflow"]
    cron["spec"]["schedule"] = cron["spec"].pop("schedules")[0]
    template = objects["WorkflowTemplate"]
    del template["spec"]["templates"][0]["container"]["name"]
    results = {r["kind"]: r for r in validate([cron, template])}
    assert "schedules" in results["CronWorkflow"]["error"] and not results["CronWorkflow"]["valid"]
    assert "name" in results["WorkflowTemplate"]["error"] and not results["WorkflowTemplate"]["valid"]


def test_rendered_files_match_the_golden_files(tmp_path):
    """Any change to the rendered objects must be deliberate: SOVLLM_UPDATE_GOLDEN=1 rewrites them."""
    _, files = _render(tmp_path)
    for kind, path in files.items():
        golden = GOLDEN / path.name
        if os.environ.get("SOVLLM_UPDATE_GOLDEN") == "1":
            golden.parent.mkdir(parents=True, exist_ok=True)
            golden.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
        assert golden.is_file(), f"no golden file {golden}; render with SOVLLM_UPDATE_GOLDEN=1 and review it"
        assert path.read_text(encoding="utf-8") == golden.read_text(encoding="utf-8"), \
            f"{kind} differs from {golden}; if the change is intended, rerun with SOVLLM_UPDATE_GOLDEN=1 and review the diff"


def test_what_the_cluster_needs_is_in_the_objects(tmp_path):
    objects, _ = _render(tmp_path, shards=2)
    spec = objects["WorkflowTemplate"]["spec"]
    templates = {t["name"]: t for t in spec["templates"]}
    dag = {t["name"]: t.get("depends", "") for t in templates["pipeline"]["dag"]["tasks"]}
    assert dag == {"ingest": "", "synth-1": "ingest", "synth-2": "ingest", "synth-merge": "synth-1 && synth-2",
                   "curate": "synth-merge", "train": "curate", "eval": "train"}
    for name, template in templates.items():
        if name == "pipeline":
            continue
        container = template["container"]
        assert container["image"] == "registry.internal/sovllm:v0.1.0" and not container["image"].endswith(":latest")
        assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
        retry = template["retryStrategy"]
        assert int(retry["limit"]) == 2 and retry["backoff"]["duration"] == "30s" and retry["backoff"]["factor"] == 2
        args = container["args"]
        named = {args[i + 1] for i, a in enumerate(args) if a == "--set"}
        for artifact in template["inputs"]["artifacts"] + template["outputs"]["artifacts"]:
            if artifact["name"] in ("config", "judge-gold"):  # the project folder's own files
                assert artifact["path"].startswith("/work/project/")
                continue
            # every other folder is an artifact's, and the command names it: no project layout assumed
            location = artifact["path"].removeprefix("/work/artifacts/").split("/")[0]
            key = "project.documents" if location == "documents" else f"project.locations.{location}"
            assert f"{key}=/work/artifacts/{location}" in named, (name, artifact["name"], args)
    train = templates["train"]
    assert train["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert train["tolerations"] == [{"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}]
    assert train["container"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "nodeSelector" not in templates["curate"]
    assert templates["synth-2"]["container"]["args"] == [
        "synth", "/work/project", "--shard", "2/2", "--set", "project.locations.chunks=/work/artifacts/chunks",
        "--set", "project.locations.shards=/work/artifacts/shards"]
    assert templates["synth-2"]["outputs"]["artifacts"][0]["path"] == "/work/artifacts/shards/2-of-2"
    assert [a["name"] for a in templates["eval"]["inputs"]["artifacts"]][-1] == "judge-gold"
    params = {p["name"]: p for p in spec["arguments"]["parameters"]}
    assert set(params) == {"documents", "config", "prefix"}
    assert params["config"]["value"] == (EXAMPLE / "sovllm.yaml").read_text(encoding="utf-8")
    assert spec["podMetadata"]["labels"]["sovllm.io/component"] == "pipeline"
    cron = objects["CronWorkflow"]["spec"]
    assert cron["schedules"] == ["0 3 * * *"] and cron["concurrencyPolicy"] == "Forbid"
    assert cron["workflowSpec"]["workflowTemplateRef"]["name"] == "klinik-pipeline"
    assert objects["Workflow"]["spec"]["workflowTemplateRef"]["name"] == "klinik-pipeline"
    policy = objects["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"]["sovllm.io/component"] == "pipeline" and policy["ingress"] == []
    ports = sorted(p["port"] for rule in policy["egress"] for p in rule["ports"])
    assert ports == [53, 53, 443, 5000, 8000, 9000]  # DNS, the Kubernetes API, MLflow, the LLM endpoint, the store
    pushing = argo.network_policy(load_config(EXAMPLE, (*PINNED, "monitoring.pushgateway=http://pushgateway.monitoring:9091")))
    assert sorted(p["port"] for rule in pushing["spec"]["egress"] for p in rule["ports"]) == [53, 53, 443, 5000, 8000, 9000, 9091]


def test_a_latest_or_unpinned_image_is_refused():
    for setting in ("cluster.image_tag=latest", "cluster.image=registry.internal/sovllm:latest"):
        with pytest.raises(ConfigError, match="image"):
            load_config(EXAMPLE, (setting,))
