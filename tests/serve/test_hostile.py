"""Hostile and careless input against the server (in-process, tiny model): each is refused with a 400
naming what is wrong, fails only its own request, and leaves the server serving everyone else."""

from __future__ import annotations

import json
import shutil
import struct
import threading
import time

import pytest
from fastapi.testclient import TestClient

from sovllm.serve.server import build
from tests.serve.conftest import submit


@pytest.fixture(scope="module")
def server(tiny_model_dir, tiny_adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter-root")
    app, service = build(str(tiny_model_dir), served_name="tiny", max_model_len=512, max_num_seqs=4,
                         adapter_roots=[root])
    client = TestClient(app)
    client.__enter__()
    client.portal.call(service.warm_up)
    yield client, service, root
    client.__exit__(None, None, None)
    service.engine.shutdown()


def greedy(client, model="tiny", prompt="Hello there", tokens=8) -> str:
    response = client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": tokens,
                                                     "temperature": 0, "ignore_eos": True})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def idle(service) -> bool:
    engine = service.engine
    return len(engine._free) == engine.max_num_seqs and not engine.busy


def error_of(response, status=400) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


@pytest.mark.parametrize("body, param_text", [
    ({"prompt": [1_000_000_000]}, "out of vocabulary"),
    ({"prompt": [-5]}, "out of vocabulary"),
    ({"prompt": [[1, 2], [3, 99_999_999]]}, "out of vocabulary"),
    ({"prompt": [2**64 + 1]}, "out of vocabulary"),
    ({"prompt": "Hi", "seed": 2**64}, "seed"),
    ({"prompt": "Hi", "seed": -(2**63) - 1}, "seed"),
    ({"prompt": "Hi", "stop_token_ids": [-1], "min_tokens": 3}, "out of vocabulary"),
    ({"prompt": "Hi", "stop_token_ids": [10**12]}, "out of vocabulary"),
    ({"prompt": ["Hi"] * 200}, "--max-num-seqs"),
])
def test_out_of_range_values_get_400_at_the_door_and_nothing_leaks(server, body, param_text):
    client, service, _ = server
    before = greedy(client)
    error = error_of(client.post("/v1/completions", json={"model": "tiny", "max_tokens": 4, **body}))
    assert param_text in error["message"]
    assert error["type"] == "BadRequestError"
    assert idle(service)  # no slot held, nothing queued
    assert greedy(client) == before


def test_the_largest_valid_seed_works(server):
    client, _, _ = server
    response = client.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 3,
                                                    "seed": 2**63 - 1, "n": 2, "temperature": 1.0})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("where", ["content", "prompt", "model", "stop", "lora_name"])
def test_lone_surrogates_get_400_json(server, where):
    client, service, _ = server
    bad = "abc\ud800def"
    if where == "content":
        path, body = "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": bad}]}
    elif where == "prompt":
        path, body = "/v1/completions", {"model": "tiny", "prompt": bad}
    elif where == "model":
        path, body = "/v1/completions", {"model": bad, "prompt": "Hi"}
    elif where == "stop":
        path, body = "/v1/completions", {"model": "tiny", "prompt": "Hi", "stop": [bad]}
    else:
        path, body = "/v1/load_lora_adapter", {"lora_name": bad, "lora_path": "/nowhere"}
    raw = json.dumps(body)  # ensure_ascii: the surrogate travels as the valid JSON escape \ud800
    assert "\\ud800" in raw
    response = client.post(path, content=raw, headers={"content-type": "application/json"})
    assert "surrogate" in error_of(response)["message"]
    assert idle(service)
    assert client.get("/metrics").status_code == 200


