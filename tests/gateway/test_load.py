"""A bounded load test from a second process: usage adds up, an upstream killed mid-test loses no
request, and the gateway's memory stays flat over a soak."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.gateway import procs

K1, K2 = "sk-t1-" + "a" * 24, "sk-t2-" + "b" * 24


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("load")
    adapters = ["a1", "a2", "a3"]
    first = procs.upstream(tmp, adapters=adapters, tokens=8, interval=0.003, name="up-a")
    second = procs.upstream(tmp, adapters=adapters, tokens=8, interval=0.003, name="up-b")
    root = procs.project(tmp, {
        "upstreams": [{"url": first.url + "/v1"}, {"url": second.url + "/v1"}],
        "tenants": {"t1": {"keys": [procs.hashed(K1)], "models": ["a1"]},
                    "t2": {"keys": [procs.hashed(K2)], "models": ["bot"]}},
        "aliases": {"bot": {"routes": {"a2": 0.5, "a3": 0.5}}},
        "health_interval_s": 0.3,
    })
    gateway = procs.gateway(root)
    yield {"tmp": tmp, "first": first, "second": second, "gateway": gateway, "root": root}
    for proc in (gateway, first, second):
        proc.stop()


def _load(tmp, url: str, n: int, seed: int, concurrency: int = 32):
    rng = random.Random(seed)
    plan = {"url": url, "concurrency": concurrency, "requests": [
        {"tenant": t, "key": K1 if t == "t1" else K2, "model": "a1" if t == "t1" else "bot",
         "stream": rng.random() < 0.5, "user": f"user-{rng.randrange(50)}", "max_tokens": rng.randint(1, 8),
         "prompt": " ".join(["wort"] * rng.randint(1, 20))}
        for t in (rng.choice(["t1", "t2"]) for _ in range(n))]}
    plan_file, out = tmp / f"plan-{seed}.json", tmp / f"out-{seed}.json"
    plan_file.write_text(json.dumps(plan))
    return subprocess.Popen([sys.executable, "-m", "tests.gateway.load_client", str(plan_file), str(out)],
                            cwd=procs.REPO), out


def _db_sums(root) -> dict:
    engine = create_engine(f"sqlite:///{root / 'out' / 'gateway' / 'usage.db'}")
    with engine.connect() as conn:
        rows = conn.execute(text("select adapter, count(*), sum(prompt_tokens), sum(completion_tokens) "
                                 "from gateway_requests where status = 200 group by adapter")).all()
    return {adapter: [n, p, c] for adapter, n, p, c in rows}


def _upstream_sums(*upstreams) -> dict:
    sums: dict = {}
    for upstream in upstreams:
        for model, s in httpx.get(upstream.url + "/stats").json()["models"].items():
            entry = sums.setdefault(model, [0, 0, 0])
            entry[0] += s["requests"]
            entry[1] += s["prompt_tokens"]
            entry[2] += s["completion_tokens"]
    return sums


def test_usage_per_tenant_equals_what_the_upstreams_reported(setup):
    proc, out = _load(setup["tmp"], setup["gateway"].url, 400, seed=1)
    assert proc.wait(timeout=120) == 0
    results = json.loads(out.read_text())
    assert all(r["status"] == 200 and r["done"] and not r["error"] and not r["transport"] for r in results)
    time.sleep(1.0)  # the usage writer batches every 0.25 s
    db = _db_sums(setup["root"])
    assert db == _upstream_sums(setup["first"], setup["second"])
    seen: dict = {}
    for r in results:  # ... and what the clients were told
        entry = seen.setdefault(r["target"], [0, 0, 0])
        entry[0] += 1
        entry[1] += r["prompt_tokens"]
        entry[2] += r["completion_tokens"]
    assert db == seen
    assert set(db) == {"a1", "a2", "a3"}  # t1 only ever reached a1; t2's alias reached both variants
    assert all(r["target"] == "a1" for r in results if r["tenant"] == "t1")
    assert all(r["target"] in ("a2", "a3") for r in results if r["tenant"] == "t2")


def test_an_upstream_killed_and_restarted_mid_test_loses_no_request(setup):
    first = setup["first"]
    proc, out = _load(setup["tmp"], setup["gateway"].url, 600, seed=2)
    time.sleep(0.6)
    first.stop(kill=True)  # SIGKILL: its streams break off mid-answer
    time.sleep(1.0)
    restarted = procs.upstream(setup["tmp"], port=first.port, adapters=["a1", "a2", "a3"], tokens=8,
                               interval=0.003, name="up-a-again")
    setup["first"] = restarted
    assert proc.wait(timeout=180) == 0
    results = json.loads(out.read_text())
    assert not [r for r in results if r["transport"]], "requests without an HTTP answer"
    for r in results:
        clean = (r["status"] == 200 and r["done"]) or (r["status"] in (502, 503) and r["error"])
        assert clean, r
        if r["error"] and r["status"] == 200:
            assert r["done"], "an in-band error must end the stream with [DONE]"
    ok = [r for r in results if r["status"] == 200 and not r["error"]]
    assert len(ok) >= 0.9 * len(results), f"only {len(ok)} of {len(results)} answered"
    time.sleep(1.0)  # the gateway's health checks see the restarted upstream again ...
    before = httpx.get(restarted.url + "/stats").json()["models"]
    proc, out = _load(setup["tmp"], setup["gateway"].url, 40, seed=3, concurrency=4)
    assert proc.wait(timeout=60) == 0
    after = httpx.get(restarted.url + "/stats").json()["models"]
    assert sum(s["requests"] for s in after.values()) > sum(s["requests"] for s in before.values())  # ... and use it


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_gateway_memory_stays_flat_over_a_soak(setup):
    pid = setup["gateway"].proc.pid
    proc, _ = _load(setup["tmp"], setup["gateway"].url, 800, seed=4)
    assert proc.wait(timeout=180) == 0
    warm = _rss_kib(pid)
    for seed in (5, 6):
        proc, out = _load(setup["tmp"], setup["gateway"].url, 700, seed=seed)
        assert proc.wait(timeout=180) == 0
        assert all(r["status"] == 200 for r in json.loads(out.read_text()))
    grown = _rss_kib(pid) - warm
    assert grown < 8 * 1024, f"gateway RSS grew by {grown} KiB over 1400 requests after warm-up"
    assert os.path.exists(f"/proc/{pid}")
