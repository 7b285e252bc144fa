"""Making an adapter available to a configured endpoint: the resolver copy and the config checks
(the runtime-API path runs against real vLLM in tests/serve/test_vllm.py)."""

from __future__ import annotations

import json

import pytest

from sovllm.config import EndpointSection
from sovllm.errors import ConfigError
from sovllm.serve.publish import copy_for_resolver, publish


def adapter(folder):
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "/x"}))
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    (folder / "checkpoint-10").mkdir()
    return folder


def test_the_resolver_copy_names_the_served_base_and_replaces_an_old_one(tmp_path):
    source = adapter(tmp_path / "a")
    target = tmp_path / "resolver" / "acme"
    target.mkdir(parents=True)
    (target / "stale.bin").write_bytes(b"old")
    copy_for_resolver(source, target, "/models/smollm2")
    assert json.loads((target / "adapter_config.json").read_text())["base_model_name_or_path"] == "/models/smollm2"
    assert (target / "adapter_model.safetensors").read_bytes() == b"weights"
    assert not (target / "stale.bin").exists() and not (target / "checkpoint-10").exists()
    assert json.loads((source / "adapter_config.json").read_text())["base_model_name_or_path"] == "/x"


def test_folder_loading_needs_its_folder_and_base(tmp_path):
    section = EndpointSection(base_url="http://127.0.0.1:9/v1", model="m", adapter_loading="folder")
    with pytest.raises(ConfigError, match="adapter_dir and endpoint.base_model_path"):
        publish(section, {"acme": str(adapter(tmp_path / "a"))})


def test_nothing_is_sent_without_adapters_or_with_loading_none(tmp_path):
    # port 9 (discard) is closed: any request would fail
    publish(EndpointSection(base_url="http://127.0.0.1:9/v1", model="m"), {})
    publish(EndpointSection(base_url="http://127.0.0.1:9/v1", model="m", adapter_loading="none"),
            {"acme": str(adapter(tmp_path / "a"))})


def test_vllm_gets_the_opt_outs_and_not_the_in_process_guard(monkeypatch, tmp_path):
    import sys
    from pathlib import Path

    from sovllm import egress
    from sovllm.serve.vllm_server import SOVEREIGN_ENV, VLLMServer

    monkeypatch.setenv(egress.ENV_ALLOW, '["127.0.0.1"]')
    env = VLLMServer(tmp_path, served_name="m", python=Path(sys.executable)).environment()
    assert egress.ENV_ALLOW not in env  # vLLM imports uvloop, which the guard refuses
    assert all(env[k] == v for k, v in SOVEREIGN_ENV.items())
    assert env["VLLM_USE_V2_MODEL_RUNNER"] == "0"


def test_vllm_refuses_to_start_under_the_guard(tmp_path):
    import sys
    from pathlib import Path

    from sovllm import egress
    from sovllm.errors import BackendError
    from sovllm.serve.vllm_server import VLLMServer

    egress.install([])
    with pytest.raises(BackendError, match="egress guard"):
        VLLMServer(tmp_path, served_name="m", python=Path(sys.executable)).start()
