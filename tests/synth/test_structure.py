"""Pairs read off the document structure: FAQ entries and section overviews, and how synth adds them."""

from __future__ import annotations

import json
from contextlib import contextmanager

from sovllm.artifacts import read_jsonl
from sovllm.config import load_config
from sovllm.project import init_project
from sovllm.synth import stage
from sovllm.synth.structure import faq_pairs, overview_pairs, structure_pairs
from tests.synth.conftest import endpoint_of, first_sentence


def chunk(text: str, *, lang: str = "en", path=("HR FAQ",), title: str | None = None, cid: str = "d-00000") -> dict:
    return {"id": cid, "doc_id": cid.split("-")[0], "lang": lang, "heading_path": list(path), "n_tokens": 80,
            "source": {"path": "x.md", "sha256": "0" * 64, "page": None}, "meta": {"title": title or path[0]},
            "text": text}


FAQ = chunk("""Vacation
How many vacation days do I get?
Full-time employees on a 5-day week receive 30 vacation days per calendar year.
Can I work part-time during parental leave?
Yes, up to 32 hours per week. Requests have to be submitted at least 7 weeks before the part-time phase starts.
Who approves a restore?
- the data owner
- the DPO
| Queue | Owner |
What about a sick child? | see table
""")


def test_faq_questions_get_the_statements_below_them():
    pairs = faq_pairs(FAQ, 240)
    assert pairs == [
        {"question": "How many vacation days do I get?",
         "answer": "Full-time employees on a 5-day week receive 30 vacation days per calendar year."},
        {"question": "Can I work part-time during parental leave?",  # a short first sentence is fine for FAQ
         "answer": "Yes, up to 32 hours per week. Requests have to be submitted at least 7 weeks before the "
                   "part-time phase starts."},
    ]  # a question followed by a bare list, and a table row, give nothing


def test_faq_answer_respects_the_length_limit():
    long = chunk("How do I file the request?\n" + " ".join(["Open a ticket in the DATA-RESTORE queue today."] * 8))
    answer = faq_pairs(long, 100)[0]["answer"]
    assert len(answer) <= 100 and answer.startswith("Open a ticket")
    assert faq_pairs(chunk("How do I file it?\n" + "word " * 60 + "end."), 100) == []  # one sentence too long


def test_overview_question_names_document_and_section_in_its_language():
    en = chunk("6. Patching deadlines\nDeadlines start when the vendor releases the patch. Critical fixes take "
               "at most 72 hours on servers.", path=("IT Security Policy",))
    assert overview_pairs(en, 240) == [{
        "question": "What does the IT Security Policy say about “Patching deadlines”?",
        "answer": "Deadlines start when the vendor releases the patch. Critical fixes take at most 72 hours on servers."}]
    de = chunk("3.4 Sonderurlaub\nFür bestimmte persönliche Anlässe gewährt Acme bezahlten Sonderurlaub von bis zu "
               "drei Tagen.", lang="de", path=("Personalhandbuch Leipzig", "3. Urlaub"))
    assert overview_pairs(de, 240)[0]["question"] == "Was steht in „Personalhandbuch Leipzig“ zum Thema „Urlaub: Sonderurlaub“?"


def test_one_word_sub_heading_gets_its_parent_only_when_numbering_nests_it():
    text = "{} Anspruch\nVollzeitbeschäftigte erhalten 30 Urlaubstage pro Kalenderjahr bei einer Fünf-Tage-Woche."
    nested = chunk(text.format("3.1"), lang="de", path=("Handbuch", "3. Urlaub"))
    sibling = chunk(text.format("4."), lang="de", path=("Handbuch", "3. Urlaub"))
    assert "„Urlaub: Anspruch“" in overview_pairs(nested, 240)[0]["question"]
    assert "„Anspruch“" in overview_pairs(sibling, 240)[0]["question"]


