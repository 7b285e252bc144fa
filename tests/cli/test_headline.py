"""The run summary's headline: refusal accuracy never without the false-refusal rate, and the targets."""

from __future__ import annotations

from sovllm.cli.evaluate import headline_lines, targets_line


def _evaluation(refusal_accuracy=0.8889, targets=True):
    comparison = {"diff": -0.0253, "low": -0.0978, "high": 0.0499, "verdict": "no difference"}
    evaluation = {"headline": {
        "context": "gold", "versus": "base",
        "base": {"f1": 0.2209, "rouge_l": 0.1967, "refusal_accuracy": 0.0833, "false_refusal_rate": 0.1528,
                 "stop_rate": 0.6019},
        "acme": {"f1": 0.1956, "rouge_l": 0.1853, "refusal_accuracy": refusal_accuracy, "false_refusal_rate": 0.5833,
                 "stop_rate": 0.9815, "f1_diff": comparison}}}
    if targets:
        evaluation["targets"] = {"acme": {"checks": {"stop_rate>=0.95": True, "stop_rate>=base": True,
                                                     "refusal_accuracy>=0.70": True, "false_refusal_rate<=0.10": False,
                                                     "f1_better_paired": False}, "met": False}}
    return evaluation


def test_headline_pairs_refusal_accuracy_with_false_refusals_and_names_missed_targets():
    lines = headline_lines(_evaluation())
    assert lines == [
        "headline (gold context): acme token F1 0.196, -0.025 vs base [95% CI -0.098, +0.050] → no difference; "
        "refusal accuracy 88.9% with 58.3% false refusals (base 8.3% / 15.3%); stop rate 98.2% (base 60.2%)",
        "quality targets for acme: 3 of 5 met; missed false_refusal_rate<=0.10, f1_better_paired",
    ]


def test_headline_without_unanswerable_items_or_targets():
    lines = headline_lines(_evaluation(refusal_accuracy=None, targets=False))
    assert len(lines) == 1 and "refusal accuracy – with 58.3% false refusals" in lines[0]


def test_targets_line_all_met():
    assert targets_line("acme", {"checks": {"a": True, "b": True}, "met": True}) == "quality targets for acme: all met"
