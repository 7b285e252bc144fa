"""The HTTP API on the tiny model (in-process): OpenAI-style errors, adapter rules, response shapes."""

from __future__ import annotations

import json

import jsonschema
import pytest
from fastapi.testclient import TestClient

from sovllm.serve.server import build

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["answer", "tags"],
          "properties": {"answer": {"type": "string", "minLength": 2, "maxLength": 20},
                         "tags": {"type": "array", "maxItems": 2, "items": {"type": "string", "maxLength": 5}}}}


@pytest.fixture(scope="module")
def api(tiny_model_dir, tiny_adapters):
    root = next(iter(tiny_adapters.values())).parent
    app, service = build(str(tiny_model_dir), served_name="tiny", adapters=[("r2", str(tiny_adapters["r2"]))],
                         adapter_roots=[root], max_lora_rank=4, max_num_seqs=8, max_model_len=512)
    with TestClient(app) as client:
        assert client.get("/health").status_code == 503  # no warm-up yet
        client.portal.call(service.warm_up)
        yield client, service
    service.engine.shutdown()


def chat(client, **body):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 8,
            "temperature": 0, **body}
    return client.post("/v1/chat/completions", json=body)


def assert_error(response, status, type_, fragment, param=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == type_ and fragment in error["message"] and error["code"] == status
    if param:
        assert error["param"] == param


def test_health_and_models(api):
    client, _ = api
    assert client.get("/health").json() == {"status": "ok"}
    cards = {c["id"]: c for c in client.get("/v1/models").json()["data"]}
    assert cards["tiny"]["parent"] is None and cards["r2"]["parent"] == "tiny"


def test_chat_shape_usage_and_length(api):
    client, _ = api
    body = chat(client, max_tokens=5, ignore_eos=True).json()
    assert body["object"] == "chat.completion" and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 5


def test_n_seed_and_logprobs(api):
    client, _ = api
    body = chat(client, n=3, temperature=1.0, seed=7, logprobs=True, top_logprobs=3, max_tokens=6, ignore_eos=True).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    texts = [c["message"]["content"] for c in body["choices"]]
    again = chat(client, n=3, temperature=1.0, seed=7, max_tokens=6, ignore_eos=True).json()
    assert [c["message"]["content"] for c in again["choices"]] == texts  # seeded sampling is reproducible
    entries = body["choices"][0]["logprobs"]["content"]
    assert len(entries) == 6 and len(entries[0]["top_logprobs"]) == 3
    assert entries[0]["logprob"] <= 0 and entries[0]["top_logprobs"][0]["logprob"] >= entries[0]["top_logprobs"][1]["logprob"]
    for choice in body["choices"]:  # the tokens' bytes make up the answer's UTF-8, partial characters included
        raw = b"".join(bytes(e["bytes"]) for e in choice["logprobs"]["content"])
        decoded, content = raw.decode("utf-8", errors="replace"), choice["message"]["content"]
        # the answer text holds back a character cut off by max_tokens; its bytes are still there
        assert decoded == content or (decoded.startswith(content) and decoded[len(content):] == "\ufffd"), \
            (decoded, content)


def test_min_tokens_and_stop_strings(api):
    client, _ = api
    text = chat(client, max_tokens=30, ignore_eos=True).json()["choices"][0]["message"]["content"]
    stop = text[5:8]
    body = chat(client, max_tokens=30, ignore_eos=True, stop=[stop]).json()
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["message"]["content"] == text[:text.index(stop)]
    first = chat(client, max_tokens=1, logprobs=True).json()["choices"][0]["logprobs"]["content"][0]["token"]
    first_id = client.app.state.service.tokenizer.convert_tokens_to_ids(
        client.app.state.service.tokenizer.tokenize(first))[0]
    stopped = chat(client, max_tokens=8, stop_token_ids=[first_id]).json()
    assert stopped["usage"]["completion_tokens"] == 1 and stopped["choices"][0]["finish_reason"] == "stop"
    held = chat(client, max_tokens=8, stop_token_ids=[first_id], min_tokens=5).json()
    assert held["usage"]["completion_tokens"] >= 5  # the stop token is masked until min_tokens


@pytest.mark.integration  # schema-constrained sampling on the tiny model: seconds per request
def test_json_schema_output_validates(api):
    client, _ = api
    for seed in range(3):
        body = chat(client, temperature=1.0, seed=seed, max_tokens=120,
                    response_format={"type": "json_schema", "json_schema": {"name": "qa", "schema": SCHEMA}}).json()
        choice = body["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        content = choice["message"]["content"]
        jsonschema.validate(json.loads(content), SCHEMA)
        assert "\n" not in content
    body = chat(client, max_tokens=60, response_format={"type": "json_object"}).json()
    if body["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(body["choices"][0]["message"]["content"]), dict)


@pytest.mark.integration  # 14 schema-constrained requests per case
@pytest.mark.parametrize("max_tokens", [64, 96])
def test_judge_verdicts_always_close_within_their_max_tokens(api, max_tokens):
    """The judges bound their reasoning by max_tokens: even a random model's verdict ends with `stop`."""
    from sovllm.curate.judge import RUBRICS
    from sovllm.evaluate.judge import pairwise_schema

    client, _ = api
    for schema in (pairwise_schema(max_tokens), RUBRICS["answer-abc"].schema(max_tokens)):
        for seed in range(3):
            choice = verdict(client, schema, seed, max_tokens)
            assert choice["finish_reason"] == "stop", choice
            jsonschema.validate(json.loads(choice["message"]["content"]), schema)
    # the same model under the unbounded schema (reasoning up to 240 characters) runs out of tokens
    assert any(verdict(client, pairwise_schema(), seed, max_tokens)["finish_reason"] == "length" for seed in range(3))


def verdict(client, schema, seed, max_tokens):
    return chat(client, temperature=1.0, seed=seed, max_tokens=max_tokens,
                response_format={"type": "json_schema", "json_schema": {"name": "v", "schema": schema}}).json()["choices"][0]


def test_streaming_chat_chunks_and_usage(api):
    client, _ = api
    plain = chat(client, max_tokens=10, ignore_eos=True).json()["choices"][0]["message"]["content"]
    with client.stream("POST", "/v1/chat/completions", json={
            "model": "r2", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 10, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}) as response:
        lines = [l for l in response.iter_lines() if l]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(l[6:]) for l in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 10
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert streamed and streamed != plain  # the adapter changes the output


def test_completions_multiple_prompts_and_logprobs(api):
    client, _ = api
    body = client.post("/v1/completions", json={"model": "tiny", "prompt": ["Passwords must", "Die Urlaub"],
                                                "n": 2, "max_tokens": 4, "temperature": 0, "ignore_eos": True,
                                                "logprobs": 2}).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["choices"][0]["text"] == body["choices"][1]["text"]  # greedy: the n copies agree
    logprobs = body["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == 4 and len(logprobs["top_logprobs"][0]) <= 2
    assert logprobs["text_offset"][0] == 0 and logprobs["text_offset"] == sorted(logprobs["text_offset"])
    assert all(lp <= 0 for lp in logprobs["token_logprobs"])


@pytest.mark.parametrize("body,status,type_,fragment,param", [
    ({"model": "nope"}, 404, "NotFoundError", "The model `nope` does not exist.", "model"),
    ({"n": 5}, 400, "BadRequestError", "n:", "n"),
    ({"messages": []}, 400, "BadRequestError", "messages", "messages"),
    ({"tools": [{"type": "function"}]}, 400, "BadRequestError", "tools", "tools"),
    ({"logit_bias": {"1": 5}}, 400, "BadRequestError", "logit_bias", "logit_bias"),
    ({"max_tokens": 100000}, 400, "BadRequestError", "maximum context length is 512", None),
    ({"response_format": {"type": "json_schema"}}, 400, "BadRequestError", "json_schema.schema", None),
    ({"temperature": 5}, 400, "BadRequestError", "temperature", "temperature"),
])
def test_bad_requests_get_openai_errors(api, body, status, type_, fragment, param):
    client, _ = api
    assert_error(chat(client, **body), status, type_, fragment, param)
    assert chat(client).status_code == 200  # and the server keeps serving


def test_malformed_json_and_unknown_route(api):
    client, _ = api
    response = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(response, 400, "BadRequestError", "JSON")
    assert_error(client.get("/v1/nothing"), 404, "NotFoundError", "Not Found")


def test_adapter_load_use_unload(api, tiny_adapters):
    client, _ = api
    response = client.post("/v1/load_lora_adapter", json={"lora_name": "r4b", "lora_path": str(tiny_adapters["r4"])})
    assert response.status_code == 200 and response.text == "Success: LoRA adapter 'r4b' added successfully."
    assert chat(client, model="r4b").status_code == 200
    assert_error(client.post("/v1/load_lora_adapter", json={"lora_name": "r4b", "lora_path": str(tiny_adapters["r4"])}),
                 400, "BadRequestError", "has already been loaded")
    response = client.post("/v1/unload_lora_adapter", json={"lora_name": "r4b"})
    assert response.status_code == 200 and "removed successfully" in response.text
    assert_error(chat(client, model="r4b"), 404, "NotFoundError", "does not exist")
    assert_error(client.post("/v1/unload_lora_adapter", json={"lora_name": "r4b"}), 404, "NotFoundError",
                 "cannot be found")


def _copy_adapter(src, dst, **config_changes):
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    config.update(config_changes)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


def test_adapter_refusals(api, tiny_adapters, tmp_path):
    client, _ = api
    root = tiny_adapters["r2"].parent
    load = lambda name, path: client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})
    assert_error(load("x", tmp_path), 400, "BadRequestError", "outside the adapter roots", "lora_path")
    assert_error(load("bad name!", tiny_adapters["r2"]), 400, "BadRequestError", "invalid adapter name", "lora_name")
    assert_error(load("big", tiny_adapters["r8"]), 400, "BadRequestError", "exceeds --max-lora-rank 4")
    dora = _copy_adapter(tiny_adapters["r2"], root / "dora", use_dora=True)
    assert_error(load("dora", dora), 400, "BadRequestError", "vLLM cannot serve this adapter: DoRA")
    saved = _copy_adapter(tiny_adapters["r2"], root / "saved", modules_to_save=["lm_head"])
    assert_error(load("saved", saved), 400, "BadRequestError", "modules_to_save")
    other = _copy_adapter(tiny_adapters["r2"], root / "other")
    (other / "manifest.json").write_text(json.dumps({"base_id": "f" * 64}))
    assert_error(load("other", other), 400, "BadRequestError", "trained on base_id ffffffffffff")
    assert_error(load("gone", root / "missing"), 404, "NotFoundError", "No adapter found")
    assert [c["id"] for c in client.get("/v1/models").json()["data"]] == ["tiny", "r2"]


def test_a_calibrated_adapter_biases_requests_by_their_questions_support(api, tiny_adapters):
    """The manifest's refusal calibration applies per request: bias - weight x lexical support, and only to
    user turns in the training format (context, then question); other requests get the raw adapter."""
    from sovllm.models.adapter import RefusalCalibration
    from sovllm.models.grounding import Vocabulary
    from sovllm.models.prompt import user_message

    client, service = api
    tokens = service.tokenizer(" zebra quokka", add_special_tokens=False)["input_ids"][:2]
    contexts = ["How often do passwords rotate? Every 90 days.", "The VPN client is Tunnelwerk."]
    calibration = RefusalCalibration(tokens, 1000.0, 0.1, {}, 2000.0, Vocabulary.from_contexts(contexts))
    path = _copy_adapter(tiny_adapters["r2"], tiny_adapters["r2"].parent / "calibrated")
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "refusal_calibration": calibration.as_dict()}))
    assert client.post("/v1/load_lora_adapter", json={"lora_name": "cal", "lora_path": str(path)}).status_code == 200

    def answer(model, content):
        response = chat(client, model=model, messages=[{"role": "user", "content": content}], max_tokens=2,
                        temperature=0)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["message"]["content"]

    refusal = service.tokenizer.decode(tokens)
    unsupported = user_message([{"text": contexts[0], "heading_path": ["IT"]}], "Which laptop do engineers get?")
    supported = user_message([{"text": contexts[0], "heading_path": ["IT"]}], "How often do passwords rotate?")
    assert answer("cal", unsupported) == refusal  # support 0: bias +1000
    # support 1: bias -1000 on tokens the raw adapter does not choose anyway (without the support term it
    # would be +1000 and refuse as above)
    assert answer("cal", supported) == answer("r2", supported) != refusal
    assert answer("r2", unsupported) != refusal  # the raw adapter does not say it by itself
    assert answer("cal", "Hello there") == answer("r2", "Hello there")  # not the training format: no bias
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "cal"}).status_code == 200
