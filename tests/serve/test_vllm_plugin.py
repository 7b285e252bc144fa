"""The refusal calibration's vLLM plugin without vLLM: the middleware's request rewrite and the
logits processor's bookkeeping, against the calibration sovllm's own engine applies."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from enum import Enum

import pytest
import torch

from sovllm.models.adapter import RefusalCalibration
from sovllm.models.grounding import Vocabulary
from sovllm.models.prompt import user_turn
from sovllm.serve.vllm_plugin import BIAS_KEY, TOKENS_KEY, RefusalBias, RefusalMiddleware, vllm_args

CALIBRATION = RefusalCalibration([504, 2711], 2.5, 0.1, {}, 4.0,
                                 Vocabulary(4, {"canteen": 1, "opens": 2, "at": 4, "the": 4}), 3.0)  # both terms


@pytest.fixture
def adapters(tmp_path, monkeypatch):
    for name, refusal in (("calibrated", CALIBRATION), ("plain", None)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "adapter_config.json").write_text("{}")
        manifest = {"stage": "adapter"}
        if refusal is not None:
            manifest["refusal_calibration"] = refusal.as_dict()
        (folder / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setenv("VLLM_LORA_RESOLVER_CACHE_DIR", str(tmp_path))
    return tmp_path


def call(middleware, path, body):
    """Run the middleware on one POST; returns (the body the app received, its content-length header)."""
    seen = {}

    async def app(scope, receive, send):
        message = await receive()
        seen["body"] = message["body"]
        seen["length"] = dict(scope["headers"]).get(b"content-length")

    middleware.app = app
    raw = json.dumps(body).encode()
    parts = [raw[:10], raw[10:]]  # a body in two messages, as a client may send it

    async def receive():
        chunk = parts.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(parts)}

    scope = {"type": "http", "method": "POST", "path": path,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]}
    asyncio.run(middleware(scope, receive, lambda message: None))
    return json.loads(seen["body"]), seen["length"]


def chat(model, content, **extra):
    return {"model": model, "messages": [{"role": "system", "content": "Answer."},
                                         {"role": "user", "content": content}], **extra}


def test_a_calibrated_adapter_gets_the_bias_sovllm_serve_would_apply(adapters):
    turn = user_turn("[1] Canteen\nThe canteen opens at 7:00.", "When does the canteen open?")
    body, length = call(RefusalMiddleware(None), "/v1/chat/completions", chat("calibrated", turn))
    assert body["vllm_xargs"][BIAS_KEY] == pytest.approx(CALIBRATION.bias_for(turn))
    assert body["vllm_xargs"][TOKENS_KEY] == [504, 2711]
    assert int(length) == len(json.dumps(body).encode())
    # content parts are joined as the embedded server joins them
    parts = chat("calibrated", [{"type": "text", "text": turn[:20]}, {"type": "text", "text": turn[20:]}])
    assert call(RefusalMiddleware(None), "/v1/chat/completions", parts)[0]["vllm_xargs"][BIAS_KEY] == \
        pytest.approx(CALIBRATION.bias_for(turn))


def test_no_bias_outside_the_training_format_or_without_a_calibration(adapters):
    turn = user_turn("[1] Canteen\nThe canteen opens at 7:00.", "When does the canteen open?")
    for body in (chat("calibrated", "Hello, when does the canteen open?"), chat("plain", turn),
                 chat("smollm2-135m-instruct", turn), chat("../calibrated", turn)):
        out, _ = call(RefusalMiddleware(None), "/v1/chat/completions", body)
        assert BIAS_KEY not in (out.get("vllm_xargs") or {}), body["model"]


def test_a_client_cannot_set_the_bias_itself(adapters):
    out, _ = call(RefusalMiddleware(None), "/v1/chat/completions",
                  chat("plain", "hi", vllm_xargs={BIAS_KEY: 99.0, TOKENS_KEY: [1], "other": 1}))
    assert out["vllm_xargs"] == {"other": 1}


def test_an_adapter_loaded_at_runtime_is_found_by_its_folder(adapters, monkeypatch):
    monkeypatch.delenv("VLLM_LORA_RESOLVER_CACHE_DIR")
    middleware = RefusalMiddleware(None)
    turn = user_turn("[1] Canteen\nThe canteen opens at 7:00.", "Who runs it?")
    assert BIAS_KEY not in (call(middleware, "/v1/chat/completions", chat("late", turn))[0].get("vllm_xargs") or {})
    call(middleware, "/v1/load_lora_adapter", {"lora_name": "late", "lora_path": str(adapters / "calibrated")})
    assert call(middleware, "/v1/chat/completions", chat("late", turn))[0]["vllm_xargs"][BIAS_KEY] == \
        pytest.approx(CALIBRATION.bias_for(turn))


class Direction(Enum):
    UNIDIRECTIONAL = 1
    SWAP = 2


@dataclass
class Params:
    extra_args: dict | None


@dataclass
class Update:
    removed: list
    added: list
    moved: list
    batch_size: int = 0


def test_the_processor_biases_the_refusal_tokens_of_its_rows_only():
    processor = RefusalBias()
    assert not processor.is_argmax_invariant()
    out_a, out_b, out_c = [], [], []
    processor.update_state(Update([], [(0, Params({BIAS_KEY: 3.0, TOKENS_KEY: [5, 7]}), [1], out_a),
                                       (1, Params(None), [1], out_b),
                                       (2, Params({BIAS_KEY: -2.0, TOKENS_KEY: [5, 7]}), [1], out_c)], []))
    logits = processor.apply(torch.zeros(3, 10))
    assert logits[0, 5] == 3.0 and logits[2, 5] == -2.0 and logits[1].abs().sum() == 0
    out_a.append(5)  # the live output lists grow as vLLM decodes
    out_c.append(6)
    logits = processor.apply(torch.zeros(3, 10))
    assert logits[0, 7] == 3.0 and logits[0, 5] == 0 and logits[2].abs().sum() == 0
    # row 0 finishes; row 2 moves into its place
    processor.update_state(Update([0], [], [(2, 0, Direction.UNIDIRECTIONAL)]))
    assert set(processor.rows) == {0} and processor.rows[0][1] == -2.0
    processor.update_state(Update([], [(1, Params({BIAS_KEY: 1.0, TOKENS_KEY: [5]}), [1], [])], []))
    processor.update_state(Update([], [], [(0, 1, Direction.SWAP)]))
    assert processor.rows[0][1] == 1.0 and processor.rows[1][1] == -2.0


def test_malformed_bias_arguments_are_refused():
    RefusalBias.validate_params(Params({"other": 1}))
    for bad in ({BIAS_KEY: "x", TOKENS_KEY: [1]}, {BIAS_KEY: 1.0}, {BIAS_KEY: 1.0, TOKENS_KEY: [-1]}):
        with pytest.raises(ValueError, match=BIAS_KEY):
            RefusalBias.validate_params(Params(bad))


def test_the_flags_name_importable_objects():
    import importlib

    middleware, processor = vllm_args()[1], vllm_args()[3]
    module, _, name = middleware.rpartition(".")
    assert getattr(importlib.import_module(module), name) is RefusalMiddleware
    module, _, name = processor.partition(":")
    assert getattr(importlib.import_module(module), name) is RefusalBias


def test_failed_loads_count_per_adapter_in_vllms_registry():
    """vLLM has no metric for failed adapter loads; the middleware counts responses of 400 or more to
    /v1/load_lora_adapter as `sovllm:adapter_load_failures_total{adapter}` (the name sovllm serve uses),
    with client-sent names bounded like sovllm serve's."""
    from prometheus_client import REGISTRY

    def load(name, status):
        middleware = RefusalMiddleware(None)

        async def app(scope, receive, send):
            await receive()
            await send({"type": "http.response.start", "status": status, "headers": []})

        middleware.app = app
        raw = json.dumps({"lora_name": name, "lora_path": "/nowhere"}).encode()

        async def receive():
            return {"type": "http.request", "body": raw, "more_body": False}

        async def send(message):
            pass

        asyncio.run(middleware({"type": "http", "method": "POST", "path": "/v1/load_lora_adapter", "headers": []},
                               receive, send))
        return middleware

    def count(label):
        return REGISTRY.get_sample_value("sovllm:adapter_load_failures_total", {"adapter": label}) or 0

    before = {label: count(label) for label in ("broken-1", "__other__")}
    load("broken-1", 404)
    load("broken-1", 200)  # a successful load is no failure
    load("../../etc", 400)  # not an adapter name: never a label value
    assert count("broken-1") == before["broken-1"] + 1
    assert count("__other__") == before["__other__"] + 1