def test_a_failing_forward_pass_fails_only_its_own_request(tiny_model_dir):
    """A request that makes the model raise (here: a poisoned token id, past the door on purpose) is
    answered with an error; a bystander in the same batches finishes exactly as it would alone."""
    from sovllm.models.tokenizer import load_tokenizer
    from sovllm.serve.engine import Engine

    engine = Engine(tiny_model_dir, load_tokenizer(tiny_model_dir), max_num_seqs=4, max_model_len=256)
    engine.start()
    try:
        alone = submit(engine, [5, 6, 7, 8], max_tokens=12, temperature=0, ignore_eos=True).wait().tokens()
        real_forward, poison = engine._forward, 77

        def forward(input_ids, *args, **kwargs):
            if (input_ids == poison).any():
                raise RuntimeError("poisoned row")
            return real_forward(input_ids, *args, **kwargs)

        engine._forward = forward
        # both arrive together: one batched prefill, which fails, then each alone
        engine.call(lambda: None)
        in_prefill = submit(engine, [poison, 9, 10, 11], max_tokens=12, temperature=0)
        bystander = submit(engine, [5, 6, 7, 8], max_tokens=12, temperature=0, ignore_eos=True)
        for c in (in_prefill, bystander):
            c.wait(60)
        assert bystander.tokens() == alone
        failed = [e for e in in_prefill.events if e["finish_reason"]]
        assert failed and failed[-1]["finish_reason"] == "error" and "poisoned" in failed[-1]["error"]
        deadline = time.monotonic() + 10
        while len(engine._free) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(engine._free) == 4 and not engine._running  # every slot back
        assert engine.health() is None
    finally:
        engine.shutdown()


def test_a_failing_decode_row_fails_alone(tiny_model_dir):
    from sovllm.models.tokenizer import load_tokenizer
    from sovllm.serve.engine import Engine

    engine = Engine(tiny_model_dir, load_tokenizer(tiny_model_dir), max_num_seqs=4, max_model_len=256)
    engine.start()
    try:
        alone = submit(engine, [5, 6, 7, 8], max_tokens=10, temperature=0, ignore_eos=True).wait().tokens()
        real_forward = engine._forward

        def forward(input_ids, positions, *args, **kwargs):
            if input_ids.shape[1] == 1 and (input_ids == 41).any():  # decode steps only
                raise RuntimeError("bad decode row")
            return real_forward(input_ids, positions, *args, **kwargs)

        victim_prompt = [41, 41, 41]
        engine._forward = forward
        bystander = submit(engine, [5, 6, 7, 8], max_tokens=10, temperature=0, ignore_eos=True)
        victim = submit(engine, victim_prompt, max_tokens=10, temperature=0, ignore_eos=True, stop_token_ids=[])
        # make the victim's sampled token the poison: its first decode step then holds id 41
        real_accept = engine._accept

        def accept(seq, logits):
            if seq.request.prompt_ids == victim_prompt:
                logits = logits.clone()
                logits[41] = 1e9
            return real_accept(seq, logits)

        engine._accept = accept
        bystander.wait(60)
        victim.wait(60)
        assert bystander.tokens() == alone
        assert victim.events[-1]["finish_reason"] == "error"
        assert not engine._running and len(engine._free) == 4
    finally:
        engine.shutdown()


def test_health_turns_unhealthy_when_the_engine_dies_or_stalls(tiny_model_dir):
    app, service = build(str(tiny_model_dir), served_name="tiny", max_model_len=256, max_num_seqs=2)
    with TestClient(app) as client:
        client.portal.call(service.warm_up)
        assert client.get("/health").status_code == 200
        engine = service.engine
        # stalled: an engine-thread command that does not return while a request waits
        release = threading.Event()
        engine.stall_seconds = 0.5
        blocker = threading.Thread(target=lambda: engine.call(lambda: release.wait(30)), daemon=True)
        blocker.start()
        waiting = submit(engine, [5, 6, 7], max_tokens=2, temperature=0)
        deadline = time.monotonic() + 30  # until the stall is noticed (after stall_seconds without progress)
        stalled = client.get("/health")
        while stalled.status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
            stalled = client.get("/health")
        release.set()
        waiting.wait(60)
        assert stalled.status_code == 503 and "no progress" in stalled.json()["reason"]
        deadline = time.monotonic() + 10
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # dead: the engine thread ends; health says so and new requests get 503, not a hang
        engine._iteration = lambda: (_ for _ in ()).throw(SystemExit("engine thread killed"))
        engine._wake.set()
        engine._thread.join(10)
        health = client.get("/health")
        assert health.status_code == 503 and "not running" in health.json()["reason"]
        refused = client.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 2})
        assert error_of(refused, 503)["type"] == "ServiceUnavailableError"
    engine.shutdown()


