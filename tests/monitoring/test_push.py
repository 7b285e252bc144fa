"""The pipeline's pushed metrics: valid Prometheus text, the right series per stage, and a Pushgateway
that is down or refused by the egress guard is a warning, not a failed stage."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from sovllm import egress
from sovllm.monitoring.push import exposition, push_stage


def parse(text: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_each_stage_pushes_its_series():
    synth = parse(exposition("synth", seconds=12.5, failed=False, skipped=False, counts={"pairs": 42, "failures": 3},
                             extra={}, now=1000.0))
    assert synth[("sovllm:pipeline_stage_duration_seconds", ())] == 12.5
    assert synth[("sovllm:pipeline_pairs_generated", ())] == 42 and synth[("sovllm:pipeline_stage_errors", ())] == 3
    assert synth[("sovllm:pipeline_stage_failed", ())] == 0 and synth[("sovllm:pipeline_stage_last_run_timestamp_seconds", ())] == 1000
    train = parse(exposition("train", seconds=1, failed=True, skipped=False, counts={"steps": 4},
                             extra={"metrics": {"best_val_loss": 0.25}}))
    assert train[("sovllm:pipeline_stage_failed", ())] == 1 and train[("sovllm:pipeline_train_loss", ())] == 0.25
    evaluated = parse(exposition("eval", seconds=1, failed=False, skipped=False, counts={}, extra={
        "headline": {"context": "gold", "versus": "base", "base": {"f1": 0.4}, "klinik": {"f1": 0.5}},
        "promotion": {"promoted": False, "reason": "not better"}}))
    assert evaluated[("sovllm:pipeline_eval_f1", (("model", "klinik"),))] == 0.5
    assert evaluated[("sovllm:pipeline_eval_gate_refused", ())] == 1 and evaluated[("sovllm:pipeline_eval_promoted", ())] == 0
    quick = parse(exposition("eval", seconds=1, failed=False, skipped=True, counts={}, extra={"promotion": None}))
    assert quick[("sovllm:pipeline_eval_gate_refused", ())] == 0 and quick[("sovllm:pipeline_stage_skipped", ())] == 1


def test_an_unreachable_or_refused_pushgateway_is_a_warning():
    said = []
    assert push_stage(None, "p", "ingest", seconds=1, failed=False, skipped=False) is False  # not configured
    egress.install([])  # loopback only
    assert not push_stage("http://127.0.0.2:9091", "p", "ingest", seconds=1, failed=False, skipped=False, warn=said.append)
    assert said and "could not push stage ingest" in said[0]
