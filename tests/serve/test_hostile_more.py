"""More hostile and careless input (issue 26, second round): each case once broke the server — a 500,
a request that waited forever, an adapter request answered by the base model, or memory that grew
with every request — and is now refused with a 400/404 or served correctly."""

from __future__ import annotations

import os
import shutil
import threading
import time

import pytest

from tests.serve.conftest import submit
from tests.serve.test_hostile import error_of, greedy, idle, server  # noqa: F401 - `server` is a fixture


def _wait_idle(service, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while not idle(service) and time.monotonic() < deadline:
        time.sleep(0.02)
    return idle(service)


def test_n_equal_to_max_num_seqs_with_a_cached_prefix_is_served(tiny_model_dir):
    """With every slot free, a request for n = --max-num-seqs sequences whose prompt shares a cached
    prefix used to wait forever (its source slot was kept out of its group), blocking everyone behind it."""
    from sovllm.models.tokenizer import load_tokenizer
    from sovllm.serve.engine import Engine

    engine = Engine(tiny_model_dir, load_tokenizer(tiny_model_dir), max_num_seqs=2, max_model_len=128)
    engine.start()
    try:
        head = list(range(5, 30))  # a shared prefix longer than the cache's minimum (16)
        submit(engine, head + [40, 41], max_tokens=2, temperature=0).wait(60)
        both = submit(engine, head + [50, 51, 52], max_tokens=3, temperature=0, n=2)
        assert both.done.wait(60), "the request never got its slots"
        assert both.tokens(0) == both.tokens(1) and len(both.tokens(0)) == 3
        deadline = time.monotonic() + 10
        while len(engine._free) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(engine._free) == 2
    finally:
        engine.shutdown()


def test_a_request_queued_when_its_adapter_is_unloaded_is_never_answered_by_the_base(server, tiny_adapters):
    client, service, root = server
    engine = service.engine
    path = root / "queued"
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(tiny_adapters["r2"], path)
    assert client.post("/v1/load_lora_adapter", json={"lora_name": "queued", "lora_path": str(path)}).status_code == 200
    base, adapted = greedy(client), greedy(client, model="queued")
    assert base != adapted
    gate, entered, result = threading.Event(), threading.Event(), {}
    blocker = threading.Thread(target=lambda: engine.call(lambda: (entered.set(), gate.wait(30))), daemon=True)
    blocker.start()  # the engine thread waits in a command: what follows queues up behind it
    assert entered.wait(30)
    request = threading.Thread(target=lambda: result.update(c=client.post("/v1/completions", json={
        "model": "queued", "prompt": "Hello there", "max_tokens": 8, "temperature": 0, "ignore_eos": True})),
        daemon=True)
    request.start()
    deadline = time.monotonic() + 30
    while engine._waiting.qsize() < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    unload = threading.Thread(target=lambda: result.update(u=client.post("/v1/unload_lora_adapter",
                                                                         json={"lora_name": "queued"})), daemon=True)
    unload.start()
    while engine._commands.qsize() < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    gate.set()
    for t in (blocker, request, unload):
        t.join(60)
    completion, unloaded = result["c"], result["u"]
    if completion.status_code == 200:  # served by the adapter, then unloaded
        assert completion.json()["choices"][0]["text"] == adapted
    else:
        assert error_of(completion, 404)["param"] == "model"
    if unloaded.status_code != 200:  # refused while the request was queued: retry now it is done
        assert unloaded.status_code == 409
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "queued"}).status_code == 200
    assert _wait_idle(service)


def test_a_request_for_an_adapter_unloaded_after_validation_gets_404(tiny_model_dir, tiny_adapters):
    """The race behind the case above, in the engine: a request that passed `validate` and reaches
    admission after its adapter is gone is answered with 404, never run on the base model."""
    from sovllm.models.tokenizer import load_tokenizer
    from sovllm.serve.engine import Engine

    engine = Engine(tiny_model_dir, load_tokenizer(tiny_model_dir), max_num_seqs=2, max_model_len=128)
    engine.start()
    try:
        engine.load_adapter("gone", tiny_adapters["r2"])
        real_validate = engine.validate

        def validate_then_unload(prompt_ids, params, adapter):
            real_validate(prompt_ids, params, adapter)
            engine.unload_adapter("gone")  # the unload wins the race right after the check

        engine.validate = validate_then_unload
        collector = submit(engine, [5, 6, 7], adapter="gone", max_tokens=4, temperature=0).wait(60)
        assert collector.tokens() == []
        assert collector.events[-1]["finish_reason"] == "error" and collector.events[-1]["status"] == 404
        assert len(engine._free) == 2
    finally:
        engine.shutdown()


@pytest.mark.parametrize("how", ["nul", "loop", "long-name", "long-path", "no-user"])
def test_an_unusable_lora_path_gets_400_naming_lora_path(server, how):
    client, service, root = server
    if how == "nul":
        path = f"{root}/a\x00b"
    elif how == "loop":
        path = root / "loop"
        if not path.is_symlink():
            os.symlink(path, path)
        path = str(path)
    elif how == "long-name":
        path = f"{root}/{'x' * 5000}"
    elif how == "long-path":
        path = f"{root}/" + ("y" * 200 + "/") * 30
    else:
        path = "~no-such-user-sovllm/adapter"
    response = client.post("/v1/load_lora_adapter", json={"lora_name": f"path-{how}", "lora_path": path})
    assert response.status_code in (400, 404), response.text
    error = response.json()["error"]
    assert error["param"] == "lora_path"
    assert len(error["message"]) < 1000
    assert f"path-{how}" not in service.adapters
    assert client.get("/health").status_code == 200


