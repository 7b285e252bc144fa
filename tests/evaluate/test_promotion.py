"""--promote against a real local MLflow registry: the alias moves only when the paired test says better."""

from __future__ import annotations

import json

import pytest

from sovllm.config import load_config
from sovllm.evaluate import stage
from sovllm.train.tracking import Tracker, default_uri
from tests.evaluate.conftest import eval_project, load_answers, script

# Whole eval stages against a real MLflow registry: tens of seconds each.
pytestmark = pytest.mark.integration


def register(root, version_alias: str) -> str:
    """Log a (dummy) adapter folder in a new run and register it with `version_alias`."""
    out = root / "out"
    adapter = out / "stash" / "adapter"
    adapter.mkdir(parents=True, exist_ok=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "alias": version_alias}))
    (adapter / "adapter_model.safetensors").write_bytes(version_alias.encode())
    tracker = Tracker(default_uri(out / "mlflow"), "t", out / "mlflow")
    tracker.start(version_alias)
    tracker.artifacts(adapter, "adapter")
    version = tracker.register("t-adapter", "adapter", alias=version_alias)
    tracker.end()
    return version


def candidate_manifest(root, version: str) -> None:
    train = root / "out" / "train"
    train.mkdir(parents=True, exist_ok=True)
    (train / "manifest.json").write_text(json.dumps({"extra": {"mlflow": {"version": version}}}))


@pytest.fixture
def promo(tmp_path, fake, request):
    quality = request.param  # how the champion answers: "good" (like the candidate) or "bad"

    def answers(body, n):
        if not body.get("response_format") and body["model"] == "champion" and quality == "bad":
            return 200, "Something unrelated."
        if not body.get("response_format") and body["model"] == "champion":
            body = {**body, "model": "tuned"}
        return script({**body, "model": "tuned" if body["model"] == "t" else body["model"]}, n)

    endpoint = fake(answers)
    root = eval_project(tmp_path / "p", endpoint.port, "  contexts: [gold]\n")
    (root / "sovllm.yaml").write_text((root / "sovllm.yaml").read_text().replace("models: [fake-model, tuned]",
                                                                                   "models: [fake-model, t]"))
    load_answers(root)
    return root, endpoint


def alias_version(root, alias):
    from mlflow import MlflowClient

    return str(MlflowClient(default_uri(root / "out" / "mlflow")).get_model_version_by_alias("t-adapter", alias).version)


@pytest.mark.parametrize("promo", ["bad"], indirect=True)
def test_candidate_better_than_champion_takes_the_alias(promo):
    root, endpoint = promo
    assert register(root, "champion") == "1"
    candidate_manifest(root, register(root, "candidate"))
    cfg = load_config(root, ("eval.judge.enabled=false",))
    stage.run(root, cfg, promote=True, log=lambda _: None)
    summary = json.loads((root / "out" / "eval" / "summary.json").read_text())
    decision = summary["promotion"]
    assert decision["promoted"] is True and decision["versus"] == "champion" and decision["f1"]["verdict"] == "better"
    assert alias_version(root, "champion") == "2"
    # the champion was served from the downloaded artifact, under its own name
    assert any(b["model"] == "champion" for b in endpoint.requests)
    assert (root / "out" / "eval" / "champion" / "v1" / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("promo", ["good"], indirect=True)
def test_candidate_not_better_keeps_the_champion_and_says_why(promo):
    root, _ = promo
    register(root, "champion")
    candidate_manifest(root, register(root, "candidate"))
    cfg = load_config(root, ("eval.judge.enabled=false",))
    stage.run(root, cfg, promote=True, log=lambda _: None)
    decision = json.loads((root / "out" / "eval" / "summary.json").read_text())["promotion"]
    assert decision["promoted"] is False and "does not lie above 0" in decision["reason"]
    assert alias_version(root, "champion") == "1"


@pytest.mark.parametrize("promo", ["good"], indirect=True)
def test_without_champion_the_candidate_must_beat_the_base(promo):
    root, _ = promo
    candidate_manifest(root, register(root, "candidate"))
    stage.run(root, load_config(root, ("eval.judge.enabled=false",)), promote=True, log=lambda _: None)
    decision = json.loads((root / "out" / "eval" / "summary.json").read_text())["promotion"]
    assert decision["versus"] == "base" and decision["promoted"] is True
    assert alias_version(root, "champion") == "1"


@pytest.mark.parametrize("promo", ["bad"], indirect=True)
def test_challenger_gate_starts_a_small_split_and_the_ab_decision_settles_the_aliases(promo):
    from sovllm.evaluate.promotion import settle_challenger
    from sovllm.gateway.report import current_routes
    from sovllm.gateway.usage import database_url, latest_splits, open_engine
    from sovllm.models.adapter import adapter_name

    root, _ = promo
    register(root, "champion")
    candidate_manifest(root, register(root, "candidate"))
    cfg = load_config(root, ("eval.judge.enabled=false", "eval.gate=challenger", "eval.gateway_alias=support",
                             "eval.challenger_weight=0.2", "gateway.aliases={support: {routes: {stable: 1.0}}}"))
    stage.run(root, cfg, promote=True, log=lambda _: None)
    decision = json.loads((root / "out" / "eval" / "summary.json").read_text())["promotion"]
    served = f"{adapter_name(cfg)}-v2"
    assert decision["promoted"] is True and decision["alias"] == "challenger"
    assert decision["split"]["routes"] == {"stable": 0.8, served: 0.2}
    assert alias_version(root, "challenger") == "2" and alias_version(root, "champion") == "1"  # not yet
    engine = open_engine(database_url(None, root / "out"))
    assert current_routes(engine, cfg, "support") == {"stable": 0.8, served: 0.2}
    assert latest_splits(engine, with_adapters=True)[1] == {served: str(root / "out" / "train" / "adapter")}
    # the A/B test found the challenger better: it becomes champion and loses the challenger alias
    message = settle_challenger(root, cfg, "t-adapter", True, lambda _: None)
    assert "v2 is now 'champion'" in message
    assert alias_version(root, "champion") == "2"
    with pytest.raises(Exception):
        alias_version(root, "challenger")


@pytest.mark.parametrize("promo", ["good"], indirect=True)
def test_an_unregistered_adapter_fails_promote_except_under_quick(promo):
    """A full run's adapter without a registered version cannot be promoted; a --quick run (whose
    training reports a failed stop check instead of failing) says so and evaluates without the gate."""
    from sovllm.errors import ConfigError

    root, _ = promo
    candidate_manifest(root, None)
    cfg = load_config(root, ("eval.judge.enabled=false",))
    with pytest.raises(ConfigError, match="no registered version"):
        stage.run(root, cfg, promote=True, log=lambda _: None)
    said: list[str] = []
    stage.run(root, cfg, promote=True, quick=True, log=said.append)
    assert any("nothing to promote" in line for line in said)
    assert "promotion" not in json.loads((root / "out" / "eval" / "summary.json").read_text())
