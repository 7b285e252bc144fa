"""Refusal accuracy per kind of unanswerable item (on-topic, foreign), its target, and where the kind comes from."""

from __future__ import annotations

import json

import pytest

from sovllm.config import load_config
from sovllm.errors import InputError
from sovllm.evaluate import stage
from sovllm.evaluate.predict import Item
from sovllm.evaluate.summary import (
    check_targets,
    most_different,
    negative_kind,
    summarise,
)


def row(model: str, i: int, *, answerable: bool, refused: bool, negative: str | None = None) -> dict:
    r = {"id": f"q{i}", "model": model, "context": "gold", "type": "factual" if answerable else "unanswerable",
         "answerable": answerable, "question": f"Question {i}", "reference": f"Reference {i}", "answer": "a",
         "f1": 0.0 if refused else 1.0, "rouge_l": 0.0 if refused else 1.0, "refused": refused,
         "refusal_correct": refused != answerable, "stopped": True, "broken": [], "completion_tokens": 5,
         "prompt_tokens": 50, "seconds": 0.1, "ttft_s": 0.01}
    if negative is not None:
        r["negative"] = negative
    return r


def rows_of(model: str, on_topic_refused: int, foreign_refused: int, *, on_topic: int = 4, foreign: int = 6) -> list:
    """Four answerable items (answered), then `on_topic` on-topic and `foreign` foreign unanswerable ones."""
    rows = [row(model, i, answerable=True, refused=False) for i in range(4)]
    rows += [row(model, 4 + i, answerable=False, refused=i < on_topic_refused, negative="on_topic")
             for i in range(on_topic)]
    rows += [row(model, 4 + on_topic + i, answerable=False, refused=i < foreign_refused, negative="foreign")
             for i in range(foreign)]
    return rows


def test_refusal_accuracy_is_reported_per_kind_with_counts_and_paired_comparison():
    # base refuses no on-topic and 3 of 6 foreign items; acme 1 of 4 on-topic and all 6 foreign
    s = summarise(rows_of("base", 0, 3) + rows_of("acme", 1, 6), ["base", "acme"], resamples=500, seed=0)
    acme, base = s["table"]["gold"]["acme"], s["table"]["gold"]["base"]
    assert (acme["unanswerable"], acme["unanswerable_on_topic"], acme["unanswerable_foreign"]) == (10, 4, 6)
    assert acme["refusal_accuracy_on_topic"] == 0.25 and acme["refusal_accuracy_foreign"] == 1.0
    assert acme["refusal_accuracy"] == 0.7  # 7 of 10 over both kinds, the key it always had
    assert base["refusal_accuracy_on_topic"] == 0.0 and base["refusal_accuracy_foreign"] == 0.5
    paired = s["comparisons"]["gold"]["acme"]
    assert paired["refusal_accuracy_on_topic"]["n"] == 4 and paired["refusal_accuracy_on_topic"]["diff"] == 0.25
    assert paired["refusal_accuracy_foreign"]["n"] == 6 and paired["refusal_accuracy_foreign"]["diff"] == 0.5
    assert paired["refusal_accuracy_foreign"]["verdict"] == "better"  # every foreign difference is ≥ 0


def test_rows_without_a_negative_kind_count_as_foreign():
    legacy = [{k: v for k, v in r.items() if k != "negative"} for r in rows_of("base", 2, 3)]
    assert negative_kind(legacy[0]) is None and negative_kind(legacy[-1]) == "foreign"
    s = summarise(legacy + [{**r, "model": "acme"} for r in legacy], ["base", "acme"], resamples=100, seed=0)
    table = s["table"]["gold"]["base"]
    assert table["unanswerable_on_topic"] == 0 and table["refusal_accuracy_on_topic"] is None
    assert table["unanswerable_foreign"] == 10 and table["refusal_accuracy_foreign"] == 0.5
    assert s["comparisons"]["gold"]["acme"]["refusal_accuracy_on_topic"]["verdict"] == "no data"


def test_on_topic_target_is_checked_like_the_refusal_target():
    s = summarise(rows_of("base", 0, 0) + rows_of("acme", 2, 6), ["base", "acme"], resamples=200, seed=0)
    result = check_targets(s)["acme"]
    # 8 of 10 refused overall (≥ 0.70), but only 2 of 4 on-topic: the on-topic target alone is missed
    assert result["checks"]["refusal_accuracy>=0.70"] is True
    assert result["checks"]["refusal_accuracy_on_topic>=0.70"] is False and result["met"] is False
    assert result["not_checked"] == {}
    s = summarise(rows_of("base", 0, 0) + rows_of("acme", 3, 6), ["base", "acme"], resamples=200, seed=0)
    assert check_targets(s)["acme"]["checks"]["refusal_accuracy_on_topic>=0.70"] is True


