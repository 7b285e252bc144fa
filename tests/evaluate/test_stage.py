"""The eval stage end to end against a scripted endpoint: metrics, statistics, judge checks, cache, errors."""

from __future__ import annotations

import json

import pytest

from sovllm.config import load_config
from sovllm.errors import ConfigError, InputError
from sovllm.evaluate import stage
from tests.evaluate.conftest import REFUSAL

GOLD = [
    {"id": "g1", "context": "Backups are kept for 35 days.", "question": "How long are backups kept?",
     "reference": "Backups are kept for 35 days.", "answer_1": "Backups are kept for 35 days.",
     "answer_2": "Backups are kept for a year.", "label": "1", "reason": "answer 2 states the wrong period"},
    {"id": "g2", "context": "Badges are issued at reception.", "question": "Where are badges issued?",
     "reference": "Badges are issued at reception.", "answer_1": "At the gate.",
     "answer_2": "Badges are issued at reception.", "label": "2", "reason": "answer 1 names the wrong place"},
]


def run(root, *overrides, **kwargs):
    cfg = load_config(root, overrides)
    return stage.run(root, cfg, log=lambda _: None, **kwargs)


def model_requests(endpoint) -> list[dict]:
    return [b for b in endpoint.requests if not b.get("response_format")]


@pytest.mark.integration  # whole eval stages with judge checks: seconds each
def test_eval_scores_compares_and_reports(project):
    root, endpoint = project
    labels = root / "labels"
    labels.mkdir()
    (labels / "gold.jsonl").write_text("".join(json.dumps(g) + "\n" for g in GOLD))
    result = run(root)
    out = root / "out" / "eval"
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    items = [json.loads(line) for line in (root / "out" / "curate" / "eval.jsonl").read_text().splitlines()]
    answerable = [i for i in items if i["meta"]["type"] != "unanswerable"]
    assert len(rows) == 2 * (len(items) + len(answerable))  # gold: all items; retrieved: answerable ones
    gold = summary["table"]["gold"]
    assert gold["tuned"]["f1"] == 1.0 and gold["tuned"]["refusal_accuracy"] == 1.0
    assert gold["tuned"]["false_refusal_rate"] == 0.0 and gold["base"]["refusal_accuracy"] == 0.0
    assert gold["base"]["f1"] < 0.3
    f1 = summary["comparisons"]["gold"]["tuned"]["f1"]
    assert f1["verdict"] == "better" and f1["low"] > 0 and f1["resamples"] == 2000
    assert summary["comparisons"]["gold"]["tuned"]["false_refusal_rate"]["verdict"] == "no difference"
    assert summary["targets"]["tuned"]["met"] is True
    retrieved = summary["table"]["retrieved"]["tuned"]
    assert retrieved["unanswerable"] == 0 and 0.0 < retrieved["hit_at_k"] <= 1.0
    # the system prompt of training is the one sent, and max_tokens is the same for both models
    sent = model_requests(endpoint)
    assert {b["max_tokens"] for b in sent} == {64} and {b["temperature"] for b in sent} == {0.0}
    assert all(b["messages"][0]["content"].endswith(f'"{REFUSAL}"') for b in sent)
    judge = summary["judge"]
    assert judge["pairwise"]["tuned"]["wins"] == judge["items"] == 4
    assert judge["pairwise"]["tuned"]["position_consistency"] == 1.0
    assert judge["verbosity_probe"]["padded_wins"] == 0 and judge["verbosity_probe"]["passed"]
    assert judge["repeat_consistency"] == 1.0 and judge["failures"] == {}
    # the scripted judge prefers the answer equal to the reference: it agrees with both gold labels
    assert judge["agreement"]["percent_agreement"] == 1.0 and judge["reliable"] is True
    html = (out / "report.html").read_text()
    assert "tuned" in html and 'data-verdict="better"' in html
    assert result.manifest.counts["predictions"] == len(rows)
    assert summary["most_different"]["tuned"][0]["diff"] > 0


