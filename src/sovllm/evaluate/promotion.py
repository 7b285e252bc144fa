"""MLflow side of evaluation: log results to the adapter's run, and the `champion` alias.

The adapter's training run (named in `out/train/adapter/manifest.json`) receives the evaluation's
metrics (`test/<context>/<model>/<metric>`) and files (`evaluation/`), so one MLflow run holds the
training curve and the test result. Promotion: the registered model's `champion` version is
downloaded and evaluated on the current eval split next to the candidate (the version this
project's training registered with the alias `candidate`); the alias moves to the candidate only
when its token F1 on gold context is better by the paired bootstrap. Without a champion the
candidate is compared with the base model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sovllm.config import Config
from sovllm.errors import ConfigError
from sovllm.layout import folder
from sovllm.models.adapter import adapter_name
from sovllm.train.tracking import Tracker, default_uri, relocate_project_store


@dataclass
class Champion:
    version: str
    run_id: str
    path: Path | None


def _registry(root: Path, cfg: Config, log: Callable[[str], None] | None = None):
    """The project's tracking store, as the config names it now. The project's own store, copied or
    moved with the project, is first pointed at the project's artifacts folder."""
    store = folder(root, cfg, "mlflow")
    uri = cfg.train.tracking.uri or default_uri(store)
    name = cfg.train.tracking.registered_model or f"{cfg.project.name}-adapter"
    if uri == default_uri(store):
        relocate_project_store(store, log)
    return store, uri, name


def _client(uri: str):
    import logging

    import mlflow
    from mlflow import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def candidate(root: Path, cfg: Config) -> dict:
    """The registered version this project's last training produced ({} when none)."""
    manifest = folder(root, cfg, "adapter") / "manifest.json"
    if not manifest.is_file():
        return {}
    return (json.loads(manifest.read_text()).get("extra") or {}).get("mlflow") or {}


def fetch_champion(root: Path, cfg: Config, log: Callable[[str], None]) -> Champion | None:
    """The current champion's adapter, downloaded into out/eval/champion/v<N> (None: no champion yet)."""
    _, uri, name = _registry(root, cfg, log)
    if not candidate(root, cfg).get("version"):
        raise ConfigError("--promote: this project's adapter has no registered version",
                          hint="train until the stop check passes ('sovllm train'); only registered adapters "
                               "can be promoted")
    client = _client(uri)
    try:
        version = client.get_model_version_by_alias(name, "champion")
    except Exception:  # noqa: BLE001 - no such model or alias: the candidate competes with the base model
        log(f"promote: {name} has no champion yet; the candidate is compared with the base model")
        return None
    if str(version.version) == str(candidate(root, cfg).get("version")):
        log(f"promote: {name} v{version.version} is the candidate and already the champion")
        return Champion(str(version.version), version.run_id, None)
    target = folder(root, cfg, "report") / "champion" / f"v{version.version}"
    if not (target / "adapter" / "adapter_config.json").is_file():
        import os

        import mlflow

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # sovllm prints its own lines
        target.mkdir(parents=True, exist_ok=True)
        mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(target), tracking_uri=uri)
    log(f"promote: champion is {name} v{version.version}")
    return Champion(str(version.version), version.run_id, target / "adapter")


def decide(root: Path, cfg: Config, summary: dict, champion: Champion | None, rows: list[dict],
           log: Callable[[str], None]) -> dict:
    """Move the champion alias to the candidate when it is better by the paired test; say why (not)."""
    from sovllm.evaluate.summary import compare

    _, uri, name = _registry(root, cfg)
    cand = candidate(root, cfg)
    label = adapter_name(cfg)
    versus = "champion" if champion and champion.path else summary["reference_model"]
    if champion is not None and champion.path is None:
        return {"promoted": False, "version": cand["version"], "reason": "the candidate already is the champion"}
    pick = lambda m: [r for r in rows if r["model"] == m and r["context"] == "gold"]  # noqa: E731
    comparison = compare(pick(versus), pick(label), resamples=cfg.eval.resamples, seed=cfg.eval.seed)["f1"]
    decision = {"candidate_version": cand.get("version"), "versus": versus,
                "champion_version": champion.version if champion else None, "f1": comparison,
                "promoted": comparison["verdict"] == "better"}
    if decision["promoted"]:
        alias = decision["alias"] = cfg.eval.gate  # "champion", or "challenger" (live A/B first)
        _client(uri).set_registered_model_alias(name, alias, str(cand["version"]))
        decision["reason"] = (f"token F1 {comparison['mean_b']:.3f} vs {comparison['mean_a']:.3f} ({versus}), "
                              f"difference {comparison['diff']:+.3f} with 95% interval [{comparison['low']:+.3f}, "
                              f"{comparison['high']:+.3f}] above 0")
        log(f"promote: {name} v{cand['version']} is now '{alias}' ({decision['reason']})")
        if alias == "challenger" and cfg.eval.gateway_alias:
            decision["split"] = start_split(root, cfg, str(cand["version"]), log)
    else:
        decision["reason"] = (f"not promoted: token F1 difference {comparison['diff']:+.3f} vs {versus}, 95% "
                              f"interval [{comparison['low']:+.3f}, {comparison['high']:+.3f}] does not lie above 0")
        log(f"promote: {decision['reason']}")
    return decision


