"""A tenant never reaches another tenant's adapter: every tenant × model × route, against real processes.

A name a tenant may not call answers exactly like a name that does not exist, so the answer says
nothing about other tenants. Load and unload are admin-only and never reach the upstream for a tenant.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.gateway.conftest import K_ADMIN, K_FIN, K_HR, K_LEGAL

KEYS = {"hr": K_HR, "legal": K_LEGAL, "fin": K_FIN}
ALLOWED = {"hr": {"hr-bot", "hr-v1", "base-model"}, "legal": {"legal-v1", "late-v1"}, "fin": {"fin-v1"}}
NAMES = ["hr-bot", "hr-v1", "hr-v2", "legal-v1", "late-v1", "fin-v1", "base-model", "no-such-model", "spare"]
ROUTES = [("/v1/chat/completions", False), ("/v1/chat/completions", True), ("/v1/completions", False),
          ("/v1/completions", True)]


def _body(path: str, model: str, stream: bool) -> dict:
    body = {"model": model, "max_tokens": 3, "stream": stream}
    if path.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": "Wie viele Urlaubstage?"}]
    else:
        body["prompt"] = "Wie viele Urlaubstage?"
    return body


def _stats(upstream) -> dict:
    return httpx.get(upstream.url + "/stats").json()


def test_every_tenant_reaches_only_its_own_models_on_every_route(gateway, upstream):
    before = _stats(upstream)["models"]
    served: dict[str, int] = {}
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        for tenant, key in KEYS.items():
            for name in NAMES:
                for path, stream in ROUTES:
                    response = client.post(path, json=_body(path, name, stream),
                                           headers={"authorization": f"Bearer {key}"})
                    where = f"{tenant} → {name} on {path} (stream={stream})"
                    if name in ALLOWED[tenant]:
                        assert response.status_code == 200, f"{where}: {response.status_code} {response.text}"
                        target = response.headers["x-sovllm-model"]
                        assert target == name or (name == "hr-bot" and target in ("hr-v1", "hr-v2")), where
                        served[target] = served.get(target, 0) + 1
                        if stream:
                            events = [line for line in response.text.split("\n\n") if line.strip()]
                            assert events[-1] == "data: [DONE]", where
                            data = [json.loads(e[6:]) for e in events[:-1]]
                            assert all(d["model"] == target for d in data), where
                            assert not any(d.get("usage") for d in data), f"{where}: usage event not asked for"
                        else:
                            assert response.json()["usage"]["completion_tokens"] == 3, where
                    else:
                        assert response.status_code == 404, f"{where}: {response.status_code} {response.text}"
                        assert response.json() == {"error": {"message": f"The model `{name}` does not exist.",
                                                             "type": "NotFoundError", "param": "model",
                                                             "code": 404}}, where
    after = _stats(upstream)["models"]
    reached = {m: after[m]["requests"] - before.get(m, {}).get("requests", 0) for m in after}
    assert {m: n for m, n in reached.items() if n} == served  # nothing else reached the upstream
    assert served.get("late-v1") == 4  # loaded at runtime on first use, then served
    assert _stats(upstream)["loads"].get("late-v1") == 1  # one load, not one per request


def test_models_lists_only_the_tenants_own_names(gateway):
    for tenant, key in KEYS.items():
        response = httpx.get(gateway.url + "/v1/models", headers={"authorization": f"Bearer {key}"})
        assert response.status_code == 200
        assert {m["id"] for m in response.json()["data"]} == ALLOWED[tenant]


@pytest.mark.parametrize("path", ["/v1/load_lora_adapter", "/v1/unload_lora_adapter"])
def test_tenants_cannot_load_or_unload_and_nothing_reaches_the_upstream(gateway, upstream, path):
    loads = _stats(upstream)["loads"]
    for key in KEYS.values():
        response = httpx.post(gateway.url + path, json={"lora_name": "spare", "lora_path": "/adapters/spare"},
                              headers={"authorization": f"Bearer {key}"})
        assert response.status_code == 403
        assert response.json()["error"]["type"] == "PermissionDeniedError"
    assert _stats(upstream)["loads"] == loads
    with httpx.Client(base_url=gateway.url) as client:  # the tenant still cannot call it by name
        response = client.post("/v1/completions", json=_body("/v1/completions", "spare", False),
                               headers={"authorization": f"Bearer {K_LEGAL}"})
        assert response.status_code == 404


def test_the_admin_loads_on_every_upstream_and_may_call_it(gateway, upstream):
    response = httpx.post(gateway.url + "/v1/load_lora_adapter",
                          json={"lora_name": "spare", "lora_path": "/adapters/spare"},
                          headers={"authorization": f"Bearer {K_ADMIN}"})
    assert response.status_code == 200, response.text
    assert _stats(upstream)["loads"]["spare"] == 1
    response = httpx.post(gateway.url + "/v1/completions", json=_body("/v1/completions", "spare", False),
                          headers={"authorization": f"Bearer {K_ADMIN}"})
    assert response.status_code == 200  # the admin may call every adapter the gateway knows
    for key in KEYS.values():  # still no tenant may
        response = httpx.post(gateway.url + "/v1/completions", json=_body("/v1/completions", "spare", False),
                              headers={"authorization": f"Bearer {key}"})
        assert response.status_code == 404


@pytest.mark.parametrize("auth", [None, "Bearer wrong-key", "Basic " + K_HR, "Bearer " + K_HR[:-1], "Bearer", "bearer " + K_HR + "x"])
@pytest.mark.parametrize("method,path", [("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
                                         ("POST", "/v1/completions"), ("POST", "/v1/feedback"),
                                         ("POST", "/v1/load_lora_adapter")])
def test_no_valid_key_no_access(gateway, auth, method, path):
    headers = {"authorization": auth} if auth is not None else {}
    response = httpx.request(method, gateway.url + path, headers=headers,
                             json=_body("/v1/completions", "hr-v1", False))
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_unknown_routes_are_not_passed_through(gateway):
    for path in ("/v1/embeddings", "/v1/../health", "/v1/models/hr-v1", "/tokenize", "/v1/audio/transcriptions"):
        response = httpx.post(gateway.url + path, json={"model": "hr-v1", "input": "x"},
                              headers={"authorization": f"Bearer {K_HR}"})
        assert response.status_code in (404, 405), path
        assert "error" in response.json()
