"""The curate review page: which pairs it shows, escaping, self-containedness, atomic writes, and its
filter controls driven in real headless Chromium."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil

import pytest

from sovllm.curate.review import render_review, write_review
from tests.conftest import require

XSS = "<script>alert(1)</script>"

CHUNKS = {
    "doc1-00000": {"text": "The Tunnelwerk session ends after 9 hours.\nReconnect with the blue key.",
                   "heading_path": ["Policy", "Sessions"], "lang": "en",
                   "source": {"path": "policy.md", "page": None}},
    "doc2-00000": {"text": "Backups run at 01:30 CET; restores take forty minutes.",
                   "heading_path": ["Operations"], "lang": "en", "source": {"path": "ops.pdf", "page": 3}},
}


def rec(rid, question, *, kept=True, flags=(), judge=None, drop_reason=None, dup_of=None,
        chunk_id="doc1-00000", answer="An answer.", type_="factual"):
    return {"id": rid, "chunk_id": chunk_id, "question": question, "answer": answer, "type": type_,
            "flags": list(flags), "judge": judge, "kept": kept, "drop_reason": drop_reason, "dup_of": dup_of}


def judge(rating, hallucination=False, reasoning="ok"):
    return {"rating": rating, "hallucination": hallucination, "reasoning": reasoning}


# Six pairs the page shows (q1..q6) and one clean kept pair it leaves out (q0).
RECORDS = [
    rec("q0", "When does a Tunnelwerk session end?", judge=judge("A")),
    rec("q1", "What is described here?", flags=["generic_question"], judge=judge("A")),
    rec("q2", "How long do backups take?", chunk_id="doc2-00000",
        judge=judge("C", hallucination=True, reasoning="Invents a second backup window.")),
    rec("q3", "When does the Tunnelwerk session end?", kept=False, flags=["duplicate"],
        drop_reason="duplicate", dup_of="q0"),
    rec("q4", "Key colour?", kept=False, flags=["too_short"], drop_reason="too_short", answer="Blue."),
    rec("q5", "At what time do restores start?", kept=False, chunk_id="doc2-00000",
        judge=judge("C", reasoning="Answer not supported."), drop_reason="judge"),
    rec("q6", "According to the context, what key is needed?", flags=["mentions_context"], judge=judge("B")),
]


def shown_ids(page_html: str) -> list[str]:
    return re.findall(r'<article class="pair" id="p-([^"]+)"', page_html)


# --- unit ---------------------------------------------------------------------------------------

def test_shows_dropped_flagged_and_judge_b_c_and_omits_clean_kept_pairs():
    records = RECORDS + [rec("q7", "Unjudged clean pair?")]
    page = render_review(records, CHUNKS, title="Review")
    assert shown_ids(page) == ["q1", "q2", "q3", "q4", "q5", "q6"]
    assert "8 pairs in total, 6 shown here" in page
    assert '<span id="count">6 shown</span>' in page


def test_pair_shows_labels_status_judge_dup_and_chunk():
    page = render_review(RECORDS, CHUNKS, title="Review")
    q5 = page[page.index('id="p-q5"'):page.index('id="p-q6"')]
    assert 'data-labels="judge judge:C"' in q5 and 'data-kept="0"' in q5
    assert "dropped: judge" in q5 and "judge <b>C</b>" in q5 and "Answer not supported." in q5
    assert "ops.pdf, page 3" in q5 and "Operations" in q5
    assert "<details><summary>chunk text</summary><pre>Backups run at 01:30 CET" in q5
    q3 = page[page.index('id="p-q3"'):page.index('id="p-q4"')]
    # q0 is left out of the page, so the duplicate names it without a dead link.
    assert "duplicate of <code>q0</code>" in q3 and 'href="#p-q0"' not in page
    q1 = page[page.index('id="p-q1"'):page.index('id="p-q2"')]
    assert '<span class="badge kept">kept</span>' in q1 and "Policy &gt; Sessions" in q1
    labels = re.findall(r'class="label" value="([^"]+)"', page)
    assert labels == ["duplicate", "generic_question", "judge", "mentions_context", "too_short", "judge:B", "judge:C"]


def test_dup_of_links_when_the_kept_pair_is_on_the_page():
    records = [rec("a", "Flagged?", flags=["assistant_speak"]),
               rec("b", "Flagged?", kept=False, flags=["near_duplicate"], drop_reason="near_duplicate", dup_of="a")]
    page = render_review(records, CHUNKS, title="Review")
    assert 'duplicate of <a href="#p-a">a</a>' in page


@pytest.mark.parametrize("field", ["question", "answer", "reasoning", "flag", "chunk_text", "heading", "title",
                                   "drop_reason", "id"])
def test_user_text_is_escaped_everywhere(field):
    r = rec(XSS if field == "id" else "x1", XSS if field == "question" else "Q?",
            answer=XSS if field == "answer" else "A.", kept=field != "drop_reason",
            flags=[XSS] if field == "flag" else ["too_short"],
            judge=judge("C", reasoning=XSS) if field == "reasoning" else None,
            drop_reason=XSS if field == "drop_reason" else None)
    chunk = {"text": XSS if field == "chunk_text" else "text", "heading_path": [XSS if field == "heading" else "H"],
             "lang": "en", "source": {"path": "p.md", "page": None}}
    page = render_review([r], {"doc1-00000": chunk}, title=XSS if field == "title" else "Review")
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count("<script>") == 1  # the page's own


def test_page_is_self_contained():
    page = render_review(RECORDS, CHUNKS, title="Review", funnel={"generated": 7})
    assert not re.search(r"https?://|url\(|@import|<link\b|<iframe\b|<img\b", page, re.IGNORECASE)
    assert not re.search(r'\b(?:src|href)\s*=\s*"(?!#)', page)
    assert "default-src 'none'" in page


def test_missing_chunk_is_reported():
    records = [rec("m1", "Orphan?", flags=["too_short"], chunk_id="gone-00001"),
               rec("m2", "Present?", flags=["too_short"])]
    page = render_review(records, CHUNKS, title="Review")
    assert page.count("chunk not found") == 1
    assert "chunk not found: <code>gone-00001</code>" in page


def test_funnel_renders_nested_rows():
    page = render_review(RECORDS, CHUNKS, title="Review",
                         funnel={"generated": 7, "dropped": {"rules": 1, "dedup": 1}, "kept": 4})
    table = re.search(r'<table class="funnel">(.*?)</table>', page).group(1)
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", table)
    assert cells == ["generated", "7", "dropped", "", "rules", "1", "dedup", "1", "kept", "4"]
    assert 'style="padding-left:2.0em">rules' in table
    assert '<table class="funnel">' not in render_review(RECORDS, CHUNKS, title="Review")


def test_write_review_is_atomic_and_returns_the_count(tmp_path, monkeypatch):
    out = tmp_path / "review" / "index.html"
    assert write_review(out, RECORDS, CHUNKS, title="Review") == 6
    assert out.read_text(encoding="utf-8") == render_review(RECORDS, CHUNKS, title="Review")
    assert os.listdir(out.parent) == ["index.html"]
    assert out.stat().st_mode & 0o777 == 0o644

    before = out.read_text(encoding="utf-8")

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_review(out, RECORDS[:2], CHUNKS, title="Other")
    assert out.read_text(encoding="utf-8") == before
    assert os.listdir(out.parent) == ["index.html"]


# --- browser ------------------------------------------------------------------------------------

@pytest.fixture
def open_review(browser, tmp_path):
    """Opens the review page of RECORDS (plus an optional URL hash); records page errors and requests."""
    path = tmp_path / "review.html"
    write_review(path, RECORDS, CHUNKS, title="Review", funnel={"generated": 7})
    pages = []

    def _open(hash_: str = ""):
        page = browser.new_page()
        page.errors, page.requests = [], []
        page.on("pageerror", lambda e: page.errors.append(str(e)))
        page.on("request", lambda r: page.requests.append(r.url))
        page.goto(path.as_uri() + hash_)
        pages.append(page)
        return page

    yield _open
    for page in pages:
        assert page.errors == []
        assert page.requests == [page.url.split("#")[0]]  # nothing but the file itself
        page.close()


def visible(page) -> list[str]:
    return [a.get_attribute("id")[2:] for a in page.locator("article.pair").all() if a.is_visible()]


def count(page) -> str:
    return page.inner_text("#count")


@pytest.mark.integration
def test_controls_filter_pairs_in_chromium(open_review):
    page = open_review()
    assert visible(page) == ["q1", "q2", "q3", "q4", "q5", "q6"] and count(page) == "6 shown"

    page.uncheck('input.label[value="generic_question"]')
    assert visible(page) == ["q2", "q3", "q4", "q5", "q6"] and count(page) == "5 shown"
    # q5 stays: it is also labelled by its drop reason "judge".
    page.uncheck('input.label[value="judge:C"]')
    assert visible(page) == ["q3", "q4", "q5", "q6"] and count(page) == "4 shown"
    page.check('input.label[value="generic_question"]')
    assert visible(page) == ["q1", "q3", "q4", "q5", "q6"] and count(page) == "5 shown"

    page.select_option("#show", "dropped")
    assert visible(page) == ["q3", "q4", "q5"] and count(page) == "3 shown"
    page.locator("#q").press_sequentially("RESTORES")
    assert visible(page) == ["q5"] and count(page) == "1 shown"
    page.fill("#q", "nothing matches this")
    assert visible(page) == [] and count(page) == "0 shown"

    page.fill("#q", "")
    page.select_option("#show", "kept")
    assert visible(page) == ["q1", "q6"] and count(page) == "2 shown"
    page.click("#all")
    assert visible(page) == ["q1", "q2", "q6"] and count(page) == "3 shown"

    page.locator("article#p-q2 summary").click()
    assert page.locator("article#p-q2 pre").is_visible()
    assert not page.locator("article#p-q1 pre").is_visible()


@pytest.mark.integration
def test_url_hash_sets_the_initial_filter_in_chromium(open_review):
    page = open_review("#flag=generic_question")
    assert visible(page) == ["q1"] and count(page) == "1 shown"
    checked = [b.get_attribute("value") for b in page.locator("input.label").all() if b.is_checked()]
    assert checked == ["generic_question"]

    page = open_review("#flag=judge:C,too_short&show=dropped")
    assert visible(page) == ["q4", "q5"] and count(page) == "2 shown"
    assert page.input_value("#show") == "dropped"