@pytest.mark.integration  # two whole eval stages
def test_rerun_uses_the_answer_cache_but_not_for_unfingerprinted_models(project):
    root, endpoint = project
    run(root, "eval.judge.enabled=false")
    first = len(model_requests(endpoint))
    run(root, "eval.judge.enabled=false", force=True)
    # models named only by the endpoint have no weights fingerprint: always asked again
    assert len(model_requests(endpoint)) == 2 * first


@pytest.mark.integration  # an interrupted and a resumed eval stage
def test_cache_resumes_an_interrupted_run(project, monkeypatch):
    from sovllm.evaluate import predict
    from sovllm.evaluate.predict import Model

    root, endpoint = project
    # fingerprinted models are cached: pretend the endpoint's models have known weights
    real = stage.resolve_models
    monkeypatch.setattr(stage, "resolve_models", lambda *a: [Model(m.label, m.served, "fp-" + m.label)
                                                             for m in real(*a)])
    calls = {"n": 0}
    original = predict.ChatClient.complete

    async def flaky(self, messages, **params):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt
        return await original(self, messages, **params)

    monkeypatch.setattr(predict.ChatClient, "complete", flaky)
    with pytest.raises(KeyboardInterrupt):
        run(root, "eval.judge.enabled=false", "eval.concurrency=1")
    done = len(model_requests(endpoint))
    assert done >= 8
    monkeypatch.setattr(predict.ChatClient, "complete", original)
    run(root, "eval.judge.enabled=false")
    rows = (root / "out" / "eval" / "predictions.jsonl").read_text().splitlines()
    assert len(model_requests(endpoint)) == len(rows)  # nothing asked twice, nothing lost


@pytest.mark.integration  # a whole eval stage
def test_judge_failures_are_counted_not_guessed(tmp_path, fake):
    from tests.evaluate.conftest import eval_project, load_answers, script

    def broken_judge(body, n):
        if body.get("response_format"):
            return 200, "not json"
        return script(body, n)

    endpoint = fake(broken_judge)
    root = eval_project(tmp_path / "p", endpoint.port)
    load_answers(root)
    run(root)
    judge = json.loads((root / "out" / "eval" / "summary.json").read_text())["judge"]
    assert judge["failures"]["schema"] == judge["verdicts"] > 0
    assert judge["pairwise"]["tuned"]["failed"] == 4 and judge["pairwise"]["tuned"]["wins"] == 0
    assert judge["grades"]["tuned"]["failed"] == 4
    assert judge["reliable"] is False and judge["agreement"]["items"] == 0


def test_bad_eval_record_names_file_and_line(project):
    root, _ = project
    path = root / "out" / "curate" / "eval.jsonl"
    lines = path.read_text().splitlines()
    lines[1] = json.dumps({"id": "x", "messages": []})
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"eval\.jsonl:2: not an eval record"):
        run(root)


@pytest.mark.integration  # the gold labels are checked after the answers are in: a whole eval stage
def test_bad_gold_label_is_refused(project):
    root, _ = project
    (root / "labels").mkdir()
    (root / "labels" / "gold.jsonl").write_text(json.dumps({**GOLD[0], "label": "A"}) + "\n")
    with pytest.raises(InputError, match=r"gold\.jsonl:1: label 'A'"):
        run(root)


def test_one_model_is_not_a_comparison(project):
    root, _ = project
    with pytest.raises(ConfigError, match="at least two models"):
        run(root, "eval.models=[fake-model]")


def test_quick_takes_a_small_mixed_sample(project):
    root, endpoint = project
    run(root, "eval.judge.enabled=false", "eval.quick_limit=5", "eval.contexts=[gold]", quick=True)
    rows = [json.loads(line) for line in (root / "out" / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and {r["answerable"] for r in rows} == {True, False}
