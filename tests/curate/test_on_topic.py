"""On-topic unanswerable items, section splits for small corpora, and the size check at ingest."""

from __future__ import annotations

import json
import random

import pytest

from sovllm.config import Config, SplitSection
from sovllm.curate.build import build_splits
from sovllm.curate.negatives import answer_absent, build_on_topic, on_topic_context, remove_answer
from sovllm.curate.split import assign
from sovllm.errors import InputError
from sovllm.ingest.groups import chunk_groups
from sovllm.models.prompt import record_turn

CANTEEN = """## Cafeteria
The cafeteria on level 0 opens at 7:00 and closes at 18:30 on weekdays.
A staff lunch costs 4.20 euro with the badge.
- Weekend: 9:00 to 14:00
- Manager: Petra Lindqvist, extension 4471
Guests pay the full price of 7.90 euro. The salad bar is restocked at noon by the kitchen team."""


def test_the_answer_sentence_is_removed_and_the_rest_kept():
    left = on_topic_context(CANTEEN, "How much does a staff lunch cost?",
                            "A staff lunch costs 4.20 euro with the badge.", 0.5)
    assert left is not None and "4.20" not in left and "staff lunch" not in left
    assert "7.90 euro" in left and "Petra Lindqvist" in left and left.startswith("## Cafeteria")


def test_a_list_item_answer_takes_its_marker_with_it():
    left = on_topic_context(CANTEEN, "Who manages the cafeteria?", "Manager: Petra Lindqvist, extension 4471", 0.5)
    assert left is not None and "Lindqvist" not in left
    assert all(line.strip() not in ("-", "") for line in left.splitlines())


def test_one_sentence_of_a_line_goes_and_no_stray_space_is_left():
    left = on_topic_context(CANTEEN, "What do guests pay?", "Guests pay the full price of 7.90 euro.", 0.5)
    assert left is not None and "7.90" not in left
    assert "\nThe salad bar is restocked at noon by the kitchen team." in left


def test_a_fact_stated_twice_is_no_on_topic_negative():
    text = CANTEEN + "\nRemember: the staff lunch is 4.20 euro for everyone with a badge."
    assert on_topic_context(text, "How much does a staff lunch cost?",
                            "A staff lunch costs 4.20 euro with the badge.", 0.5) is None


def test_an_answer_that_only_restates_its_question_cannot_be_checked():
    assert not answer_absent("Anything at all.", "Does the cafeteria open on weekdays?",
                             "The cafeteria opens on weekdays.", 0.5)


def test_an_answer_not_in_the_text_is_not_removed():
    assert remove_answer(CANTEEN, "Parking costs 30 euro a month for staff.") is None


def test_too_little_left_is_no_context():
    assert remove_answer("## Note\nThe door code is 4711 since March.", "The door code is 4711 since March.") is None


TWO_SECTIONS = """Two-person rule
Controlled drugs are stored in a separate safe inside the medication room.
Removal: two qualified staff members must be present
Signatures: both sign the controlled drugs register
Lost badges
A lost badge must be reported at once to the security desk on extension 2200.
The first replacement in a calendar year costs 25 euros, every further one 40 euros."""


def test_an_overview_pair_takes_its_whole_section_with_it():
    question = "What does Access to Medication Rooms say about “Two-person rule”?"
    answer = "Controlled drugs are stored in a separate safe inside the medication room."
    # its first sentence alone would leave the section's fields, which still answer the question
    partly = on_topic_context(TWO_SECTIONS, question, answer, 0.5)
    assert partly is not None and "Removal:" in partly
    left = on_topic_context(TWO_SECTIONS, question, answer, 0.5, kind="overview")
    assert left is not None and left.startswith("Lost badges")
    assert "Two-person" not in left and "Removal" not in left and "Signatures" not in left
    assert "extension 2200" in left


FAQ = """Restores
How fast will the restore be done?
Enterprise tenants get a point-in-time restore into the restore lab within 8 hours, around the clock.
Do customers pay for restores?
Enterprise customers get unlimited restores at no charge.
Core and Plus customers get one free restore per calendar year, every further one is billed.
Restores caused by an Acme fault are never billed, regardless of edition.
How much data can be lost?
At most 5 minutes of database contents, because write-ahead logs are archived all the time."""


def test_an_faq_pair_takes_its_whole_entry_with_it():
    question = "Do customers pay for restores?"
    answer = "Enterprise customers get unlimited restores at no charge."  # the entry's first statement
    # its answer alone would leave the entry's other lines, which still answer the question
    partly = on_topic_context(FAQ, question, answer, 0.5)
    assert partly is not None and "never billed" in partly
    left = on_topic_context(FAQ, question, answer, 0.5, kind="faq")
    assert left is not None and question not in left
    assert "billed" not in left and "free restore" not in left
    # the entries before and after stay, the heading above them too
    assert left.startswith("Restores\nHow fast will the restore be done?") and "How much data can be lost?" in left


def test_the_last_section_of_a_chunk_goes_to_its_end():
    left = remove_answer(TWO_SECTIONS + "\nThe desk is staffed around the clock by two guards on duty.",
                         "A lost badge must be reported at once to the security desk on extension 2200.",
                         whole_section=True)
    assert left is not None and left.endswith("both sign the controlled drugs register")


