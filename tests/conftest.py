"""Shared fixtures: tiny models built in code, the real bundled model for the integration tier,
and an egress guard that each test starts from scratch."""

from __future__ import annotations

import os

import pytest

from sovllm import egress


def require(condition: bool, what: str) -> None:
    """Skip when a real component is missing; under CI=true, fail instead (DESIGN.md test rules)."""
    if condition:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{what} is required under CI=true but missing")
    pytest.skip(f"{what} not available")


@pytest.fixture(autouse=True)
def _fresh_egress(monkeypatch):
    """Each test starts unguarded and leaves no guard or egress env behind."""
    egress.uninstall()
    for key in [egress.ENV_LOG, *egress.PRIVACY_ENV]:
        monkeypatch.delenv(key, raising=False)
    yield
    egress.uninstall()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer Llama with a small BPE tokenizer (pad = eos = <|im_end|>, like SmolLM2)."""
    from sovllm.models.tiny import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def bundled_model():
    """The real bundled SmolLM2, prepared once per machine in the default SOVLLM_HOME."""
    from sovllm.models import registry

    spec = registry.BUNDLED[registry.DEFAULT_BASE]
    require(registry.bundled_gguf(spec) is not None, f"the bundled model package {spec.distribution}")
    return registry.prepare(spec.name)