def test_no_overview_without_a_heading_that_opens_with_a_statement():
    assert overview_pairs(chunk("Deadlines start when the vendor releases the patch, for every server."), 240) == []
    assert overview_pairs(chunk("Approvals\n- the data owner\n- the DPO and the CISO"), 240) == []
    assert overview_pairs(chunk("IT Security Policy\nThis policy sets the minimum rules for every user of IT.",
                                path=("IT Security Policy",)), 240) == []  # the title is not a section
    kinds = structure_pairs(FAQ, ["faq"], 240)
    assert [p["name"] for p in kinds] == ["faq-1", "faq-2"] and structure_pairs(FAQ, [], 240) == []


def test_synth_adds_structure_pairs_after_model_pairs_unless_the_question_was_asked(fake, tmp_path):
    init_project(tmp_path / "p")
    root = tmp_path / "p"
    (root / "out" / "ingest").mkdir(parents=True)
    (root / "out" / "ingest" / "chunks.jsonl").write_text(json.dumps(FAQ) + "\n")

    def answer(body, n):  # the model asks one of the FAQ questions itself
        return 200, json.dumps({"factual": {"question": "How many vacation days do I get?",
                                            "answer": first_sentence(FAQ["text"].splitlines()[2])}})

    endpoint = fake(answer)

    @contextmanager
    def factory():
        yield endpoint_of(endpoint)

    cfg = load_config(root, ["synth.types=[factual]", "synth.answer_mode=free"])
    stage.run(root, cfg, factory, log=lambda _: None)
    pairs = list(read_jsonl(root / "out" / "synth" / "qa.jsonl"))
    assert [(p["id"], p["generator"]["method"]) for p in pairs] == [("d-00000-factual", "model"),
                                                                     ("d-00000-faq-2", "faq")]
    summary = json.loads((root / "out" / "synth" / "summary.json").read_text())
    assert summary["pairs_by_method"] == {"model": 1, "faq": 1} and summary["chunks_with_model_pair"] == 1

    cfg = load_config(root, ["synth.types=[factual]", "synth.answer_mode=free", "synth.structure=[]"])
    stage.run(root, cfg, factory, log=lambda _: None)  # a config change re-runs; the model pair is reused
    assert [p["id"] for p in read_jsonl(root / "out" / "synth" / "qa.jsonl")] == ["d-00000-factual"]
    assert len(endpoint.requests) == 1


def test_unnumbered_heading_under_a_heading_line_and_the_title_of_a_web_page():
    notes = chunk("Ledgerline 7.2\nNew features\nLesefix, Acme's own OCR engine, replaces the licensed engine for "
                  "PDF invoices.", path=("Ledgerline Release Notes",), title="Ledgerline Release Notes – Kompass")
    assert overview_pairs(notes, 240)[0]["question"] == \
        "What does the Ledgerline Release Notes say about “Ledgerline 7.2: New features”?"


def test_fill_asks_the_model_only_for_chunks_without_structure_pairs(fake, tmp_path):
    init_project(tmp_path / "p")
    root = tmp_path / "p"
    (root / "out" / "ingest").mkdir(parents=True)
    plain = chunk("The Tunnelwerk session ends after eight hours of use. Engineers must reconnect with the blue key.",
                  cid="e-00000")
    (root / "out" / "ingest" / "chunks.jsonl").write_text(json.dumps(FAQ) + "\n" + json.dumps(plain) + "\n")

    def answer(body, n):  # a valid pair for whichever chunk is in the prompt
        faq = "vacation days" in body["messages"][-1]["content"]
        source = FAQ["text"].splitlines()[2] if faq else plain["text"]
        return 200, json.dumps({"factual": {"question": f"When does the {'vacation' if faq else 'session'} rule apply?",
                                            "answer": first_sentence(source)}})

    endpoint = fake(answer)

    @contextmanager
    def factory():
        yield endpoint_of(endpoint)

    for mode, asked in (("fill", 1), ("all", 2)):  # `all` reuses the cached chunk and asks for the other
        cfg = load_config(root, ["synth.types=[factual]", "synth.answer_mode=free", f"synth.model_pairs={mode}"])
        stage.run(root, cfg, factory, log=lambda _: None)
        assert len(endpoint.requests) == asked
    cfg = load_config(root, ["synth.types=[factual]", "synth.answer_mode=free", "synth.model_pairs=fill"])
    stage.run(root, cfg, factory, log=lambda _: None)
    assert len(endpoint.requests) == 2
    assert [p["id"] for p in read_jsonl(root / "out" / "synth" / "qa.jsonl")] == \
        ["d-00000-faq-1", "d-00000-faq-2", "e-00000-factual"]
    # the default asks the model for every chunk, with the embedded model too; `auto` is `all`
    from sovllm.synth.generate import Settings
    default, auto = load_config(root).synth, load_config(root, ["synth.model_pairs=auto"]).synth
    assert default.model_pairs == "all"
    assert not any(Settings.from_config(s, embedded=e).fill for s in (default, auto) for e in (True, False))


