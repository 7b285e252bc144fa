"""The gateway in front of the real servers: the README's two-team example on `sovllm serve` with the
bundled model (an A/B split between an adapter and the base model, feedback, the report), and vLLM's
CPU build (a runtime load through the gateway, streamed usage accounted as vLLM reported it).
Both servers are the session's shared ones (tests/conftest.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from sqlalchemy import create_engine, text

from tests.gateway import procs

pytestmark = pytest.mark.integration

EXAMPLE = procs.REPO / "examples" / "gateway"
QUESTION = [{"role": "user", "content": "Context: The canteen opens at 7:00.\n\nQuestion: When does the canteen open?"}]


def _sovllm(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "sovllm", *args], capture_output=True, text=True, cwd=procs.REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_the_readme_example_two_teams_and_an_ab_split_on_the_embedded_server(tmp_path, bundled_server,
                                                                              bundled_adapters):
    root = tmp_path / "gateway"
    shutil.copytree(EXAMPLE, root, ignore=shutil.ignore_patterns("keys"))
    (root / "keys").mkdir()
    for team in ("admin", "support", "legal"):  # as the README does: sovllm gateway new-key > keys/<team>.txt
        (root / "keys" / f"{team}.txt").write_text(_sovllm("gateway", "new-key"))
    gateway = procs.gateway(root, overrides=[f"gateway.upstreams=[{{url: '{bundled_server.base_url}'}}]",
                                             f"gateway.adapters.acme={bundled_adapters['acme-b']}"])
    try:
        key = lambda team: (root / "keys" / f"{team}.txt").read_text().strip()  # noqa: E731
        support = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key("support"), max_retries=0)
        legal = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key("legal"), max_retries=0)
        assert [m.id for m in support.models.list()] == ["support-bot"]
        def ask(user):
            raw = support.chat.completions.with_raw_response.create(
                model="support-bot", messages=QUESTION, max_tokens=12, temperature=0,
                extra_headers={"x-sovllm-user": user})
            answer = raw.parse()
            assert answer.choices[0].message.content and answer.usage.completion_tokens > 0
            return answer.id, raw.headers["x-sovllm-model"]

        with ThreadPoolExecutor(8) as pool:  # eight end users at once
            answers = dict(pool.map(ask, [f"kunde-{i}" for i in range(8)]))
        assert set(answers.values()) == {"acme", "smollm2-135m-instruct"}  # both variants serve
        stream = support.chat.completions.create(model="support-bot", messages=QUESTION, max_tokens=8, stream=True,
                                                 extra_headers={"x-sovllm-user": "kunde-0"})
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        base = legal.chat.completions.create(model="smollm2-135m-instruct", messages=QUESTION, max_tokens=8)
        assert base.choices[0].message.content
        for forbidden in ("support-bot", "acme"):
            with pytest.raises(openai.NotFoundError):
                legal.chat.completions.create(model=forbidden, messages=QUESTION, max_tokens=4)
        with pytest.raises(openai.NotFoundError):
            support.chat.completions.create(model="smollm2-135m-instruct", messages=QUESTION, max_tokens=4)
        for response_id in answers:  # as the README does it, with the openai client
            reply = support.post("/feedback", cast_to=object, body={"response_id": response_id, "rating": 1})
            assert reply == {"object": "feedback", "response_id": response_id, "recorded": True}
        time.sleep(1.0)
        report = json.loads(_sovllm("ab", "report", "support-bot", "-p", str(root), "--json"))
        variants = {v["adapter"]: v for v in report["variants"]}
        assert variants["acme"]["requests"] + variants["smollm2-135m-instruct"]["requests"] == 9
        assert all(v["recommendation"] in ("control", "keep") for v in variants.values())  # 8 ratings: too few
        assert "not enough feedback" in variants["smollm2-135m-instruct"]["reason"]
        usage = {(r["tenant"], r["adapter"]): r for r in json.loads(_sovllm("usage", str(root), "--json"))}
        assert set(usage) == {("support", "acme"), ("support", "smollm2-135m-instruct"),
                              ("legal", "smollm2-135m-instruct")}
        metrics = httpx.get(gateway.url + "/metrics").text
        assert 'sovllm:adapter_requests_total{adapter="acme",finished_reason="length",tenant="support"}' in metrics \
            or 'sovllm:adapter_requests_total{adapter="acme",finished_reason="stop",tenant="support"}' in metrics
    finally:
        gateway.stop()


@pytest.mark.vllm
def test_in_front_of_vllm_a_routed_adapter_is_loaded_once_and_streamed_usage_is_accounted(
        tmp_path, vllm_server, vllm_adapters):
    adapters, _ = vllm_adapters
    key = "sk-vllm-tenant-" + "9" * 20
    root = procs.project(tmp_path, {"upstreams": [{"url": vllm_server.base_url}],
                                    "tenants": {"ops": {"keys": [procs.hashed(key)], "models": ["gw-late"]}},
                                    "adapters": {"gw-late": str(adapters["acme-b"])}})
    gateway = procs.gateway(root)
    try:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
        seen = []
        for stream in (False, True, True):
            if stream:
                chunks = list(client.chat.completions.create(model="gw-late", messages=QUESTION, max_tokens=6,
                                                             stream=True, stream_options={"include_usage": True}))
                seen.append((chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens))
            else:
                answer = client.chat.completions.create(model="gw-late", messages=QUESTION, max_tokens=6)
                seen.append((answer.usage.prompt_tokens, answer.usage.completion_tokens))
        chunks = list(client.chat.completions.create(model="gw-late", messages=QUESTION, max_tokens=6, stream=True))
        assert not any(c.usage for c in chunks)  # not asked for: the gateway's own usage event is dropped
        assert "gw-late" in {m["id"] for m in httpx.get(vllm_server.base_url + "/models").json()["data"]}
        time.sleep(1.0)
        engine = create_engine(f"sqlite:///{root / 'out' / 'gateway' / 'usage.db'}")
        with engine.connect() as conn:
            rows = conn.execute(text("select prompt_tokens, completion_tokens from gateway_requests "
                                     "where status = 200 order by id")).all()
        assert [tuple(r) for r in rows[:3]] == seen and len(rows) == 4
        assert rows[3][1] > 0  # the stream without include_usage was accounted too
    finally:
        gateway.stop()
        httpx.post(vllm_server.base_url + "/unload_lora_adapter", json={"lora_name": "gw-late"})
