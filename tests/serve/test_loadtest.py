"""`sovllm bench serve`: profile and mix parsing, and a real open-loop run against the tiny model's server."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sovllm.errors import ConfigError
from sovllm.serve.launch import EmbeddedServer
from sovllm.serve.loadtest import parse_mix, parse_profile, quantiles


def sovllm(*args):
    exe = shutil.which("sovllm", path=str(Path(sys.executable).parent)) or "sovllm"
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=300)


def test_profile_and_mix_parsing():
    phases = parse_profile("warmup:60s@2rps, spike:2m@12.5rps")
    assert [(p.name, p.seconds, p.rate) for p in phases] == [("warmup", 60, 2), ("spike", 120, 12.5)]
    assert parse_mix("adapter=0.7,base=0.3") == pytest.approx({"adapter": 0.7, "base": 0.3})
    assert parse_mix("a=1,b=3") == {"a": 0.25, "b": 0.75}
    for bad in ("spike:60@12rps", "spike:60s", ":1s@1rps", "x:0s@1rps", ""):
        with pytest.raises(ConfigError):
            parse_profile(bad)
    for bad in ("adapter", "adapter=x", "a=0", "a=-1"):
        with pytest.raises(ConfigError):
            parse_mix(bad)
    assert quantiles([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]) == {"p50": 5, "p95": 10, "p99": 10, "mean": 5.5}
    assert quantiles([])["p50"] is None


@pytest.mark.integration  # a real `sovllm serve` process and a `sovllm bench` process
def test_bench_drives_base_and_adapters_and_counts_agree_with_the_server(tiny_model_dir, tiny_adapters, tmp_path):
    prompts = tmp_path / "eval.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                                        {"role": "user", "content": f"Question {i}?"},
                                                        {"role": "assistant", "content": "ignored"}]}) + "\n"
                               for i in range(5)))
    adapters = {"r2": str(tiny_adapters["r2"]), "r4": str(tiny_adapters["r4"])}
    with EmbeddedServer(str(tiny_model_dir), adapters=adapters,
                        extra_args=["--max-num-seqs", "8", "--max-model-len", "512"]) as server:
        out = tmp_path / "report.json"
        proc = sovllm("bench", "serve", "--base-url", server.base_url, "--profile", "a:2s@5rps,b:1s@10rps",
                      "--mix", "adapter=0.5,base=0.5", "--prompts", prompts, "--max-tokens", "12",
                      "--out", out, "-p", tmp_path)
        assert proc.returncode == 0, proc.stderr
        report = json.loads(out.read_text())
        metrics = httpx.get(server.base_url.removesuffix("/v1") + "/metrics").text
    overall = report["overall"]
    assert overall["requests"] == overall["ok"] == 20 and overall["errors"] == {}
    assert report["phases"]["a"]["requests"] == 10 and report["phases"]["b"]["requests"] == 10
    assert 20 <= overall["output_tokens"] <= 20 * 12  # at least one token, at most max_tokens each
    assert set(overall["by_model"]) <= {"model", "r2", "r4"} and sum(overall["by_model"].values()) == 20
    for key in ("ttft_s", "inter_token_s", "e2e_s"):
        q = overall[key]
        assert 0 < q["p50"] <= q["p95"] <= q["p99"]
    served = {}
    for family in text_string_to_metric_families(metrics):
        for s in family.samples:
            if s.name == "sovllm:adapter_requests_total":
                served[s.labels["adapter"]] = served.get(s.labels["adapter"], 0) + s.value
    warm_up = {"__base__": 1, "r2": 1, "r4": 1}  # the server's own warm-up requests
    expected = {"__base__" if m == "model" else m: n for m, n in overall["by_model"].items()}
    assert {k: v - warm_up[k] for k, v in served.items() if v - warm_up[k]} == expected
    assert "sovllm bench serve" in proc.stdout and "overall" in proc.stdout


def test_bench_refuses_a_host_outside_the_allow_list(tmp_path):
    prompts = tmp_path / "eval.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}]}) + "\n")
    proc = sovllm("bench", "serve", "--base-url", "http://127.0.0.2:9/v1", "--profile", "a:1s@1rps",
                  "--prompts", prompts, "--out", tmp_path / "r.json", "-p", tmp_path)
    assert proc.returncode == 3 and "127.0.0.2" in proc.stderr and "egress" in proc.stderr
    assert not (tmp_path / "r.json").exists()
