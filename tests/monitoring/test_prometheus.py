"""Alert rules, dashboards and `sovllm top` against reality: Debian's Prometheus and Pushgateway on
loopback scrape the real `sovllm serve` and the real vLLM (the session's shared servers) under a
short load, and a Pushgateway fed by a real `--quick` stage run. Every rule's expression without its
threshold and every dashboard query must parse and return series, for both engines where it
watches a server (on vLLM the per-adapter series come from sovllm's plugin)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from sovllm.config import load_config
from sovllm.monitoring import dashboards, rules
from sovllm.procs import dies_with_parent
from sovllm.serve.vllm_server import free_port
from tests.conftest import require

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "klinik"
SERVING = {"sovllm-serve", "vllm"}




def _wait(url: str, proc: subprocess.Popen, log: Path, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{url} not ready: " + log.read_text()[-3000:]
        time.sleep(0.5)


def _start(argv: list[str], log: Path, ready: str) -> subprocess.Popen:
    handle = open(log, "w")
    proc = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=dies_with_parent())  # never outlives a killed test run
    _wait(ready, proc, log)
    return proc


def _load(base_url: str, model: str, adapter: str) -> None:
    """A short load: answers on the base and an adapter, one failed adapter load, one bad request."""
    for target in (model, adapter, model, adapter):
        reply = httpx.post(f"{base_url}/chat/completions", timeout=300, json={
            "model": target, "messages": [{"role": "user", "content": "Wann endet die Besuchszeit?"}],
            "max_tokens": 6, "temperature": 0})
        assert reply.status_code == 200, reply.text
    failed = httpx.post(f"{base_url}/load_lora_adapter", timeout=60,
                        json={"lora_name": "missing", "lora_path": "/nonexistent/adapter"})
    assert 400 <= failed.status_code < 500, failed.text
    assert httpx.post(f"{base_url}/chat/completions", timeout=60, json={"model": model}).status_code == 400


def test_alerts_dashboards_and_top_read_series_that_exist_on_both_engines(tmp_path, bundled_server, vllm_server, bundled_model):
    prometheus, pushgateway = shutil.which("prometheus"), shutil.which("prometheus-pushgateway")
    require(prometheus is not None and pushgateway is not None,
            "Debian's prometheus and prometheus-pushgateway (make monitoring)")
    procs = []
    try:
        push_port = free_port("127.0.0.1")
        # Debian's build persists to /var/lib/prometheus by default: this test gets its own file
        procs.append(_start([pushgateway, f"--web.listen-address=127.0.0.1:{push_port}",
                             f"--persistence.file={tmp_path / 'pushgateway.data'}"], tmp_path / "push.log",
                            f"http://127.0.0.1:{push_port}/-/ready"))
        # the pipeline's stages push while they run: a --quick run of the small example up to synth
        project = tmp_path / "klinik"
        shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns("out"))
        exe = str(Path(sys.executable).with_name("sovllm"))
        done = subprocess.run([exe, "run", str(project), "--quick", "--until", "synth",
                               "--set", f"monitoring.pushgateway=http://127.0.0.1:{push_port}"],
                              capture_output=True, text=True, timeout=900, check=False,
                              env={k: v for k, v in os.environ.items() if k != "CI"})
        assert done.returncode == 0, done.stderr[-3000:]
        assert "could not push" not in done.stdout + done.stderr

        # the gateway in front of sovllm serve: the per-adapter view per tenant
        from tests.gateway import procs as gateway_procs

        gw_key = "sk-monitoring-" + "7" * 20
        gw_root = gateway_procs.project(tmp_path, {"upstreams": [{"url": bundled_server.base_url}], "tenants": {
            "team-a": {"keys": [gateway_procs.hashed(gw_key)], "models": [bundled_model.name, "acme-a"]}}})
        gateway = gateway_procs.gateway(gw_root)
        procs.append(gateway.proc)

        rule_file = tmp_path / "sovllm-alerts.rules.yml"
        rule_file.write_text(yaml.safe_dump(rules.rules_file(load_config(EXAMPLE)), sort_keys=False))
        targets = {"sovllm-serve": bundled_server.base_url, "vllm": vllm_server.base_url, "gateway": gateway.url}
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "rule_files": [str(rule_file)],
                  "scrape_configs": [
                      *[{"job_name": job, "static_configs": [{"targets": [urlsplit(url).netloc],
                                                              "labels": {"namespace": "test"}}]}
                        for job, url in targets.items()],
                      {"job_name": "pushgateway", "honor_labels": True,
                       "static_configs": [{"targets": [f"127.0.0.1:{push_port}"], "labels": {"namespace": "test"}}]}]}
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        prom_port = free_port("127.0.0.1")
        procs.append(_start([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                            tmp_path / "prometheus.log", f"http://127.0.0.1:{prom_port}/-/ready"))
        api = f"http://127.0.0.1:{prom_port}/api/v1"

        time.sleep(3)  # a few scrapes before the load, so rates have a start
        _load(bundled_server.base_url, bundled_model.name, "acme-a")
        _load(vllm_server.base_url, bundled_model.name, "acme-a")
        for target in (bundled_model.name, "acme-a"):
            reply = httpx.post(f"{gateway.url}/v1/chat/completions", timeout=300,
                               headers={"authorization": f"Bearer {gw_key}"},
                               json={"model": target, "max_tokens": 4,
                                     "messages": [{"role": "user", "content": "Wann endet die Besuchszeit?"}]})
            assert reply.status_code == 200, reply.text
        time.sleep(6)  # and a few after it

        loaded = httpx.get(f"{api}/rules", timeout=30).json()["data"]["groups"]
        assert {r["name"] for g in loaded for r in g["rules"]} == {r.name for r in rules.rules(load_config(EXAMPLE))}
        assert all(r["health"] == "ok" for g in loaded for r in g["rules"]), json.dumps(loaded)[:2000]
        for rule in rules.rules(load_config(EXAMPLE)):
            answer = httpx.get(f"{api}/query", params={"query": rule.signal}, timeout=30).json()
            assert answer["status"] == "success", (rule.name, answer)
            series = answer["data"]["result"]
            if rule.name.startswith("SovllmPipeline") or rule.name == "SovllmEvalGateRefused":
                if rule.name == "SovllmEvalGateRefused":
                    continue  # needs an eval stage; tests/pipeline/test_argo_run.py checks the real run pushes it
                stages = {s["metric"].get("stage") for s in series}
                assert {"ingest", "synth"} <= stages, (rule.name, series)
                continue
            jobs = {s["metric"].get("job") for s in series}
            assert SERVING <= jobs, (rule.name, rule.signal, series)

        fed = {"sovllm:pipeline_stage_duration_seconds", "sovllm:pipeline_stage_failed", "sovllm:pipeline_pairs_generated",
               "sovllm:pipeline_stage_errors"}  # what ingest and synth push (train and eval: tests/pipeline/test_argo_run.py)
        for board, panels in dashboards.panels().items():
            for panel in panels:
                for expr, _ in panel.queries:
                    query = dashboards.concrete(expr)
                    answer = httpx.get(f"{api}/query", params={"query": query}, timeout=30).json()
                    assert answer["status"] == "success", (board, panel.title, query, answer)
                    series = answer["data"]["result"]
                    if board == "sovllm-pipeline":
                        if any(name in query for name in fed):
                            assert series, (panel.title, query)
                        continue
                    assert series, (board, panel.title, query)
                    if "by (job)" in query:
                        assert SERVING <= {s["metric"].get("job") for s in series}, (panel.title, query, series)
                    if 'tenant!=""' in query:  # per tenant: only the gateway has tenants
                        assert {s["metric"]["tenant"] for s in series} == {"team-a"}, series
                        assert {s["metric"]["adapter"] for s in series} == {bundled_model.name, "acme-a"}, series
                        continue
                    if board == "sovllm-adapters" and "load_failures" not in query:  # behind the gateway too
                        one = dashboards.concrete(expr, {"job": "gateway", "tenant": "team-a"})
                        got = httpx.get(f"{api}/query", params={"query": one}, timeout=30).json()["data"]["result"]
                        assert got, (panel.title, "gateway", one)
                    if board in ("sovllm-serving", "sovllm-adapters"):  # the same query, one engine at a time
                        for job in SERVING:
                            one = dashboards.concrete(expr, {"job": job})
                            got = httpx.get(f"{api}/query", params={"query": one}, timeout=30).json()["data"]["result"]
                            assert got, (panel.title, job, one)

        page = tmp_path / "top.html"
        top = subprocess.run([exe, "top", "--prometheus", f"http://127.0.0.1:{prom_port}", "--window", "1m",
                              "--html", str(page)], capture_output=True, text=True, timeout=120, check=False,
                             env={**os.environ, "COLUMNS": "250"})
        assert top.returncode == 0, top.stdout + top.stderr
        for job in SERVING:
            assert job in top.stdout and f"<td>{job}</td>" in page.read_text()
        assert "TTFT p95 s" in top.stdout
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
