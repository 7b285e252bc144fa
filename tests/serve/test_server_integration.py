"""The real server with the bundled model, driven by the official `openai` client (sync, async, streaming)."""

from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

pytestmark = pytest.mark.integration
BASE = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["question", "answer", "type"],
          "properties": {"question": {"type": "string", "minLength": 5, "maxLength": 80},
                         "answer": {"type": "string", "minLength": 5, "maxLength": 120},
                         "type": {"enum": ["factual", "conceptual", "comparison"]}}}


@pytest.fixture(scope="module")
def client(bundled_server):
    return openai.OpenAI(base_url=bundled_server.base_url, api_key="unused", max_retries=0, timeout=120)


def greedy(client, model=BASE, messages=QUESTION, **kwargs):
    return client.chat.completions.create(model=model, messages=messages,
                                          **{"max_tokens": 24, "temperature": 0, **kwargs})


def first_logprob(client, model):
    """Log-probability of the first answer token: any non-zero adapter moves it."""
    return greedy(client, model=model, max_tokens=1, logprobs=True).choices[0].logprobs.content[0].logprob


def test_models_lists_base_and_adapters_like_vllm(client):
    models = {m.id: m for m in client.models.list().data}
    assert models[BASE].parent is None and models["acme-a"].parent == BASE
    assert models["acme-a"].root.endswith("acme-a")


def test_chat_completion_with_base_and_adapter(client):
    base = greedy(client)
    assert "Paris" in base.choices[0].message.content and base.choices[0].finish_reason == "stop"
    assert base.usage.completion_tokens > 0 and base.usage.prompt_tokens > 10
    assert first_logprob(client, "acme-a") != pytest.approx(first_logprob(client, BASE), abs=1e-3)


def test_text_completion_n_and_logprobs(client):
    out = client.completions.create(model=BASE, prompt="The capital of Germany is", max_tokens=6, temperature=0,
                                    n=2, logprobs=3)
    assert len(out.choices) == 2 and out.choices[0].text == out.choices[1].text
    assert "Berlin" in out.choices[0].text
    assert len(out.choices[0].logprobs.tokens) == out.usage.completion_tokens // 2
    assert all(len(top) == 3 for top in out.choices[0].logprobs.top_logprobs)


def test_chat_logprobs_and_n(client):
    out = greedy(client, logprobs=True, top_logprobs=5, n=3, temperature=0.9, seed=3)
    assert len(out.choices) == 3
    entries = out.choices[0].logprobs.content
    assert entries and all(len(e.top_logprobs) == 5 for e in entries)
    assert all(e.logprob <= 0 for e in entries)


def test_streaming_equals_non_streaming(client):
    expected = greedy(client).choices[0].message.content
    stream = client.chat.completions.create(model=BASE, messages=QUESTION, temperature=0, max_tokens=24, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_async_client_concurrent_requests_match_sequential(client, bundled_server):
    prompts = [f"Name {k} colours of the rainbow." for k in range(2, 6)]
    models = [BASE, "acme-a"]
    sequential = {(m, p): greedy(client, m, [{"role": "user", "content": p}], max_tokens=20).choices[0].message.content
                  for m in models for p in prompts}

    async def run_all():
        async_client = openai.AsyncOpenAI(base_url=bundled_server.base_url, api_key="unused", max_retries=0)
        calls = [async_client.chat.completions.create(model=m, messages=[{"role": "user", "content": p}],
                                                      temperature=0, max_tokens=20)
                 for m in models for p in prompts]
        results = await asyncio.gather(*calls)
        await async_client.close()
        return results

    concurrent = asyncio.run(run_all())
    keys = [(m, p) for m in models for p in prompts]
    assert [r.choices[0].message.content for r in concurrent] == [sequential[k] for k in keys]


def test_json_schema_output_parses_and_validates(client):
    context = "Ledgerline 7.4 was released on 18 March 2026. It supports up to 250 users on the Core edition."
    for seed in range(3):
        out = client.chat.completions.create(
            model=BASE, temperature=0.7, seed=seed, max_tokens=200,
            messages=[{"role": "user", "content": f"Context: {context}\nWrite one factual question and answer as JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": "qa", "schema": SCHEMA, "strict": True}})
        choice = out.choices[0]
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_pydantic_parse_helper(client):
    class Capital(BaseModel):
        country: str = Field(max_length=40)
        capital: str = Field(max_length=40)

    out = client.chat.completions.parse(model=BASE, messages=QUESTION, temperature=0, max_tokens=60,
                                        response_format=Capital)
    parsed = out.choices[0].message.parsed
    assert isinstance(parsed, Capital) and parsed.capital


def test_load_use_and_unload_an_adapter(client, bundled_server, bundled_adapters):
    url = bundled_server.base_url
    response = httpx.post(f"{url}/load_lora_adapter", json={"lora_name": "acme-b",
                                                            "lora_path": str(bundled_adapters["acme-b"])}, timeout=60)
    assert response.status_code == 200, response.text
    assert first_logprob(client, "acme-b") != pytest.approx(first_logprob(client, BASE), abs=1e-3)
    assert httpx.post(f"{url}/unload_lora_adapter", json={"lora_name": "acme-b"}, timeout=60).status_code == 200
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        greedy(client, model="acme-b")


def test_errors_are_openai_errors_and_the_server_keeps_serving(client):
    with pytest.raises(openai.NotFoundError):
        greedy(client, model="gpt-4o")
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        greedy(client, max_tokens=100_000)
    with pytest.raises(openai.BadRequestError, match="tools"):
        greedy(client, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    assert greedy(client).choices[0].finish_reason == "stop"


def test_greedy_output_equals_plain_generate_on_the_real_model(client, bundled_model, bundled_adapters):
    """The served tokens (base and adapter) are those of transformers + PEFT generate()."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(bundled_model.path))
    model = AutoModelForCausalLM.from_pretrained(str(bundled_model.path), dtype=torch.float32)
    reference = PeftModel.from_pretrained(model, str(bundled_adapters["acme-a"]), adapter_name="acme-a").eval()
    prompts = ["Write a haiku about Leipzig.", "Explain what a VPN does in two sentences.",
               "List three rules for strong passwords."]
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        for model_name, adapter in ((BASE, "__base__"), ("acme-a", "acme-a")):
            with torch.no_grad():
                out = reference.generate(ids, max_new_tokens=24, do_sample=False, adapter_names=[adapter],
                                         pad_token_id=tokenizer.pad_token_id)
            expected = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            served = greedy(client, model=model_name, messages=messages, max_tokens=24).choices[0].message.content
            assert served == expected, (model_name, prompt)


def test_soak_burst_of_mixed_requests_from_a_second_process(bundled_server, client, tmp_path):
    """Valid and invalid requests at once from another process: every invalid one gets its 4xx, every valid
    answer equals the same request sent alone afterwards (greedy), and the server keeps serving."""
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "soak.json"
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "tests.serve.soak_client", bundled_server.base_url, str(out)],
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    wrong = [(r["kind"], r["status"], r.get("error_type")) for r in results if r["status"] != r["expected"]]
    assert not wrong, wrong
    assert all(r["error_type"] for r in results if r["expected"] >= 400)  # OpenAI-style error JSON
    for r in (r for r in results if r["kind"].startswith("valid")):
        alone = greedy(client, model=r["model"], messages=[{"role": "user", "content": r["question"]}], max_tokens=12)
        assert (r["text"], r["finish"]) == (alone.choices[0].message.content, alone.choices[0].finish_reason), r
    assert greedy(client).choices[0].finish_reason == "stop"