def test_build_on_topic_prefers_one_per_chunk():
    chunks = {f"c{i}": {"id": f"c{i}", "doc_id": "d", "text": CANTEEN, "lang": "en"} for i in range(2)}
    pairs = [{"id": f"p{i}{j}", "chunk_id": f"c{i}", "question": q, "answer": a}
             for i in range(2) for j, (q, a) in enumerate([
                 ("How much does a staff lunch cost?", "A staff lunch costs 4.20 euro with the badge."),
                 ("What do guests pay?", "Guests pay the full price of 7.90 euro.")])]
    built = build_on_topic(pairs, chunks, 2, max_overlap=0.5, rng=random.Random(0))
    assert len(built) == 2 and {p["chunk_id"] for p, _ in built} == {"c0", "c1"}
    assert len(build_on_topic(pairs, chunks, 9, max_overlap=0.5, rng=random.Random(0))) == 4


def section_chunks(n_docs=3, per_doc=3):
    return [{"id": f"{d:016x}-{k:05d}", "doc_id": f"{d:016x}", "lang": "en", "n_tokens": 80,
             "heading_path": [f"Doc {d}"], "source": {"path": f"d{d}.md"},
             "text": f"## Part {k}\n" + " ".join(f"Rule {d}.{k}.{s} sets limit {d}{k}{s} for team {s} each "
                                                  f"month in building {k}." for s in range(4))}
            for d in range(n_docs) for k in range(per_doc)]


def test_few_documents_split_by_section_with_val_and_eval_never_empty():
    chunks = section_chunks()
    for seed in range(12):
        splits = assign(chunks, SplitSection(seed=seed), {c["id"]: 2 for c in chunks})
        assert splits["unit"] == "section" and "fewer than curate.splits.min_documents" in splits["leakage"]
        assert {splits["chunks"][c["id"]] for c in chunks} == {"train", "val", "eval"}, seed
        assert set(splits["chunks"]) == {c["id"] for c in chunks}


def test_a_split_section_stays_together():
    text = " ".join(f"word{i}" for i in range(60))
    chunks = [{"id": "a-0", "doc_id": "a", "text": text},
              {"id": "a-1", "doc_id": "a", "text": " ".join(text.split()[50:]) + " more words follow here"},
              {"id": "a-2", "doc_id": "a", "text": "A new section starts here with its own words."}]
    groups = chunk_groups(chunks, "section")
    assert groups["a-0"] == groups["a-1"] != groups["a-2"]


def test_enough_documents_split_by_document():
    chunks = section_chunks(n_docs=10, per_doc=1)
    splits = assign(chunks, SplitSection())
    assert splits["unit"] == "document" and "leakage" not in splits


def test_curate_builds_both_kinds_in_every_split():
    chunks = section_chunks(n_docs=3, per_doc=4)
    pairs = []
    for c in chunks:
        for s in range(4):
            sentence = next(x + "." for x in c["text"].split("\n")[1].split(". ") if f".{s} sets" in x)
            sentence = sentence.replace("..", ".")
            pairs.append({"id": f"{c['id']}-{s}", "chunk_id": c["id"], "type": "factual", "answer": sentence,
                          "question": f"Which limit does rule {sentence.split()[1]} set for team {s}?"})
    cfg = Config()
    splits = assign(chunks, cfg.curate.splits, {c["id"]: 4 for c in chunks})
    records, stats = build_splits(pairs, chunks, splits["chunks"], cfg)
    for split in ("val", "eval"):
        kinds = [r["meta"].get("negative") for r in records[split] if r["meta"]["type"] == "unanswerable"]
        assert "on_topic" in kinds, split
    train = records["train"]
    on_topic = [r for r in train if r["meta"].get("negative") == "on_topic"]
    assert on_topic and stats["train"]["unanswerable_on_topic"] == len(on_topic)
    for record in on_topic:
        context, question = record_turn(record)
        source = next(p for p in pairs if p["id"] == record["meta"]["pair_id"])
        assert source["question"] == question and source["answer"] not in context
        assert record["messages"][2]["content"] == cfg.prompt.refusal
        # the same ablated context also asks a question whose answer is still there, answered
        still = [r for r in train if r["meta"]["type"] != "unanswerable" and record_turn(r)[0] == context]
        assert all(r["messages"][2]["content"] in context for r in still)
    assert len({r["id"] for r in train}) == len(train)


def test_ingest_refuses_a_corpus_too_small_to_split(tmp_path):
    from sovllm.ingest.stage import check_size

    cfg = Config()
    one = section_chunks(n_docs=1, per_doc=2)
    with pytest.raises(InputError, match=r"too small to split: 1 document\(s\) with 2 section\(s\).*at least 3"):
        check_size(one, 900, cfg, tmp_path)
    with pytest.raises(InputError, match=r"too small: 300 tokens.*ingest.min_tokens \(500\)"):
        check_size(section_chunks(), 300, cfg, tmp_path)
    check_size(section_chunks(), 900, cfg, tmp_path)  # 9 sections, enough text


def test_calibration_builds_on_topic_val_items():
    from sovllm.curate.records import make_record
    from sovllm.train.calibrate import on_topic_val_records

    cfg = Config()
    chunk = {"id": "c", "doc_id": "d", "text": CANTEEN, "heading_path": ["Canteen"], "lang": "en"}
    record = make_record("r1", prompt=cfg.prompt, contexts=[chunk], question="How much does a staff lunch cost?",
                         answer="A staff lunch costs 4.20 euro with the badge.", chunk=chunk, type_="factual")
    out = on_topic_val_records([record], cfg.prompt.refusal, 0.5)
    assert len(out) == 1 and out[0]["meta"]["negative"] == "on_topic"
    context, question = record_turn(out[0])
    assert "4.20" not in context and "7.90" in context and question == "How much does a staff lunch cost?"
    assert json.dumps(out[0])  # a plain record