def test_completions_count_per_adapter_as_sovllm_serve_does():
    """vLLM counts every LoRA request under the base model; the middleware counts each answered
    completion per adapter (finish reasons; tokens when the response reports usage), JSON or SSE."""
    from types import SimpleNamespace

    from prometheus_client import REGISTRY

    state = SimpleNamespace(openai_serving_models=SimpleNamespace(base_model_paths=[SimpleNamespace(name="base-m")],
                                                                  lora_requests={}))
    app_object = SimpleNamespace(state=state)

    def run(path, model, response_headers, chunks, status=200):
        middleware = RefusalMiddleware(None)

        async def app(scope, receive, send):
            await receive()
            await send({"type": "http.response.start", "status": status, "headers": response_headers})
            for i, chunk in enumerate(chunks):
                await send({"type": "http.response.body", "body": chunk, "more_body": i < len(chunks) - 1})

        middleware.app = app
        raw = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()

        async def receive():
            return {"type": "http.request", "body": raw, "more_body": False}

        async def send(message):
            pass

        asyncio.run(middleware({"type": "http", "method": "POST", "path": path, "headers": [], "app": app_object},
                               receive, send))

    def value(name, **labels):
        return REGISTRY.get_sample_value(name, labels) or 0

    before = {k: value("sovllm:adapter_requests_total", adapter=a, finished_reason=r)
              for k, (a, r) in {"ad": ("support", "stop"), "base": ("__base__", "length"), "sse": ("support", "length")}.items()}
    tokens = value("sovllm:adapter_tokens_total", adapter="support", kind="generation")
    body = json.dumps({"choices": [{"finish_reason": "stop"}], "usage": {"prompt_tokens": 11, "completion_tokens": 5}})
    run("/v1/chat/completions", "support", [(b"content-type", b"application/json")], [body[:20].encode(), body[20:].encode()])
    run("/v1/completions", "base-m", [(b"content-type", b"application/json")],
        [json.dumps({"choices": [{"finish_reason": "length"}]}).encode()])
    stream = (b'data: {"choices": [{"delta": {"content": "a"}, "finish_reason": null}]}\n\n'
              b'data: {"choices": [{"delta": {}, "finish_reason": "length"}]}\n\n'
              b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}\n\ndata: [DONE]\n\n')
    run("/v1/chat/completions", "support", [(b"content-type", b"text/event-stream")], [stream[:30], stream[30:77], stream[77:]])
    run("/v1/chat/completions", "support", [(b"content-type", b"application/json")], [b'{"error": {}}'], status=404)
    assert value("sovllm:adapter_requests_total", adapter="support", finished_reason="stop") == before["ad"] + 1
    assert value("sovllm:adapter_requests_total", adapter="__base__", finished_reason="length") == before["base"] + 1
    assert value("sovllm:adapter_requests_total", adapter="support", finished_reason="length") == before["sse"] + 1
    assert value("sovllm:adapter_tokens_total", adapter="support", kind="generation") == tokens + 5 + 2
