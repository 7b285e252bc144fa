"""The alert rules with Debian's real promtool: the rules file checks, and `promtool test rules` gives
each rule series that must fire it and series (another job, project or stage) that must not."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from sovllm.config import load_config
from sovllm.monitoring import rules
from tests.conftest import require

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "acme"


def promtool() -> str:
    path = shutil.which("promtool")
    require(path is not None, "promtool (make monitoring installs Debian's prometheus)")
    return path


def _text(template: str, labels: dict, value: str) -> str:
    """The annotation as Prometheus renders it, for the few template forms the rules use."""
    out = template
    for form, shown in (("{{ $value | humanizeDuration }}", value), ("{{ $value | humanizePercentage }}", value),
                        ("{{ $value }}", value)):
        out = out.replace(form, shown) if shown is not None else out
    return re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], out)


# rule → (input series, the labels of the one alert expected, how its value is shown); series of
# other jobs, projects or stages stay under their threshold and must not fire
CASES = {
    "SovllmRequestsWaiting": ([("vllm:num_requests_waiting{namespace='prod', job='hot'}", "15x20"),
                               ("vllm:num_requests_waiting{namespace='prod', job='ok'}", "3x20")],
                              {"namespace": "prod", "job": "hot"}, "15"),
    "SovllmTimeToFirstTokenHigh": ([*[(f"vllm:time_to_first_token_seconds_bucket{{namespace='prod', job='hot', le='{le}'}}", s)
                                      for le, s in (("1", "0+0x20"), ("5", "0+10x20"), ("+Inf", "0+10x20"))],
                                    *[(f"vllm:time_to_first_token_seconds_bucket{{namespace='prod', job='ok', le='{le}'}}", s)
                                      for le, s in (("1", "0+10x20"), ("5", "0+10x20"), ("+Inf", "0+10x20"))]],
                                   {"namespace": "prod", "job": "hot"}, "4.8s"),
    "SovllmErrorRate": ([("http_requests_total{namespace='prod', job='hot', status='2xx'}", "0+10x20"),
                         ("http_requests_total{namespace='prod', job='hot', status='5xx'}", "0+10x20"),
                         ("http_requests_total{namespace='prod', job='ok', status='2xx'}", "0+10x20")],
                        {"namespace": "prod", "job": "hot"}, "50%"),
    "SovllmKVCacheNearlyFull": ([("vllm:kv_cache_usage_perc{namespace='prod', job='hot'}", "0.95x20"),
                                 ("vllm:kv_cache_usage_perc{namespace='prod', job='ok'}", "0.5x20")],
                                {"namespace": "prod", "job": "hot"}, "95%"),
    # two adapters of one job: one alert per job
    "SovllmAdapterLoadFailures": ([("sovllm:adapter_load_failures_total{namespace='prod', job='hot', adapter='x'}", "0+1x20"),
                                   ("sovllm:adapter_load_failures_total{namespace='prod', job='hot', adapter='y'}", "0+1x20"),
                                   ("sovllm:adapter_load_failures_total{namespace='prod', job='ok', adapter='x'}", "0x20")],
                                  {"namespace": "prod", "job": "hot"}, None),
    "SovllmPipelineStageFailed": ([("sovllm:pipeline_stage_failed{project='klinik', stage='train'}", "1x20"),
                                   ("sovllm:pipeline_stage_failed{project='klinik', stage='curate'}", "0x20")],
                                  {"project": "klinik", "stage": "train"}, None),
    "SovllmEvalGateRefused": ([("sovllm:pipeline_eval_gate_refused{project='klinik'}", "1x20"),
                               ("sovllm:pipeline_eval_gate_refused{project='acme'}", "0x20")],
                              {"project": "klinik"}, None),
    "SovllmServerNotScraped": ([("up{namespace='prod', job='hot', instance='a'}", "0x20"),
                                ("up{namespace='prod', job='ok', instance='b'}", "1x20")],
                               {"namespace": "prod", "job": "hot"}, None),
}


def _write(tmp_path: Path) -> tuple[Path, dict]:
    cfg = load_config(EXAMPLE)
    path = tmp_path / "sovllm-alerts.rules.yml"
    path.write_text(yaml.safe_dump(rules.rules_file(cfg), sort_keys=False), encoding="utf-8")
    return path, {r.name: r for r in rules.rules(cfg)}


def test_every_rule_has_a_case_and_the_file_checks(tmp_path):
    path, by_name = _write(tmp_path)
    assert set(by_name) == set(CASES)
    done = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and f"SUCCESS: {len(CASES)} rules found" in done.stdout, done.stdout + done.stderr


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_rule_fires_on_its_series_and_not_on_the_others(tmp_path, name):
    path, by_name = _write(tmp_path)
    rule = by_name[name]
    series, firing, value = CASES[name]
    if value is None and "$value" in rule.summary + rule.action:  # promtool compares annotations too
        pytest.fail(f"{name}: give the shown value in CASES")
    expected = [{"exp_labels": {"severity": rule.severity, **labels},
                 "exp_annotations": {"summary": _text(rule.summary, labels, value),
                                     "description": _text(rule.action, labels, value)}}
                for labels in (firing if isinstance(firing, list) else [firing])]
    checks = [{"eval_time": "20m", "alertname": name, "exp_alerts": expected}]
    if rule.duration != "0m":  # before the series have stayed long enough (for: …), nothing fires
        checks.append({"eval_time": "2m", "alertname": name, "exp_alerts": []})
    test = {"rule_files": [path.name], "evaluation_interval": "1m",
            "tests": [{"interval": "1m",
                       "input_series": [{"series": s.replace("'", '"'), "values": v} for s, v in series],
                       "alert_rule_test": checks}]}
    spec = tmp_path / "test.yml"
    spec.write_text(yaml.safe_dump(test, sort_keys=False), encoding="utf-8")
    done = subprocess.run([promtool(), "test", "rules", spec.name], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