def test_adapter_names_a_client_makes_up_do_not_accumulate(server):
    client, service, _ = server
    for i in range(20):
        client.post("/v1/unload_lora_adapter", json={"lora_name": f"ghost-{i}"})
        client.post("/v1/load_lora_adapter", json={"lora_name": f"ghost-{i}", "lora_path": "/nowhere"})
        client.post("/v1/load_lora_adapter", json={"lora_name": "y" * 100_000 + str(i), "lora_path": "/nowhere"})
    response = client.post("/v1/unload_lora_adapter", json={"lora_name": "z" * 100_000})
    assert len(error_of(response, 404)["message"]) < 1000
    assert len(service._locks) == 0


def test_min_tokens_with_a_finished_grammar_ends_the_json_instead_of_500(server):
    """A grammar that allows only a stop token (the JSON is complete) wins over min_tokens; blocking
    the stop token too used to leave no token to sample (500 at temperature > 0)."""
    client, service, _ = server
    for temperature in (1.0, 0.0):
        response = client.post("/v1/chat/completions", json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40, "min_tokens": 30,
            "temperature": temperature, "seed": 1,
            "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "boolean"}}}})
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        assert choice["message"]["content"] in ("true", "false")
        assert choice["finish_reason"] == "stop"
    assert _wait_idle(service)


def test_stop_token_ids_still_stop_with_ignore_eos(server):
    """As in vLLM: ignore_eos ignores the model's end-of-sequence tokens, not the stop_token_ids asked for."""
    _, service, _ = server
    prompt = [5, 6, 7, 8]
    free = submit(service.engine, prompt, max_tokens=12, temperature=0, ignore_eos=True).wait(60).tokens()
    stop_id = free[3]
    first = free.index(stop_id)
    stopped = submit(service.engine, prompt, max_tokens=12, temperature=0, ignore_eos=True,
                     stop_token_ids=[stop_id]).wait(60)
    assert stopped.tokens() == free[:first + 1]
    assert stopped.events[-1]["finish_reason"] == "stop"


@pytest.mark.parametrize("schema, words", [
    ({"enum": ["x" * 30000, "x" * 29999 + "y"]}, "enum string"),
    ({"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(2000)}}, "properties"),
])
def test_schemas_that_compile_for_minutes_are_refused_quickly(server, schema, words):
    """Within the 64 KB bound, two long enum strings with a shared prefix compiled for over a minute
    and 2,000 optional properties for about a minute, each holding a worker thread the whole time."""
    client, service, _ = server
    response = client.post("/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
        "response_format": {"type": "json_schema", "json_schema": {"name": "costly", "schema": schema}}})
    error = error_of(response)  # refused before compiling: a compiled schema would be served
    assert words in error["message"] and error["param"] == "response_format"
    assert idle(service)


@pytest.mark.parametrize("route, body", [("/v1/completions", {"prompt": "Hi"}),
                                         ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})])
def test_an_unknown_model_name_is_quoted_cut_short_in_the_404(server, route, body):
    """The 404 quoted the client's model name in full: up to the 4 MiB body limit, echoed back."""
    client, _, _ = server
    response = client.post(route, json={"model": "m" * 1_000_000, "max_tokens": 1, **body})
    error = error_of(response, 404)
    assert error["param"] == "model"
    assert error["message"] == f"The model `{'m' * 200}...` does not exist."


@pytest.mark.parametrize("route, body", [("/v1/completions", {"prompt": "Hi"}),
                                         ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})])
def test_stream_options_without_stream_gets_400_naming_it(server, route, body):
    """As in vLLM: stream_options without `stream: true` is a client mistake (no usage chunk would come)."""
    client, _, _ = server
    body = {"model": "tiny", "max_tokens": 1, **body}
    for stream in ({}, {"stream": False}):
        error = error_of(client.post(route, json={**body, **stream, "stream_options": {"include_usage": True}}))
        assert error["param"] == "stream_options" and "stream=True" in error["message"]
    assert client.post(route, json={**body, "stream_options": None}).status_code == 200
    with client.stream("POST", route, json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        assert '"usage": {' in "".join(r.iter_text())


@pytest.mark.parametrize("file", ["adapter_config.json", "manifest.json"])
def test_an_oversized_adapter_config_or_manifest_is_refused_unread(tiny_adapters, tmp_path, file):
    """inspect_adapter read both files whole, before the config's 1 MB bound in lora_check applied."""
    from sovllm.errors import AdapterError
    from sovllm.models.adapter import MAX_MANIFEST_BYTES, inspect_adapter
    from sovllm.models.lora_check import MAX_CONFIG_BYTES

    limit = MAX_CONFIG_BYTES if file == "adapter_config.json" else MAX_MANIFEST_BYTES
    path = tmp_path / "adapter"
    shutil.copytree(tiny_adapters["r2"], path)
    target = path / file
    with open(target, "ab") as handle:  # trailing blanks: still valid JSON, exactly at the bound
        handle.write(b" " * (limit - target.stat().st_size))
    assert inspect_adapter(path).rank == 2
    with open(target, "ab") as handle:
        handle.write(b" ")
    with pytest.raises(AdapterError, match=rf"{file}: larger than {limit:,} bytes"):
        inspect_adapter(path)