def test_no_pair_whose_answer_would_be_the_first_item_of_a_list_or_points_on_to_one():
    listed = chunk("4.1 Full-disk encryption\n- Linux laptops use LUKS2 with argon2id and a passphrase.\n"
                   "- Mac laptops use FileVault with a recovery key in Werkbank.", path=("IT Security Policy",))
    pointing = chunk("First-week checklist\nBy Friday of your first week, you should have ticked off all of these.\n"
                     "- Laptop set up and encrypted", path=("Onboarding Guide",))
    faq = chunk("Who approves?\n- Up to EUR 1,500: your manager and nobody else.\n- Above: the CFO of the company.")
    assert overview_pairs(listed, 240) == [] and overview_pairs(pointing, 240) == [] and faq_pairs(faq, 240) == []


def test_every_section_that_opens_with_a_statement_gets_an_overview():
    text = ("Badge access\nMedication rooms open only with a staff badge that carries the MED level.\n\n"
            "Two-person rule\n- Removal: two qualified staff members\n\n"
            "Monthly audit\nThe hospital pharmacy audits every register on the first Wednesday of each month.")
    pairs = structure_pairs(chunk(text, path=("Access to Medication Rooms",)), ["overview"], 240)
    assert [(p["name"], p["question"]) for p in pairs] == [
        ("overview", "What does the Access to Medication Rooms say about “Badge access”?"),
        ("overview-2", "What does the Access to Medication Rooms say about “Monthly audit”?")]  # a list: none


def test_a_chunk_that_opens_its_section_gets_the_overview_of_its_heading_path():
    from sovllm.synth.headings import mark_section_openings

    path = ("Personalhandbuch", "1. Arbeitszeit", "1.4 Gleitzeitkonto")
    first = chunk("Jede Abweichung von der Sollzeit fließt in das Gleitzeitkonto des Monats.", lang="de", path=path,
                  cid="d-00002")
    later = chunk("Am 31. Dezember dürfen höchstens 40 Plusstunden übertragen werden.", lang="de", path=path,
                  cid="d-00003")
    other_doc = {**chunk("Ein anderes Dokument beginnt hier mit einem ganzen Satz.", lang="de", path=path,
                         cid="e-00000"), "doc_id": "e"}
    chunks = [chunk("Einleitung des Handbuchs mit einem ganzen Satz am Anfang.", lang="de", path=path[:2],
                    cid="d-00001"), first, later, other_doc]
    mark_section_openings(chunks)
    assert [c["opens_section"] for c in chunks] == [True, True, False, True]
    assert overview_pairs(first, 240) == [{
        "question": "Was steht in „Personalhandbuch“ zum Thema „Arbeitszeit: Gleitzeitkonto“?",
        "answer": "Jede Abweichung von der Sollzeit fließt in das Gleitzeitkonto des Monats."}]
    assert overview_pairs(later, 240) == []  # it continues the section: its first lines do not open it
    assert overview_pairs({**first, "heading_path": ["Personalhandbuch"]}, 240) == []  # the title is no section


def test_a_question_two_structure_pairs_of_a_chunk_share_is_dropped():
    text = "Parking\nStaff park in the east garage on levels 3 and 4 every day.\nParking\nVisitors park outside at the gate."
    assert structure_pairs(chunk(text, path=("Office Guide",)), ["overview"], 240) == []
