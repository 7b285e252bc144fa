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


@pytest.fixture(scope="session")
def bundled_adapters(bundled_model, tmp_path_factory):
    """Two random LoRA adapters (ranks 8 and 16) on the bundled model, in one adapter root."""
    from sovllm.models.tiny import make_random_adapter

    root = tmp_path_factory.mktemp("bundled-adapters")
    return {
        "acme-a": make_random_adapter(bundled_model.path, root / "acme-a", rank=8, seed=1, scale=0.3,
                                      base_id=bundled_model.base_id),
        "acme-b": make_random_adapter(bundled_model.path, root / "acme-b", rank=16, seed=2, scale=0.3,
                                      target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
                                      base_id=bundled_model.base_id),
    }


@pytest.fixture(scope="session")
def bundled_server(bundled_model, bundled_adapters):
    """One `sovllm serve` subprocess with the bundled model and one start-up adapter, per test run.

    `acme-b` is not loaded at start, so tests can load and unload it through the API.
    """
    from sovllm.serve.launch import EmbeddedServer

    root = next(iter(bundled_adapters.values())).parent
    server = EmbeddedServer(bundled_model.name, adapters={"acme-a": str(bundled_adapters["acme-a"])},
                            adapter_roots=[str(root)], extra_args=["--max-num-seqs", "16"])
    server.start()
    yield server
    server.stop()


def calibrated_copy(adapter, out, tokenizer_dir, *, bias: float, weight: float):
    """A copy of `adapter` whose manifest carries a refusal calibration: `bias - weight * support` on
    the first two tokens of the training prompt's refusal sentence, document frequencies from two
    made-up contexts."""
    import json
    import shutil

    from sovllm.config import PromptSection
    from sovllm.models.adapter import RefusalCalibration
    from sovllm.models.grounding import Vocabulary
    from sovllm.models.tokenizer import load_tokenizer
    from sovllm.train.calibrate import refusal_token_ids

    shutil.copytree(adapter, out)
    tokens = refusal_token_ids(load_tokenizer(tokenizer_dir), PromptSection().refusal)
    vocabulary = Vocabulary.from_contexts(["The canteen opens at 7:00 and closes at 18:30.",
                                           "Badges are issued in room A0.21 for 25 euros."])
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["refusal_calibration"] = RefusalCalibration(tokens, bias, 0.1, {}, weight, vocabulary).as_dict()
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="session")
def vllm_python():
    """The Python of the vLLM environment `make vllm` builds (required under CI=true)."""
    from sovllm.serve.vllm_server import find_python, version

    python = find_python()
    require(python is not None and version(python) is not None, "vLLM (make vllm builds .venv-vllm)")
    return python


@pytest.fixture(scope="session")
def vllm_adapters(bundled_model, bundled_adapters, tmp_path_factory):
    """The bundled adapters plus `acme-cal` (acme-a with a refusal calibration), and a resolver folder
    holding `resolved` (acme-b, its base_model_name_or_path the base folder vLLM is started with) and
    `foreign-base` (the same adapter claiming another base)."""
    import json
    import shutil

    root = next(iter(bundled_adapters.values())).parent
    adapters = dict(bundled_adapters)
    if not (root / "acme-cal").exists():
        calibrated_copy(bundled_adapters["acme-a"], root / "acme-cal", bundled_model.path, bias=6.0, weight=12.0)
    adapters["acme-cal"] = root / "acme-cal"
    resolver = tmp_path_factory.mktemp("resolver")
    for name, base in (("resolved", str(bundled_model.path)), ("foreign-base", "HuggingFaceTB/SmolLM2-360M")):
        shutil.copytree(bundled_adapters["acme-b"], resolver / name)
        config = json.loads((resolver / name / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = base
        (resolver / name / "adapter_config.json").write_text(json.dumps(config))
    return adapters, resolver


@pytest.fixture(scope="session")
def vllm_server(vllm_python, bundled_model, vllm_adapters):
    """One real vLLM server (CPU build) per test run: the bundled model under its sovllm name, acme-a
    and acme-cal as --lora-modules, runtime loading on, the filesystem resolver on a folder,
    sovllm's refusal-calibration plugin, and its statistics on (the `vllm:*` metrics Prometheus scrapes)."""
    from sovllm.serve.vllm_server import VLLMServer

    adapters, resolver = vllm_adapters
    server = VLLMServer(bundled_model.path, served_name=bundled_model.name, python=vllm_python,
                        adapters={"acme-a": str(adapters["acme-a"]), "acme-cal": str(adapters["acme-cal"])},
                        runtime_lora=True, resolver_dir=resolver, max_loras=4, log_stats=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def fake():
    """Start scripted OpenAI-compatible endpoints (tests/fake_endpoint.py); all are stopped afterwards."""
    from tests.fake_endpoint import FakeEndpoint

    endpoints = []

    def start(script, delay=0.0):
        endpoint = FakeEndpoint(script, delay=delay)
        endpoints.append(endpoint)
        return endpoint

    yield start
    for endpoint in endpoints:
        endpoint.close()


@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium driven by Playwright (no browser download).

    Module scope: Playwright's sync API keeps an event loop running in the main thread while it is
    open, and later tests call asyncio.run()."""
    import importlib.util
    import shutil

    require(importlib.util.find_spec("playwright") is not None, "Playwright for Python (pip install playwright)")
    require(shutil.which("chromium") is not None, "Chromium (Debian package chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=shutil.which("chromium"), headless=True)
        yield b
        b.close()


@pytest.fixture
def s3_server():
    """moto's S3-compatible server on loopback (a real HTTP server from PyPI), and a boto3 client for
    it: (port, client). Credentials: testing / testing."""
    import logging

    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    from sovllm.serve.vllm_server import free_port

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    port = free_port("127.0.0.1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    try:
        yield port, client
    finally:
        server.stop()
