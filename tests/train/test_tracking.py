"""A project's own MLflow store keeps working after the project is copied or moved (real MLflow)."""

from __future__ import annotations

import shutil


def test_a_copied_project_store_points_its_artifacts_into_the_copy(tmp_path):
    import mlflow
    from mlflow import MlflowClient

    from sovllm.train.tracking import Tracker, default_uri

    original, copy = tmp_path / "a" / "out" / "mlflow", tmp_path / "b" / "out" / "mlflow"
    (original / "stash").mkdir(parents=True)
    (original / "stash" / "adapter_config.json").write_text('{"r": 8}')
    tracker = Tracker(default_uri(original), "acme", original)
    assert tracker.relocated == []  # a fresh store has nothing to move
    run_id = tracker.start("train")
    tracker.artifacts(original / "stash", "adapter")
    version = tracker.register("acme-adapter", "adapter")
    tracker.end()

    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "a")  # moved: the old folder is gone
    said = []
    moved = Tracker(default_uri(copy), "acme", copy, log=said.append)
    assert moved.relocated == [(original / "artifacts").resolve().as_uri()]
    assert len(said) == 1 and "copied or moved" in said[0]

    new_root = (copy / "artifacts").resolve().as_uri()
    client = MlflowClient(tracking_uri=default_uri(copy))
    assert client.get_experiment(moved.experiment_id).artifact_location == new_root
    assert client.get_run(run_id).info.artifact_uri.startswith(new_root + "/")
    assert client.get_model_version("acme-adapter", version).source.startswith(new_root + "/")
    fetched = mlflow.artifacts.download_artifacts(artifact_uri=f"runs:/{run_id}/adapter", dst_path=str(tmp_path / "dl"),
                                                  tracking_uri=default_uri(copy))
    assert (tmp_path / "dl" / "adapter" / "adapter_config.json").read_text() == '{"r": 8}', fetched

    # a new run in the copy writes into the copy, never recreating the old folder
    moved.start("eval")
    moved.artifacts(copy / "stash" / "adapter_config.json", "evaluation")
    moved.end()
    assert not (tmp_path / "a").exists()
    assert Tracker(default_uri(copy), "acme", copy).relocated == []  # done once
