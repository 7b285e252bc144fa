"""The train stage on the tiny model: adapter folder, real MLflow store, skip, resume after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from sovllm.config import load_config
from sovllm.errors import ModelError
from sovllm.models.adapter import check_servable, inspect_adapter
from sovllm.train import save as saving
from sovllm.train import stage
from tests.train.conftest import TRAIN_FAST, train_command, train_until_first_checkpoint


@pytest.mark.integration  # a full train stage: training, stop check, calibration, MLflow
def test_train_writes_a_servable_adapter_and_tracks_it_in_mlflow(train_project, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    cfg = load_config(train_project, (*TRAIN_FAST, "train.max_steps=4"))
    result = stage.run(train_project, cfg, log=lambda _: None)
    adapter = train_project / "out" / "train" / "adapter"
    manifest = json.loads((adapter / "manifest.json").read_text())
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md"} <= \
        {p.name for p in adapter.iterdir()}
    info = inspect_adapter(adapter)
    assert info.base_id == manifest["base_id"] and info.rank == 8 and not info.unservable
    check_servable(info, base_id=manifest["base_id"], max_rank=16)
    assert manifest["audit"]["train"]["passed"] and manifest["audit"]["train"]["eot_id"] != \
        manifest["audit"]["train"]["pad_id"]
    assert manifest["metrics"]["steps"] == 4 and manifest["stop_check"]["prompts"] == 4
    calibration = manifest["refusal_calibration"]  # chosen on val, which holds both kinds of item
    assert calibration["val"]["unanswerable"] >= 1 and calibration["val"]["answerable"] >= 1
    assert calibration["val"]["after"]["false_refusals"] <= cfg.train.refusal_max_false
    assert info.refusal is not None and info.refusal.bias == calibration["bias"]
    assert not (train_project / "out" / "train" / "checkpoints").exists()

    tracking = result.manifest.extra["mlflow"]
    client = MlflowClient(tracking_uri=tracking["tracking_uri"])
    run = client.get_run(tracking["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["lora/r"] == "8" and run.data.params["base_id"] == manifest["base_id"]
    assert run.data.params["data/train.jsonl"] == manifest["data"]["train.jsonl"]
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in losses] == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/loss")] == [2, 4]
    assert "eval/stop_rate_adapter" in run.data.metrics and "train/loss_tokens_per_s" in run.data.metrics
    assert run.data.metrics["refusal/bias"] == pytest.approx(calibration["bias"], abs=1e-3)
    assert any(k.startswith("system/") for k in run.data.metrics)  # system metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert "adapter/adapter_config.json" in artifacts
    version = client.get_model_version_by_alias(tracking["registered_model"], "candidate")
    assert version.run_id == run.info.run_id and version.source.endswith("/adapter")

    again = stage.run(train_project, cfg, log=lambda _: None)
    assert again.skipped


@pytest.mark.integration  # a full train stage up to the stop check
def test_failed_stop_check_fails_the_run_and_registers_nothing(train_project):
    from mlflow import MlflowClient

    cfg = load_config(train_project, (*TRAIN_FAST, "train.max_steps=2", "train.stop_min_rate=1.0"))
    with pytest.raises(ModelError, match="stop check failed"):
        stage.run(train_project, cfg, log=lambda _: None)
    manifest = json.loads((train_project / "out" / "train" / "manifest.json").read_text())
    assert manifest["status"] == "failed"
    client = MlflowClient(tracking_uri=f"sqlite:///{train_project / 'out' / 'mlflow' / 'mlflow.db'}")
    assert client.search_registered_models() == []


def test_non_vllm_options_are_refused_before_training(train_project):
    from sovllm.errors import ConfigError

    with pytest.raises(ConfigError, match="vLLM cannot serve this adapter: DoRA"):
        stage.run(train_project, load_config(train_project, ("train.use_dora=true",)), log=lambda _: None)
    assert not (train_project / "out" / "train").exists()


@pytest.mark.integration  # a real `sovllm train` process, twice
def test_resume_after_kill_9(train_project):
    """Kill a real training process after its first checkpoint; the re-run resumes there and finishes."""
    args = [*TRAIN_FAST, "train.max_steps=30", "train.eval_steps=3", "train.early_stopping_patience=0"]
    cmd = train_command(train_project, args)
    checkpoints = train_project / "out" / "train" / "checkpoints"
    proc = train_until_first_checkpoint(cmd, checkpoints)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = sorted(int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*"))
    assert saved and saved[-1] < 30
    first_run = json.loads((checkpoints / "sovllm-run.json").read_text())["mlflow_run_id"]

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "resuming from checkpoint-" in again.stderr
    manifest = json.loads((train_project / "out" / "train" / "manifest.json").read_text())
    assert manifest["status"] == "ok" and manifest["counts"]["steps"] == 30
    assert manifest["extra"]["mlflow"]["run_id"] == first_run  # the same MLflow run continued


def test_an_incomplete_checkpoint_is_skipped_and_removed(tmp_path):
    from sovllm.train.save import CHECKPOINT_FILES, latest_checkpoint

    for step, files in ((3, CHECKPOINT_FILES), (6, CHECKPOINT_FILES[:2])):  # killed while writing step 6
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        for name in files:
            (folder / name).write_text("{}")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-3"
    assert not (tmp_path / "checkpoint-6").exists()
    assert latest_checkpoint(tmp_path / "none") is None


def test_unknown_folders_among_checkpoints_are_ignored(tmp_path):
    from sovllm.train.save import CHECKPOINT_FILES, latest_checkpoint

    for name in ("checkpoint-3", "checkpoint-foo", "checkpoint-9.partial"):
        (tmp_path / name).mkdir()
        for file in CHECKPOINT_FILES:
            (tmp_path / name / file).write_text("{}")
    (tmp_path / "checkpoint-12").write_text("a file, not a checkpoint")
    (tmp_path / "checkpoint-6").mkdir()  # killed while writing trainer_state.json: it does not parse
    for file in CHECKPOINT_FILES:
        (tmp_path / "checkpoint-6" / file).write_text('{"global_step"')
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-3"
    assert not (tmp_path / "checkpoint-6").exists()
    assert {p.name for p in tmp_path.iterdir()} == {"checkpoint-3", "checkpoint-foo", "checkpoint-9.partial",
                                                     "checkpoint-12"}


class Saver:
    """Stands in for the PEFT model and tokenizer: writes files tagged with one version."""

    def __init__(self, tag: str, files: tuple[str, ...], fail: bool = False):
        self.tag, self.files, self.fail = tag, files, fail

    def save_pretrained(self, path):
        from pathlib import Path

        Path(path).mkdir(parents=True, exist_ok=True)
        for name in self.files:
            (Path(path) / name).write_text(json.dumps({"tag": self.tag}))
            if self.fail:
                raise OSError(28, "No space left on device")


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def adapter_manifest(tag: str) -> dict:
    return {"name": tag, "base_model": "tiny", "base_id": "0" * 64, "mlflow_run_id": "r",
            "lora": {"preset": "attention", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]},
            "metrics": {"steps": 2, "best_val_loss": 1.0, "best_step": 2}, "stop_check": None,
            "refusal_calibration": None, "data": {"train.jsonl": "a" * 64, "val.jsonl": "b" * 64}}


def save(adapter, tag: str, fail: bool = False) -> None:
    saving.save_adapter(Saver(tag, ADAPTER_FILES, fail), Saver(tag, ("tokenizer.json",)), adapter,
                        adapter_manifest(tag))


def held(adapter) -> str | None:
    """The version of the complete adapter at `adapter`, or None if there is none or it is mixed."""
    try:
        tags = {json.loads((adapter / f).read_text())["tag"] for f in (*ADAPTER_FILES, "tokenizer.json")}
        tags.add(json.loads((adapter / "manifest.json").read_text())["name"])
        (adapter / "README.md").read_text()
    except (OSError, ValueError):
        return None
    return tags.pop() if len(tags) == 1 else None


def watch_filesystem(monkeypatch, after_each) -> None:
    """Call `after_each()` before every rename, replace, exchange and tree removal (it may raise: a crash)."""
    import shutil

    from sovllm import artifacts

    for owner, name in ((os, "rename"), (os, "replace"), (shutil, "rmtree"), (artifacts, "_exchange")):
        real = getattr(owner, name)

        def wrapped(*args, _real=real, **kwargs):
            after_each()
            return _real(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapped)


def test_a_failed_adapter_save_leaves_the_previous_adapter_in_place(tmp_path):
    adapter = tmp_path / "adapter"
    save(adapter, "old")
    with pytest.raises(OSError, match="No space left"):
        save(adapter, "new", fail=True)
    assert held(adapter) == "old" and sorted(os.listdir(tmp_path)) == ["adapter"]


def test_the_adapter_path_holds_a_complete_adapter_at_every_step_of_a_save(tmp_path, monkeypatch):
    from sovllm import artifacts

    probe = [tmp_path / "a", tmp_path / "b"]
    for folder in probe:
        folder.mkdir()
    if not artifacts._exchange(*probe):
        pytest.skip("this filesystem cannot swap two folders in one step (RENAME_EXCHANGE)")
    adapter = tmp_path / "adapter"
    save(adapter, "old")
    seen = []
    watch_filesystem(monkeypatch, lambda: seen.append(held(adapter)))
    save(adapter, "new")
    seen.append(held(adapter))
    assert seen[-1] == "new" and len(seen) >= 3 and set(seen) <= {"old", "new"}, seen


@pytest.mark.parametrize("one_step_swap", [True, False])
def test_a_crash_at_any_step_of_an_adapter_save_is_recovered_by_the_next_run(tmp_path, monkeypatch, one_step_swap):
    from sovllm import artifacts

    if not one_step_swap:
        monkeypatch.setattr(artifacts, "_exchange", lambda a, b: False)
    adapter = tmp_path / "adapter"
    step = 0
    while True:
        root = tmp_path / f"run{step}"
        root.mkdir()
        adapter = root / "adapter"
        save(adapter, "old")
        calls = []

        def crash_at_step(step=step, calls=calls):
            calls.append(1)
            if len(calls) == step + 1:
                raise KeyboardInterrupt  # stands in for kill -9 right before this filesystem step

        with monkeypatch.context() as m:
            watch_filesystem(m, crash_at_step)
            try:
                save(adapter, "new")
                crashed = False
            except KeyboardInterrupt:
                crashed = True
        saving.recover_adapter(adapter)  # the next run's first act
        assert held(adapter) in ({"old", "new"} if crashed else {"new"}), (step, sorted(os.listdir(root)))
        assert sorted(os.listdir(root)) == ["adapter"], step
        if not crashed:
            break
        step += 1
    assert step >= 3  # there were steps to crash at


def test_the_train_stage_restores_an_adapter_moved_aside_before_deciding_to_skip(tmp_path, monkeypatch):
    from sovllm.project import init_project

    root = tmp_path / "p"
    init_project(root)
    curated = root / "out" / "curate"
    curated.mkdir(parents=True)
    for split in ("train", "val"):
        (curated / f"{split}.jsonl").write_text(json.dumps({"id": split}) + "\n")
    trained = []

    def fake_train(root, cfg, records, ctx, **kwargs):
        trained.append(1)
        save(ctx.out_dir / "adapter", f"v{len(trained)}")

    monkeypatch.setattr(stage, "_train", fake_train)
    cfg = load_config(root)
    assert not stage.run(root, cfg, log=lambda _: None).skipped
    out = root / "out" / "train"
    os.rename(out / "adapter", out / ".adapter.old")  # killed between the two renames of a later save
    assert stage.run(root, cfg, log=lambda _: None).skipped and len(trained) == 1
    assert held(out / "adapter") == "v1" and not (out / ".adapter.old").exists()
