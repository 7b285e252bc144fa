"""The gateway sends requests only to upstreams the project allows (127.0.0.2 stands in for another host)."""

from __future__ import annotations

import subprocess
import sys

import httpx
import yaml

from tests.gateway import procs

KEY = "sk-egress-" + "5" * 20


def test_an_upstream_outside_egress_allow_is_refused_at_start_and_allowed_when_listed(tmp_path):
    upstream = procs.Proc([sys.executable, "-m", "benchmarks.scripted_upstream", "--host", "127.0.0.2", "--port", "0",
                           "--adapters", "a1", "--tokens", "2", "--ready-file", str(tmp_path / "up.ready")],
                          tmp_path / "up.ready", "upstream on 127.0.0.2", check_host="127.0.0.2")
    try:
        url = f"http://127.0.0.2:{upstream.port}/v1"
        gateway = {"upstreams": [{"url": url}], "tenants": {"t": {"keys": [procs.hashed(KEY)], "models": ["a1"]}}}
        root = procs.project(tmp_path, gateway)
        refused = subprocess.run([sys.executable, "-m", "sovllm", "gateway", "serve", str(root), "--port", "0"],
                                 capture_output=True, text=True, cwd=procs.REPO, timeout=60)
        assert refused.returncode == 2
        assert "gateway.upstreams[0].url" in refused.stderr and "egress.allow" in refused.stderr
        config = yaml.safe_load((root / "sovllm.yaml").read_text())
        config["egress"] = {"allow": ["127.0.0.2"]}
        (root / "sovllm.yaml").write_text(yaml.safe_dump(config))
        proc = procs.gateway(root)
        try:
            response = httpx.post(proc.url + "/v1/chat/completions", headers={"authorization": f"Bearer {KEY}"},
                                  json={"model": "a1", "messages": [{"role": "user", "content": "x"}]})
            assert response.status_code == 200, response.text
        finally:
            proc.stop()
    finally:
        upstream.stop()