def test_success_is_counted_before_the_client_hears_of_it(tiny_model_dir):
    """The final event is sent after the metrics are updated: a scrape right after a response sees it."""
    from sovllm.models.tokenizer import load_tokenizer
    from sovllm.serve.engine import Engine, Request
    from sovllm.serve.metrics import Metrics
    from sovllm.serve.sampling import SamplingParams

    metrics = Metrics("tiny")
    engine = Engine(tiny_model_dir, load_tokenizer(tiny_model_dir), max_num_seqs=2, max_model_len=128,
                    metrics=metrics)
    engine.start()
    seen, done = [], threading.Event()

    def emit(event):
        if event["finish_reason"]:
            seen.append(metrics.success.labels("tiny", "length")._value.get())
            done.set()

    try:
        engine.submit(Request("m1", [5, 6, 7], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True), None,
                              emit))
        assert done.wait(60)
        assert seen == [1.0]
    finally:
        engine.shutdown()


def test_a_deeply_nested_schema_is_refused_quickly(server):
    client, _, _ = server
    schema: dict = {"type": "string"}
    for _ in range(800):
        schema = {"type": "array", "items": schema}
    response = client.post("/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
        "response_format": {"type": "json_schema", "json_schema": {"name": "deep", "schema": schema}}})
    assert "nested" in error_of(response)["message"]


def test_tokenising_runs_off_the_event_loop(server, monkeypatch):
    client, service, _ = server
    entered, release, left = threading.Event(), threading.Event(), threading.Event()
    real = service._completion_prompts

    def slow(req):
        entered.set()
        release.wait(30)
        left.set()
        return real(req)

    monkeypatch.setattr(service, "_completion_prompts", slow)
    result = {}
    worker = threading.Thread(target=lambda: result.update(
        r=client.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 2})))
    worker.start()
    assert entered.wait(30)
    health = client.get("/health")  # on a blocked event loop this would wait until the tokenizer gives up
    answered_while_busy = not left.is_set()
    release.set()
    worker.join(60)
    assert health.status_code == 200 and answered_while_busy
    assert result["r"].status_code == 200


# --- adapters ------------------------------------------------------------------------------------

def _copy(src, root, name):
    dest = root / name
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest)
    return dest


def _edit_config(path, **changes):
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


def _safetensors(header: dict, payload: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + payload


def _break(path, how):
    weights = path / "adapter_model.safetensors"
    if how == "config-list":
        (path / "adapter_config.json").write_text("[1, 2]")
    elif how == "r-string":
        _edit_config(path, r="eight")
    elif how == "r-zero":
        _edit_config(path, r=0)
    elif how == "r-absurd":
        _edit_config(path, r=10**9)
    elif how == "r-mismatch":
        _edit_config(path, r=8)  # the weights are rank 2
    elif how == "rank-pattern":
        _edit_config(path, rank_pattern={"q_proj": 128})
    elif how == "pissa":
        _edit_config(path, init_lora_weights="pissa")
    elif how == "olora":
        _edit_config(path, init_lora_weights="olora")
    elif how == "layer-replication":
        _edit_config(path, layer_replication=[[0, 2], [1, 2]])
    elif how == "unknown-field":
        _edit_config(path, some_future_feature={"on": True})
    elif how == "empty-weights":
        weights.write_bytes(b"")
    elif how == "garbage-weights":
        weights.write_bytes(b"\x00garbage" * 100)
    elif how == "huge-header":
        weights.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    elif how == "wrong-shape":
        header = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
                  {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
                  "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight":
                  {"dtype": "F32", "shape": [3, 2], "data_offsets": [24, 48]}}
        weights.write_bytes(_safetensors(header, b"\x00" * 48))
    elif how == "manifest-list":
        (path / "manifest.json").write_text("[]")
    elif how == "nan-weights":
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(weights))
        first = sorted(tensors)[0]
        tensors[first][0, 0] = float("nan")
        save_file(tensors, str(weights))