def log_to_mlflow(root: Path, cfg: Config, eval_dir: Path, summary: dict, log: Callable[[str], None]) -> dict | None:
    """Log metrics and files to the adapter's MLflow run; None when there is no run (or no mlflow)."""
    manifest = folder(root, cfg, "adapter") / "adapter" / "manifest.json"
    if not manifest.is_file():
        return None
    info = json.loads(manifest.read_text())
    run_id = info.get("mlflow_run_id")
    if not run_id:
        return None
    # the store the config names now, not the absolute URI recorded at training time: a copied or
    # moved project must not write into the original project's store
    store, uri, _ = _registry(root, cfg, log)
    tracker = Tracker(uri, cfg.train.tracking.experiment or cfg.project.name, store)
    tracker.start("eval", run_id=run_id)
    try:
        metrics = {}
        for mode in summary["modes"]:
            for model, row in summary["table"][mode].items():
                for key in ("f1", "rouge_l", "refusal_accuracy", "refusal_accuracy_on_topic",
                            "refusal_accuracy_foreign", "false_refusal_rate", "stop_rate", "hit_at_k",
                            "answer_tokens_mean", "broken_items"):
                    if row.get(key) is not None:
                        metrics[f"test/{mode}/{model}/{key}"] = row[key]
        tracker.metrics(metrics)
        for name in ("predictions.jsonl", "summary.json", "report.html"):
            tracker.artifacts(eval_dir / name, "evaluation")
    finally:
        tracker.end()
    log(f"eval results logged to MLflow run {run_id}")
    return {"run_id": run_id, "tracking_uri": tracker.uri}


def start_split(root: Path, cfg: Config, version: str, log: Callable[[str], None]) -> dict:
    """The challenger joins the gateway alias's split with `eval.challenger_weight` of its traffic.

    It is routed as `<adapter>-v<version>`, loaded at run time from this project's adapter folder (the
    path must be one the gateway's upstreams can read: a shared volume, or the embedded server's disk)."""
    from sovllm.gateway.report import start_challenger
    from sovllm.gateway.usage import database_url, open_engine

    alias = cfg.eval.gateway_alias
    if alias not in cfg.gateway.aliases:
        raise ConfigError(f"eval.gateway_alias: '{alias}' is not in gateway.aliases",
                          hint="name an alias of this project's gateway, or leave eval.gateway_alias empty")
    engine = open_engine(database_url(cfg.gateway.usage_database, Path(root) / cfg.project.output_dir,
                                      cfg.gateway.usage_database_env))
    served = f"{adapter_name(cfg)}-v{version}"
    split = start_challenger(cfg, engine, alias, served, str(folder(root, cfg, "adapter") / "adapter"),
                             cfg.eval.challenger_weight, f"eval gate: v{version} is the challenger")
    log(f"promote: gateway alias {alias} now routes {split['routes']} (sovllm ab report {alias} decides the rest)")
    return split


def settle_challenger(root: Path, cfg: Config, registered_model: str, promote: bool,
                      log: Callable[[str], None]) -> str:
    """After an A/B decision: the challenger version becomes champion (promote) or loses its alias (rollback)."""
    _, uri, _ = _registry(root, cfg, log)
    client = _client(uri)
    try:
        version = client.get_model_version_by_alias(registered_model, "challenger")
    except Exception:  # noqa: BLE001 - MLflow raises its own error types for a missing alias
        return f"MLflow: {registered_model} has no 'challenger' version; aliases unchanged"
    if promote:
        client.set_registered_model_alias(registered_model, "champion", str(version.version))
    client.delete_registered_model_alias(registered_model, "challenger")
    what = "is now 'champion'" if promote else "is no longer 'challenger' (rolled back)"
    return f"MLflow: {registered_model} v{version.version} {what}"