def test_without_on_topic_items_the_on_topic_target_is_not_checked_and_says_so():
    s = summarise(rows_of("base", 0, 0, on_topic=0) + rows_of("acme", 0, 6, on_topic=0), ["base", "acme"],
                  resamples=200, seed=0)
    result = check_targets(s)["acme"]
    assert "refusal_accuracy_on_topic>=0.70" not in result["checks"]
    assert result["not_checked"] == {"refusal_accuracy_on_topic>=0.70": "no on-topic items"}
    assert result["checks"]["refusal_accuracy>=0.70"] is True


def test_most_different_items_name_their_negative_kind():
    rows = rows_of("base", 0, 0) + rows_of("acme", 4, 6)
    kinds = {it["id"]: it["negative"] for it in most_different(rows, "base", "acme", n=14)}
    assert kinds["q0"] is None and kinds["q4"] == "on_topic" and kinds["q13"] == "foreign"


def record(meta: dict) -> dict:
    return {"id": "r1", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                                     {"role": "assistant", "content": "a"}],
            "meta": {"chunk_id": "c1", "doc_id": "d1", "question": "q", "context_ids": ["c1"], "lang": "en", **meta}}


def test_items_carry_the_negative_kind_into_predictions():
    assert Item.from_record(record({"type": "factual"})).negative is None
    assert Item.from_record(record({"type": "unanswerable", "negative": "on_topic"})).negative == "on_topic"
    assert Item.from_record(record({"type": "unanswerable"})).negative == "foreign"  # written before the kinds


def test_an_unknown_negative_kind_names_file_and_line(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps(record({"type": "factual"})) + "\n"
                    + json.dumps(record({"type": "unanswerable", "negative": "offtopic"})) + "\n")
    with pytest.raises(InputError, match=r"eval\.jsonl:2: not an eval record \(meta.negative is 'offtopic'"):
        stage.load_items(path)


@pytest.fixture
def splits_project(tmp_path):
    (tmp_path / "sovllm.yaml").write_text("project:\n  name: t\n")
    (tmp_path / "out" / "curate").mkdir(parents=True)
    (tmp_path / "out" / "ingest").mkdir(parents=True)
    chunks = [{"id": f"c{i}", "doc_id": "d1" if i < 2 else "d2", "text": f"text {i}"} for i in range(4)]
    (tmp_path / "out" / "ingest" / "chunks.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chunks))
    return tmp_path, load_config(tmp_path)


def write_splits(root, splits: dict) -> None:
    (root / "out" / "curate" / "splits.json").write_text(json.dumps(splits))


def test_split_by_section_states_its_leakage_and_indexes_eval_chunks_only(splits_project):
    root, cfg = splits_project
    write_splits(root, {"unit": "section", "leakage": "split by section (few documents): neighbours were trained on",
                        "documents": {"d1": {"split": "mixed"}, "d2": {"split": "train"}},
                        "chunks": {"c0": "train", "c1": "eval", "c2": "train", "c3": "train"}})
    assert stage.split_info(root, cfg) == {"unit": "section",
                                           "leakage": "split by section (few documents): neighbours were trained on"}
    assert [c["id"] for c in stage.eval_chunks(root, cfg)] == ["c1"]


def test_split_by_document_and_older_splits_have_no_leakage(splits_project):
    root, cfg = splits_project
    write_splits(root, {"documents": {"d1": {"split": "train"}, "d2": {"split": "eval"}}})  # before units
    assert stage.split_info(root, cfg) == {"unit": "document", "leakage": None}
    assert [c["id"] for c in stage.eval_chunks(root, cfg)] == ["c2", "c3"]


def test_headline_carries_the_on_topic_figure_and_the_leakage():
    s = summarise(rows_of("base", 0, 0) + rows_of("acme", 2, 6), ["base", "acme"], resamples=100, seed=0)
    s["split"] = {"unit": "section", "leakage": "split by section: optimistic"}
    headline = stage.headline(s)
    assert headline["leakage"] == "split by section: optimistic"
    assert headline["acme"]["refusal_accuracy_on_topic"] == 0.5 and headline["acme"]["refusal_accuracy"] == 0.8