BROKEN = {"config-list": "JSON object", "r-string": "'r'", "r-zero": "'r'", "r-absurd": "'r'",
          "r-mismatch": "shape", "rank-pattern": "rank_pattern", "pissa": "init_lora_weights",
          "olora": "init_lora_weights", "layer-replication": "layer_replication",
          "unknown-field": "some_future_feature", "empty-weights": "safetensors",
          "garbage-weights": "safetensors", "huge-header": "safetensors", "wrong-shape": "shape",
          "manifest-list": "manifest.json", "nan-weights": "NaN"}


@pytest.mark.parametrize("how", sorted(BROKEN))
def test_a_malformed_or_base_changing_adapter_gets_400_naming_the_field(server, tiny_adapters, how):
    client, service, root = server
    base_before = greedy(client)
    path = _copy(tiny_adapters["r2"], root, f"bad-{how}")
    _break(path, how)
    response = client.post("/v1/load_lora_adapter", json={"lora_name": f"bad-{how}", "lora_path": str(path)})
    error = error_of(response)
    assert BROKEN[how] in error["message"], error["message"]
    assert str(path) in error["message"]
    assert f"bad-{how}" not in service.adapters
    assert greedy(client) == base_before  # the base model is untouched
    assert idle(service)


def test_a_good_adapter_still_loads_and_changes_only_its_own_answers(server, tiny_adapters):
    client, service, root = server
    base = greedy(client)
    path = _copy(tiny_adapters["r4"], root, "good")
    assert client.post("/v1/load_lora_adapter", json={"lora_name": "good", "lora_path": str(path)}).status_code == 200
    try:
        assert greedy(client, model="good") != base
        assert greedy(client) == base
    finally:
        client.post("/v1/unload_lora_adapter", json={"lora_name": "good"})


def test_load_failure_labels_stay_bounded_and_valid(server):
    client, _, _ = server
    size = len(client.get("/metrics").content)
    for i in range(5):
        client.post("/v1/load_lora_adapter", json={"lora_name": "x" * 100_000 + str(i), "lora_path": "/nowhere"})
    client.post("/v1/load_lora_adapter", content=json.dumps({"lora_name": "a\udc00", "lora_path": "/x"}),
                headers={"content-type": "application/json"})
    after = client.get("/metrics")
    assert after.status_code == 200
    assert len(after.content) < size + 2_000
    assert "x" * 100 not in after.text


def test_the_watched_folder_skips_a_bad_adapter_once_and_keeps_loading_and_unloading(server, tiny_adapters,
                                                                                   tmp_path, caplog):
    client, service, _ = server
    folder = tmp_path / "watched"
    folder.mkdir()
    service.adapter_roots.append(folder.resolve())
    bad = _copy(tiny_adapters["r2"], folder, "a-bad")
    (bad / "adapter_config.json").write_text('"not an object"')
    _copy(tiny_adapters["r2"], folder, "b-good")
    watched, failed = {}, {}

    def signature(sub):
        config, weights = (sub / "adapter_config.json").stat(), (sub / "adapter_model.safetensors").stat()
        return config.st_mtime_ns, weights.st_mtime_ns, weights.st_size

    caplog.set_level("WARNING", logger="sovllm.serve")
    for _ in range(3):
        client.portal.call(service._watch_once, folder, watched, failed, signature)
    assert "b-good" in service.adapters and "a-bad" not in service.adapters
    assert sum("a-bad" in r.getMessage() for r in caplog.records) == 1  # reported once, not every scan
    shutil.rmtree(folder / "b-good")
    client.portal.call(service._watch_once, folder, watched, failed, signature)
    assert "b-good" not in service.adapters  # a removed folder is unloaded
