"""report.html: self-contained, escaped, and readable in a real headless Chromium."""

from __future__ import annotations

import json
import re

import pytest

from sovllm.evaluate.report import render_report
from sovllm.evaluate.summary import check_targets, most_different, summarise


def rows_for(model: str, good: bool) -> list[dict]:
    rows = []
    for i in range(12):
        answerable = i % 3 != 0
        correct = good or i % 4 == 0
        rows.append({"id": f"q{i}", "model": model, "context": "gold", "type": "factual" if answerable else "unanswerable",
                     "answerable": answerable, "negative": None if answerable else ("on_topic" if i % 2 else "foreign"), "question": f"Question {i} <b>?", "reference": f"Reference {i}",
                     "answer": f"Answer {i} by {model} <script>alert(1)</script>",
                     "f1": 1.0 if correct else 0.1, "rouge_l": 1.0 if correct else 0.1,
                     "refused": (not answerable) and correct, "refusal_correct": correct, "stopped": good or i % 2 == 0,
                     "broken": [] if good else ["hit_max_tokens"], "completion_tokens": 20, "prompt_tokens": 300,
                     "seconds": 1.5, "ttft_s": 0.4})
    return rows


def summary() -> dict:
    rows = rows_for("base", False) + rows_for("acme", True)
    s = summarise(rows, ["base", "acme"], resamples=1000, seed=0)
    s.update(targets=check_targets(s), models=[{"label": "base", "served_as": "m"},
                                                 {"label": "acme", "served_as": "acme", "refusal_bias": -1.5}],
             max_tokens=64, resamples=1000, retrieval_k=2, most_different={"acme": most_different(rows, "base", "acme")},
             judge={"enabled": True, "judge": {"model": "smollm2"}, "reliable": False,
                    "agreement": {"items": 40, "judged": 40, "kappa": 0.12, "kappa_min": 0.4, "percent_agreement": 0.5,
                                  "kappa_without_ties": 0.2, "items_without_ties": 30},
                    "repeat_consistency": 1.0, "repeat_items": 4,
                    "verbosity_probe": {"items": 4, "padded_wins": 1, "failed": 0, "passed": False},
                    "pairwise": {"acme": {"versus": "base", "items": 8, "wins": 5, "losses": 1, "ties": 2, "failed": 0,
                                          "position_consistency": 0.75}},
                    "grades": {"base": {"A": 2, "B": 3, "C": 3, "failed": 0}}, "failures": {"schema": 2}})
    return s


def test_report_is_self_contained_and_escaped():
    html = render_report(summary())
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "http://" not in html and "https://" not in html
    assert "default-src 'none'" in html
    assert "acme -1.50" in html  # the refusal bias the server applied is stated


@pytest.mark.integration  # real headless Chromium
def test_report_renders_in_chromium(browser, tmp_path):
    path = tmp_path / "report.html"
    path.write_text(render_report(summary()))
    page = browser.new_page()
    requests, errors = [], []
    page.on("request", lambda r: requests.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(path.as_uri())
    assert errors == [] and requests == [path.as_uri()]  # nothing loaded from anywhere else
    f1_cell = page.locator('table.headline[data-mode="gold"] td[data-metric="f1"]')
    assert f1_cell.get_attribute("data-verdict") == "better" and f1_cell.is_visible()
    assert "better" in f1_cell.inner_text()
    assert "unreliable" in page.locator("body").inner_text()
    # the side-by-side items show both answers as text, never as markup
    first = page.locator(".item").first
    assert "<script>alert(1)</script>" in first.inner_text()
    assert page.locator(".item").count() == 10
    assert page.locator("table.broken").inner_text().count("hit max tokens") == 1
    page.close()
    json.dumps(summary())  # the summary the page renders is plain JSON


def test_hostile_text_anywhere_in_the_summary_stays_text():
    hostile = '<script>alert(1)</script>"><img src=x>'
    s = summary()
    s["most_different"]["acme"][0]["id"] = hostile
    s["judge"]["judge"]["model"] = hostile
    s["judge"]["failures"] = {hostile: 1}
    s["promotion"] = {"reason": hostile}
    html = render_report(s)
    assert "<script>" not in html and "<img" not in html
    # the item id, the judge model, the failure kind and the promotion reason: each shown once, as text
    assert len(re.findall(r"&lt;script&gt;alert\(1\)&lt;/script&gt;&(?:#34|quot);&gt;&lt;img src=x&gt;", html)) == 4
    assert 'data-id="&lt;script&gt;' in html  # the quote cannot close the attribute either


def test_report_shows_each_kind_of_unanswerable_item_as_its_own_row_with_its_count():
    html = render_report(summary())
    # items 0, 3, 6, 9 are unanswerable: 3 and 9 on-topic, 0 and 6 foreign
    assert "refusal accuracy, all unanswerable (n = 4)" in html
    assert "refusal accuracy, on-topic unanswerable (n = 2)" in html
    assert "refusal accuracy, foreign unanswerable (n = 2)" in html
    assert 'data-metric="refusal_accuracy_on_topic"' in html and 'data-metric="refusal_accuracy_foreign"' in html
    assert "refusal_accuracy_on_topic&gt;=0.70" in html  # the on-topic target is listed with the others


def test_report_states_the_leakage_of_a_split_by_section_before_the_headline():
    s = summary()
    s["split"] = {"unit": "section", "leakage": "split by section (few documents): neighbours were trained on"}
    html = render_report(s)
    assert 'id="leakage"' in html and "neighbours were trained on." in html
    assert html.index('id="leakage"') < html.index('class="headline"')
    s["split"] = {"unit": "document", "leakage": None}
    assert 'id="leakage"' not in render_report(s)


def test_report_says_when_the_on_topic_target_was_not_checked():
    rows = [r for r in rows_for("base", False) + rows_for("acme", True) if r["negative"] != "on_topic"]
    s = summary()
    s.update(summarise(rows, ["base", "acme"], resamples=200, seed=0))
    s["targets"] = check_targets(s)
    html = render_report(s)
    assert "not checked: no on-topic items" in html
    assert "refusal accuracy, on-topic unanswerable (n = 0)" in html
