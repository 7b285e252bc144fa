"""Server hardening on the tiny model (in-process): vLLM metrics, API keys, the bounded queue, the watched folder."""

from __future__ import annotations

import concurrent.futures
import shutil
import time

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from sovllm.serve.server import build, read_api_keys


def start(tiny_model_dir, **kwargs):
    app, service = build(str(tiny_model_dir), served_name="tiny", max_model_len=512, **kwargs)
    client = TestClient(app)
    client.__enter__()
    client.portal.call(service.warm_up)
    return client, service


def stop(client, service):
    client.__exit__(None, None, None)
    service.engine.shutdown()


def chat(client, model="tiny", headers=None, **body):
    body = {"model": model, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 6,
            "temperature": 0, **body}
    return client.post("/v1/chat/completions", json=body, headers=headers or {})


def samples(text: str) -> dict:
    """{(sample name, sorted labels): value} of a Prometheus text exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def test_metrics_use_vllm_names_and_count_every_request(tiny_model_dir, tiny_adapters):
    client, service = start(tiny_model_dir, adapters=[("r2", str(tiny_adapters["r2"]))], max_num_seqs=4)
    try:
        before = samples(client.get("/metrics").text)
        assert chat(client).json()["choices"][0]["finish_reason"] == "length"
        stopped = chat(client, model="r2", max_tokens=200)
        reason = stopped.json()["choices"][0]["finish_reason"]
        usage = stopped.json()["usage"]
        response = client.get("/metrics")
        assert response.headers["content-type"].startswith("text/plain")
        after = samples(response.text)
        m = (("model_name", "tiny"),)

        def grew(name, labels=m):
            return after.get((name, labels), 0) - before.get((name, labels), 0)

        assert grew("vllm:request_success_total", (("finished_reason", "length"), *m)) == 1 + (reason == "length")
        assert grew("vllm:e2e_request_latency_seconds_count") == 2
        assert grew("vllm:time_to_first_token_seconds_count") == 2
        assert grew("vllm:inter_token_latency_seconds_count") == 5 + usage["completion_tokens"] - 1
        assert grew("vllm:generation_tokens_total") == 6 + usage["completion_tokens"]
        assert grew("vllm:prompt_tokens_total") == 2 * usage["prompt_tokens"]
        assert grew("sovllm:adapter_requests_total", (("adapter", "r2"), ("finished_reason", reason))) == 1
        assert grew("sovllm:adapter_requests_total", (("adapter", "__base__"), ("finished_reason", "length"))) == 1
        assert grew("sovllm:adapter_tokens_total", (("adapter", "r2"), ("kind", "generation"))) == \
            usage["completion_tokens"]
        for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
            assert after[gauge, m] == 0  # idle again
        assert after["vllm:num_preemptions_total", m] == 0
        assert any(name == "vllm:lora_requests_info" for name, _ in after)
        assert grew("vllm:prefix_cache_queries_total") == grew("vllm:prompt_tokens_total")
        assert grew("vllm:prefix_cache_hits_total") == 0  # same prompt, other adapter: nothing to reuse
        # the same long prompt twice on the base: the second prefill reuses all but its last token
        long = [{"role": "user", "content": "Tell me what the incident runbook says. " * 6}]
        first = chat(client, messages=long).json()["usage"]["prompt_tokens"]
        chat(client, messages=long)
        again = samples(client.get("/metrics").text)
        assert again["vllm:prefix_cache_hits_total", m] - after["vllm:prefix_cache_hits_total", m] == first - 1
        assert again["vllm:prefix_cache_queries_total", m] - after["vllm:prefix_cache_queries_total", m] == 2 * first
        assert client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/nowhere"}).status_code >= 400
        failures = samples(client.get("/metrics").text)
        assert failures["sovllm:adapter_load_failures_total", (("adapter", "x"),)] == 1
    finally:
        stop(client, service)


def test_api_key_guards_v1_but_not_probes(tiny_model_dir):
    client, service = start(tiny_model_dir, api_keys=["s3cret"], max_num_seqs=2)
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = client.get("/v1/models", headers=headers)
            assert response.status_code == 401
            error = response.json()["error"]
            assert error["type"] == "AuthenticationError" and error["code"] == "invalid_api_key"
            assert chat(client, headers=headers).status_code == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert client.get("/v1/models", headers=ok).status_code == 200
        assert chat(client, headers=ok).status_code == 200
        assert client.get("/health").status_code == 200 and client.get("/metrics").status_code == 200
        assert client.get("/v1/no/such/route", headers=ok).status_code == 404
        counted = samples(client.get("/metrics").text)
        http = {labels: value for (name, labels), value in counted.items() if name == "http_requests_total"}
        # vLLM's names (prometheus-fastapi-instrumentator): route template, method, status class
        assert http[(("handler", "/v1/models"), ("method", "GET"), ("status", "4xx"))] == 3
        assert http[(("handler", "/v1/chat/completions"), ("method", "POST"), ("status", "4xx"))] == 3
        assert http[(("handler", "/v1/chat/completions"), ("method", "POST"), ("status", "2xx"))] == 1
        assert http[(("handler", "none"), ("method", "GET"), ("status", "4xx"))] == 1  # never the raw path
        assert not any(dict(labels)["handler"] == "/metrics" for labels in http)
    finally:
        stop(client, service)


def test_api_keys_from_file_flag_and_environment(tmp_path):
    warnings = []
    key_file = tmp_path / "keys"
    key_file.write_text("one\n\n two \n")
    assert read_api_keys(key_file, None, None, warn=warnings.append) == ["one", "two"]
    assert not warnings
    assert read_api_keys(None, "lit", "env", warn=warnings.append) == ["lit", "env"]
    assert "process list" in warnings[0]
    assert read_api_keys(None, None, None) == []
    from sovllm.errors import ConfigError

    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="holds no key"):
        read_api_keys(empty, None, None)
    with pytest.raises(ConfigError, match="cannot read"):
        read_api_keys(tmp_path / "missing", None, None)


@pytest.mark.integration  # two 480-token requests one after the other keep the queue full: seconds
def test_full_queue_answers_503_with_retry_after_and_keeps_serving(tiny_model_dir):
    client, service = start(tiny_model_dir, max_num_seqs=1, max_queue=1)
    long = {"max_tokens": 480, "ignore_eos": True}
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            running = pool.submit(chat, client, **long)
            deadline = time.monotonic() + 30
            while service.engine.load()["running"] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            waiting = pool.submit(chat, client, **long)
            while service.engine.waiting < 1:
                assert time.monotonic() < deadline and not waiting.done()
                time.sleep(0.01)
            refused = chat(client)
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["type"] == "ServiceUnavailableError"
            assert running.result().status_code == 200 and waiting.result().status_code == 200
        assert chat(client).status_code == 200
    finally:
        stop(client, service)


def test_watched_adapters_dir_loads_new_and_unloads_removed(tiny_model_dir, tiny_adapters, tmp_path):
    folder = tmp_path / "adapters"
    folder.mkdir()
    client, service = start(tiny_model_dir, adapter_roots=[folder], max_num_seqs=2)
    task = client.portal.start_task_soon(service.watch, folder, 0.1)

    def served(timeout=20, want=True, name="hr"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (name in {c["id"] for c in client.get("/v1/models").json()["data"]}) == want:
                return True
            time.sleep(0.1)
        return False

    try:
        shutil.copytree(tiny_adapters["r2"], folder / "hr")
        assert served()
        assert chat(client, model="hr").status_code == 200
        (folder / "broken").mkdir()
        (folder / "broken" / "adapter_config.json").write_text("{}")
        (folder / "broken" / "adapter_model.safetensors").write_bytes(b"")
        shutil.rmtree(folder / "hr")
        assert served(want=False)
        assert chat(client, model="hr").status_code == 404
        assert "broken" not in {c["id"] for c in client.get("/v1/models").json()["data"]}
        for name in ("adapter_config.json", "adapter_model.safetensors"):  # the copy completes: retried
            shutil.copy(tiny_adapters["r4"] / name, folder / "broken" / name)
        assert served(name="broken")
        assert chat(client).status_code == 200
    finally:
        task.cancel()
        stop(client, service)


def test_oversized_bodies_get_413_before_parsing(tiny_model_dir):
    client, service = start(tiny_model_dir, max_num_seqs=2, max_body_bytes=1_000_000)
    try:
        huge = b'{"model": "tiny", "messages": [{"role": "user", "content": "' + b"x" * 10_000_000 + b'"}]}'
        for body in (huge, iter([huge[i:i + 65536] for i in range(0, len(huge), 65536)])):  # declared, chunked
            response = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
            assert response.status_code == 413, response.text
            assert response.json()["error"]["type"] == "RequestTooLargeError"
            assert chat(client).status_code == 200
    finally:
        stop(client, service)
