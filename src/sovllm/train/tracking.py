"""MLflow tracking for training runs: a local store by default, any tracking URI by config.

The default store lives in the project (`out/mlflow/mlflow.db`, artifacts in `out/mlflow/artifacts`)
so `mlflow ui --backend-store-uri sqlite:///…` works offline. sovllm logs itself (the Trainer's own
MLflow integration is switched off with `report_to="none"`, so nothing is logged twice): params,
`train/*` and `eval/*` metrics per optimizer step, loss tokens/s, system metrics, the adapter and
the data manifest as artifacts, and a registered model version with the alias `candidate`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable


def default_uri(store: Path) -> str:
    """The project's own store in the folder `store` (`project.locations.mlflow`, default out/mlflow)."""
    return f"sqlite:///{(store / 'mlflow.db').resolve()}"


# where MLflow keeps absolute artifact locations (tables of MLflow 2 and 3; missing ones are skipped)
_LOCATION_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"), ("model_versions", "source"),
                     ("model_versions", "storage_location"), ("logged_models", "artifact_location"))


def relocate_project_store(store: Path, log: Callable[[str], None] | None = None) -> list[str]:
    """Point a copied or moved project's own MLflow store at its own artifacts folder.

    The default store (`out/mlflow/mlflow.db`) records absolute artifact locations: after `cp -r`
    or `mv` of the project, new runs, eval results and model downloads would still use the old
    folder — outside the project, or gone. Every location under an old `…/mlflow/artifacts` root is
    rewritten to this project's root (the artifacts were copied along with the database). Returns
    the old roots that were rewritten; touches nothing else, and nothing when the store is absent.
    """
    import sqlite3

    db = store / "mlflow.db"
    if not db.is_file():
        return []
    new_root = (store / "artifacts").resolve().as_uri()
    with sqlite3.connect(db) as con:
        tables = {t for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "experiments" not in tables:
            return []
        old_roots = sorted({loc for (loc,) in con.execute("SELECT artifact_location FROM experiments")
                            if loc and loc.startswith("file://") and loc.rstrip("/").endswith("/artifacts")
                            and loc.rstrip("/") != new_root})
        for old in old_roots:
            old = old.rstrip("/")
            for table, column in _LOCATION_COLUMNS:
                if table not in tables or column not in {c[1] for c in con.execute(f"PRAGMA table_info({table})")}:
                    continue
                con.execute(f"UPDATE {table} SET {column} = ? || substr({column}, ?) "  # noqa: S608 - fixed names
                            f"WHERE {column} = ? OR substr({column}, 1, ?) = ?",
                            (new_root, len(old) + 1, old, len(old) + 1, old + "/"))
            if log:
                log(f"MLflow store {db}: artifact locations under {old} (the project was copied or moved) now "
                    f"point into this project")
    return old_roots


def ui_command(uri: str, store: Path) -> str:
    artifacts = (store / "artifacts").resolve()
    if uri.startswith("sqlite:"):
        return f"mlflow ui --backend-store-uri {uri} --default-artifact-root {artifacts.as_uri()} --host 127.0.0.1"
    return f"open {uri} in a browser"


class Tracker:
    """One MLflow run (new, or resumed by id after an interruption)."""

    def __init__(self, uri: str, experiment: str, store: Path, log: Callable[[str], None] | None = None):
        import logging

        import mlflow

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # mlflow sets INFO on import; keep the CLI quiet
        if "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL" not in os.environ:
            mlflow.set_system_metrics_sampling_interval(2)  # CPU runs are minutes long: sample more often than 10 s
            mlflow.set_system_metrics_samples_before_logging(1)

        self.mlflow = mlflow
        self.uri = uri
        # the project's own store, copied or moved with the project: keep its artifacts in the project
        self.relocated = relocate_project_store(store, log) if uri == default_uri(store) else []
        mlflow.set_tracking_uri(uri)
        found = mlflow.get_experiment_by_name(experiment)
        if found is not None:
            self.experiment_id = found.experiment_id
        else:
            location = (store / "artifacts").resolve().as_uri() if uri.startswith("sqlite:") else None
            self.experiment_id = mlflow.create_experiment(experiment, artifact_location=location)
        self.run_id: str | None = None

    def start(self, run_name: str, run_id: str | None = None) -> str:
        mlflow = self.mlflow
        if run_id is not None:
            try:
                mlflow.get_run(run_id)
            except Exception:  # noqa: BLE001 - the old run is gone (store reset): start a new one
                run_id = None
        run = mlflow.start_run(run_id=run_id, experiment_id=None if run_id else self.experiment_id,
                               run_name=None if run_id else run_name, log_system_metrics=True)
        self.run_id = run.info.run_id
        return self.run_id

    def params(self, params: dict) -> None:
        existing = self.mlflow.get_run(self.run_id).data.params
        fresh = {k: str(v)[:6000] for k, v in params.items() if k not in existing}
        if fresh:
            self.mlflow.log_params(fresh)

    def metrics(self, metrics: dict, step: int | None = None) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        if clean:
            self.mlflow.log_metrics(clean, step=step, timestamp=int(time.time() * 1000))

    def artifacts(self, path: Path, artifact_path: str) -> None:
        if path.is_dir():
            self.mlflow.log_artifacts(str(path), artifact_path=artifact_path)
        else:
            self.mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def register(self, name: str, artifact_path: str, alias: str = "candidate") -> str:
        """Register the run's `artifact_path` as a new version of `name` and point `alias` at it."""
        from mlflow import MlflowClient

        client = MlflowClient()
        try:
            client.get_registered_model(name)
        except Exception:  # noqa: BLE001 - not registered yet
            client.create_registered_model(name, description="LoRA adapters trained by sovllm")
        run = client.get_run(self.run_id)
        version = client.create_model_version(name, source=f"{run.info.artifact_uri}/{artifact_path}",
                                              run_id=self.run_id)
        client.set_registered_model_alias(name, alias, version.version)
        return str(version.version)

    def end(self, status: str = "FINISHED") -> None:
        self.mlflow.end_run(status=status)


def trainer_callback(tracker: Tracker, counters: dict):
    """A TrainerCallback that logs the Trainer's logs as train/* and eval/* metrics, plus loss tokens/s."""
    from transformers import TrainerCallback

    names = {"loss": "train/loss", "learning_rate": "train/learning_rate", "grad_norm": "train/grad_norm",
             "eval_loss": "eval/loss", "epoch": "train/epoch"}

    class MlflowLog(TrainerCallback):
        def __init__(self):
            self.last = (time.perf_counter(), 0)

        def on_log(self, args, state, control, logs=None, **kwargs):
            metrics = {names[k]: v for k, v in (logs or {}).items() if k in names}
            if "train/loss" in metrics:
                now, tokens = time.perf_counter(), counters["loss_tokens"]
                then, before = self.last
                if now > then and tokens > before:
                    metrics["train/loss_tokens_per_s"] = (tokens - before) / (now - then)
                self.last = (now, tokens)
            tracker.metrics(metrics, step=state.global_step)

    return MlflowLog()
