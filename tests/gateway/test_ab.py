"""A/B on live traffic: sticky variants, feedback stored with the variant, `sovllm ab report` recommends,
`--apply` changes the running gateway's split, `sovllm ab set` rolls back; `sovllm usage` reports.
The store is SQLite and a real PostgreSQL (one throwaway cluster per module)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import require
from tests.gateway import postgres, procs

KEY, OTHER = "sk-sup-" + "e" * 24, "sk-oth-" + "f" * 24


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def ab(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"ab-{request.param}")
    database = None
    if request.param == "postgresql":
        require(postgres.binaries() is not None, "PostgreSQL (make postgres)")
        database = postgres.Postgres()
    upstream = procs.upstream(tmp, adapters=["v1", "v2", "x1"], tokens=4)
    config = {"upstreams": [{"url": upstream.url + "/v1"}],
              "tenants": {"sup": {"keys": [procs.hashed(KEY)], "models": ["bot"]},
                          "other": {"keys": [procs.hashed(OTHER)], "models": ["x1"]}},
              "aliases": {"bot": {"routes": {"v1": 0.5, "v2": 0.5}}}, "health_interval_s": 0.3}
    if database:
        config["usage_database"] = database.url
    root = procs.project(tmp, config)
    gateway = procs.gateway(root)
    yield {"gateway": gateway, "root": root, "kind": request.param}
    gateway.stop()
    upstream.stop()
    if database:
        database.stop()


_client = httpx.Client(timeout=30)


def _ask(url: str, user: str, key: str = KEY, model: str = "bot") -> httpx.Response:
    return _client.post(url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}", "x-sovllm-user": user},
                      json={"model": model, "messages": [{"role": "user", "content": "Öffnungszeiten?"}]})


def _sovllm(*args) -> str:
    done = subprocess.run([sys.executable, "-m", "sovllm", *args], capture_output=True, text=True, cwd=procs.REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _variants(url: str, users) -> dict[str, str]:
    return {user: _ask(url, user).headers["x-sovllm-model"] for user in users}


def test_ab_from_traffic_to_feedback_to_promotion_and_rollback(ab):
    url = ab["gateway"].url
    users = [f"kunde-{i}" for i in range(160)]
    first = _variants(url, users)
    assert _variants(url, users) == first  # sticky: every user stays on their variant
    assert 50 <= sum(v == "v2" for v in first.values()) <= 110  # about half (binomial, n=160)
    ratings = {}
    for i, user in enumerate(users):  # v2 answers better: rated good 80 % of the time, v1 40 %
        response = _ask(url, user)
        good = (i % 5 != 0) if response.headers["x-sovllm-model"] == "v2" else (i % 5 < 2)
        answer = _client.post(url + "/v1/feedback", headers={"authorization": f"Bearer {KEY}"},
                            json={"response_id": response.json()["id"], "rating": 1 if good else 0,
                                  "comment": "hilfreich" if good else None})
        assert answer.status_code == 200, answer.text
        ratings[response.json()["id"]] = good
    time.sleep(1.0)
    report = json.loads(_sovllm("ab", "report", "bot", "-p", str(ab["root"]), "--json", "--min-feedback", "20"))
    variants = {v["adapter"]: v for v in report["variants"]}
    assert report["control"] == "v1"  # equal weights: the first route is the control
    assert variants["v1"]["requests"] + variants["v2"]["requests"] == 480
    assert variants["v1"]["feedback"] + variants["v2"]["feedback"] == 160
    assert variants["v2"]["score"] > variants["v1"]["score"]
    low, high = variants["v2"]["score_ci"]
    assert low < variants["v2"]["score"] < high
    assert variants["v2"]["recommendation"] == "promote" and variants["v2"]["p_score"] < 0.05
    assert report["apply"]["routes"] == {"v2": 1.0}
    _sovllm("ab", "report", "bot", "-p", str(ab["root"]), "--min-feedback", "20", "--apply")
    time.sleep(1.0)  # running gateways read the new split within health_interval_s
    assert set(_variants(url, users[:40]).values()) == {"v2"}
    history = _sovllm("ab", "history", "bot", "-p", str(ab["root"]))
    assert "promote v2" in history
    _sovllm("ab", "set", "bot", "v1=0.5", "v2=0.5", "-p", str(ab["root"]), "--reason", "rollback drill")
    time.sleep(1.0)
    assert _variants(url, users) == first  # the old split, and every user back on their old variant
    usage = json.loads(_sovllm("usage", str(ab["root"]), "--json"))
    assert {(r["tenant"], r["model"], r["adapter"]) for r in usage} == {("sup", "bot", "v1"), ("sup", "bot", "v2")}
    assert sum(r["requests"] for r in usage) == 480 + 40 + 160
    assert all(r["errors"] == 0 and r["completion_tokens"] == 4 * r["requests"] for r in usage)


def test_feedback_is_checked_and_only_for_your_own_responses(ab):
    url = ab["gateway"].url
    mine = _ask(url, "someone").json()["id"]
    theirs = _ask(url, "x", key=OTHER, model="x1").json()["id"]
    post = lambda key, body: httpx.post(url + "/v1/feedback", headers={"authorization": f"Bearer {key}"}, json=body)  # noqa: E731
    assert post(KEY, {"response_id": theirs, "rating": 1}).status_code == 404
    assert post(OTHER, {"response_id": mine, "rating": 1}).status_code == 404
    assert post(KEY, {"response_id": "chatcmpl-unknown", "rating": 1}).status_code == 404
    for bad in ({"response_id": mine, "rating": 2}, {"response_id": mine, "rating": "gut"},
                {"response_id": mine, "rating": True}, {"rating": 1}, {"response_id": mine},
                {"response_id": mine, "rating": 1, "comment": "x" * 5000}):
        response = post(KEY, bad)
        assert response.status_code == 400, bad
        assert response.json()["error"]["param"] in ("rating", "response_id", "comment")
    assert post(KEY, {"response_id": mine, "rating": 0.75}).status_code == 200
