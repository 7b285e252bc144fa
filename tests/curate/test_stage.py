"""The curate stage end to end on a synthetic project: splits, leaks, negatives, distractors, funnel, judge."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager

import pytest

from sovllm.config import load_config
from sovllm.curate import stage
from sovllm.curate.negatives import overlap
from sovllm.curate.split import assign
from sovllm.endpoint import Endpoint
from sovllm.errors import InputError
from tests.curate.conftest import make_chunks, make_pairs, read, write_project

SPLITS = ("train", "val", "eval")


def no_endpoint():
    raise AssertionError("the judge is off: no endpoint may be opened")


def run(root, *overrides, endpoint_factory=no_endpoint, **kw):
    cfg = load_config(root, ("curate.judge.mode=off", *overrides))
    return stage.run(root, cfg, endpoint_factory, log=lambda _: None, **kw), cfg


def outputs(root):
    out = root / "out" / "curate"
    return {s: read(out / f"{s}.jsonl") for s in SPLITS}, json.loads((out / "splits.json").read_text())


def test_splits_are_grouped_by_document_and_leak_free(project):
    run(project)
    records, splits = outputs(project)
    doc_split = {d: v["split"] for d, v in splits["documents"].items()}
    assert set(doc_split.values()) == set(SPLITS), "12 documents land in all three splits"
    chunk_doc = {c["id"]: c["doc_id"] for c in read(project / "out" / "ingest" / "chunks.jsonl")}
    for split, items in records.items():
        assert items, split
        for item in items:
            used = [item["meta"]["chunk_id"], *item["meta"]["context_ids"]]
            assert {doc_split[chunk_doc[c]] for c in used} == {split}, item["id"]
    train_chunks = {c for r in records["train"] for c in [r["meta"]["chunk_id"], *r["meta"]["context_ids"]]}
    held_out = {c for s in ("val", "eval") for r in records[s] for c in r["meta"]["context_ids"]}
    assert not train_chunks & held_out


def test_records_follow_the_contract(project):
    _, cfg = run(project)
    records, _ = outputs(project)
    item = next(r for r in records["eval"] if r["meta"]["type"] == "factual")
    system, user, assistant = item["messages"]
    assert [m["role"] for m in item["messages"]] == ["system", "user", "assistant"]
    assert cfg.prompt.refusal in system["content"] and cfg.prompt.system.strip() in system["content"]
    assert user["content"].endswith(f"Question: {item['meta']['question']}")
    assert "policy > Part" in user["content"]  # the heading path precedes the context
    assert assistant["content"] and assistant["content"] != cfg.prompt.refusal
    assert set(item["meta"]) >= {"chunk_id", "doc_id", "type", "question", "context_ids", "lang"}


def test_negatives_share_sources_and_overlap(project):
    _, cfg = run(project, "curate.dedup.near=false", "curate.negatives_per_context=0", "curate.on_topic=0")
    records, _ = outputs(project)
    chunks = {c["id"]: c for c in read(project / "out" / "ingest" / "chunks.jsonl")}
    funnel = json.loads((project / "out" / "curate" / "funnel.json").read_text())
    for split, items in records.items():
        negatives = [r for r in items if r["meta"]["type"] == "unanswerable"]
        answerable = len(items) - len(negatives)
        share = cfg.curate.unanswerable[split]
        assert negatives, split
        assert abs(len(negatives) - round(answerable * share / (1 - share))) <= 1, split
        assert funnel["unanswerable"][split]["unanswerable"] == len(negatives)
        for neg in negatives:
            source, context = chunks[neg["meta"]["chunk_id"]], chunks[neg["meta"]["context_ids"][0]]
            assert neg["messages"][2]["content"] == cfg.prompt.refusal
            assert context["doc_id"] != source["doc_id"]
            assert all(overlap(neg["meta"]["question"], chunks[c]["text"]) <= 0.5 for c in neg["meta"]["context_ids"])


def test_hard_negative_prefers_the_most_similar_other_document():
    from random import Random

    from sovllm.curate.negatives import build_negatives

    chunks = [
        {"id": "a-0", "doc_id": "a", "lang": "en", "text": "Backups are kept for 35 days in Frankfurt."},
        {"id": "b-0", "doc_id": "b", "lang": "en", "text": "Invoices are paid within 30 days by transfer."},
        {"id": "c-0", "doc_id": "c", "lang": "en", "text": "Snapshots of laptops are kept on the vault for audits."},
        {"id": "d-0", "doc_id": "d", "lang": "en", "text": "How long are backups kept in Frankfurt? Forever."},
    ]
    pair = {"id": "p", "chunk_id": "a-0", "question": "How long are backups kept?"}
    by_id = {c["id"]: c for c in chunks}
    negatives, stats = build_negatives([pair], chunks, by_id, 1, max_overlap=0.5, rng=Random(0))
    # d-0 scores highest but would answer the question (overlap 1.0): discarded; c-0 shares "kept" only
    assert [n.context["id"] for n in negatives] == ["c-0"]
    assert stats.discarded_overlap == 1


def test_distractors_only_in_train_from_other_documents_of_the_split(project):
    run(project, "curate.distractors=0.5")
    records, splits = outputs(project)
    chunk_doc = {c["id"]: c["doc_id"] for c in read(project / "out" / "ingest" / "chunks.jsonl")}
    answerable = [r for r in records["train"] if r["meta"]["type"] != "unanswerable"]
    with_extra = [r for r in answerable if len(r["meta"]["context_ids"]) > 1]
    assert 0.25 < len(with_extra) / len(answerable) < 0.75
    for r in with_extra:
        gold = r["meta"]["chunk_id"]
        assert gold in r["meta"]["context_ids"] and 2 <= len(r["meta"]["context_ids"]) <= 3
        others = [c for c in r["meta"]["context_ids"] if c != gold]
        assert all(chunk_doc[c] != chunk_doc[gold] for c in others)
        assert r["messages"][1]["content"].count("policy > Part") == len(r["meta"]["context_ids"])
    assert {r["meta"]["context_ids"].index(r["meta"]["chunk_id"]) for r in with_extra} != {0}, "gold is shuffled"
    for split in ("val", "eval"):
        assert all(len(r["meta"]["context_ids"]) == 1 for r in records[split])


def test_split_is_stable_when_a_document_is_added():
    from sovllm.config import SplitSection

    def chunks(n):
        return [{"id": f"{i:016x}-00000", "doc_id": f"{i:016x}", "text": f"Document {i} states fact {i}.",
                 "source": {"path": f"d{i}.md"}} for i in range(n)]

    docs = chunks(40)
    before = assign(docs, SplitSection())
    after = assign(docs + [{"id": "f" * 16 + "-00000", "doc_id": "f" * 16, "text": "New.", "source": {"path": "n.md"}}],
                   SplitSection())
    assert before["unit"] == after["unit"] == "document" and not before["moved"]
    assert all(after["documents"][d]["split"] == v["split"] for d, v in before["documents"].items())
    assert assign(docs, SplitSection(seed=1))["documents"] != before["documents"]  # the seed matters


@pytest.mark.integration  # curate in several Python processes
def test_outputs_are_identical_across_processes_and_hash_seeds(tmp_path):
    chunks = make_chunks()
    files = []
    for hash_seed in ("1", "2"):
        root = write_project(tmp_path / hash_seed, chunks, make_pairs(chunks))
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        proc = subprocess.run([sys.executable, "-m", "sovllm", "curate", str(root), "--set",
                               "curate.judge.mode=off"], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        files.append({name: (root / "out" / "curate" / name).read_bytes()
                      for name in ("train.jsonl", "val.jsonl", "eval.jsonl", "splits.json", "curated.jsonl")})
    assert files[0] == files[1]


def test_funnel_counts_each_filter_and_rerun_skips(project):
    pairs = read(project / "out" / "synth" / "qa.jsonl")
    pairs[0]["question"] = "What does the text say?"
    pairs[1]["answer"] = "As an AI, I cannot know that."
    pairs.append({**pairs[2], "id": "dup"})
    (project / "out" / "synth" / "qa.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    result, _ = run(project, "curate.dedup.near=false")
    funnel = result.manifest.extra["funnel"]
    assert funnel["answerable"]["input"] == len(pairs)
    assert funnel["answerable"]["removed"] == {"generic_question": 1, "assistant_speak": 1, "duplicate": 1}
    assert funnel["answerable"]["kept"] == len(pairs) - 3
    curated = {p["id"]: p for p in read(project / "out" / "curate" / "curated.jsonl")}
    assert curated[pairs[2]["id"]]["kept"] != curated["dup"]["kept"]
    loser = curated["dup"] if not curated["dup"]["kept"] else curated[pairs[2]["id"]]
    assert loser["drop_reason"] == "duplicate" and loser["dup_of"] in (pairs[2]["id"], "dup")
    again, _ = run(project, "curate.dedup.near=false")
    assert again.skipped


def test_disabled_rule_still_flags_but_keeps(project):
    pairs = read(project / "out" / "synth" / "qa.jsonl")
    pairs[0]["question"] = "What does the text say about it?"
    (project / "out" / "synth" / "qa.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    run(project, "curate.rules=[empty,too_short]")
    first = read(project / "out" / "curate" / "curated.jsonl")[0]
    assert first["flags"] == ["generic_question"] and first["kept"]


def test_too_few_kept_fails_naming_the_filter(project):
    pairs = read(project / "out" / "synth" / "qa.jsonl")
    for p in pairs[:len(pairs) - 5]:
        p["answer"] = "Sure! " + p["answer"]
    (project / "out" / "synth" / "qa.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    with pytest.raises(InputError, match=rf"fewer than curate.min_kept \(10\).*'assistant_speak' \({len(pairs) - 5} pairs\)"):
        run(project)
    assert (project / "out" / "curate" / "funnel.json").is_file()  # written for the review


def test_unknown_chunk_is_a_clear_error(project):
    qa = project / "out" / "synth" / "qa.jsonl"
    pairs = read(qa)
    pairs[3]["chunk_id"] = "nope-00000"
    qa.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    with pytest.raises(InputError, match=r"qa.jsonl:4: pair .* names chunk nope-00000"):
        run(project)


# --- judge -----------------------------------------------------------------------------------


def verdict_script(body, n):
    user = body["messages"][-1]["content"]
    bad = "helpdesk" in user.split("ANSWER:")[1]
    return 200, json.dumps({"rating": "C" if bad else "A", "hallucination": bad,
                            "reasoning": "Invented." if bad else "From the chunk."})


def endpoint_of(fake_endpoint, model=None):
    @contextmanager
    def factory():
        yield Endpoint(fake_endpoint.base_url, model or fake_endpoint.model)
    return factory


def test_judge_filter_mode_drops_unfit_pairs(project, fake):
    server = fake(verdict_script)
    cfg = load_config(project, ("curate.judge.mode=filter", "curate.dedup.near=false"))
    result = stage.run(project, cfg, endpoint_of(server), log=lambda _: None)
    curated = read(project / "out" / "curate" / "curated.jsonl")
    judged = [p for p in curated if p["judge"]]
    assert len(judged) == len(curated) == len(server.requests)
    bad = [p for p in curated if "helpdesk" in p["answer"]]
    assert bad and all(p["drop_reason"] == "judge" and p["judge"]["rating"] == "C" for p in bad)
    assert all(p["kept"] for p in curated if "helpdesk" not in p["answer"])
    funnel = result.manifest.extra["funnel"]
    assert funnel["answerable"]["removed"] == {"judge": len(bad)} and funnel["judge"]["removed"] == len(bad)
    request = server.requests[0]
    assert request["temperature"] == 0 and request["response_format"]["type"] == "json_schema"
    assert "CHUNK:" in request["messages"][-1]["content"]


def test_judge_auto_with_the_bundled_model_only_reports(project, fake):
    server = fake(verdict_script)
    cfg = load_config(project, ("curate.judge.report_limit=10", "curate.dedup.near=false"))
    result = stage.run(project, cfg, endpoint_of(server, model="smollm2-135m-instruct"), log=lambda _: None)
    curated = read(project / "out" / "curate" / "curated.jsonl")
    judge = result.manifest.extra["funnel"]["judge"]
    assert judge["mode"] == "report" and judge["graded"] == 10 == len(server.requests)
    assert all(p["kept"] for p in curated) and sum(bool(p["judge"]) for p in curated) == 10
    assert judge["would_remove"] == sum(1 for p in curated if p["judge"] and p["judge"]["rating"] == "C")
    assert "bundled 135M" in judge["why_report_only"]


def test_judge_auto_with_another_model_filters(project, fake):
    server = fake(verdict_script)
    cfg = load_config(project, ("curate.dedup.near=false",))
    result = stage.run(project, cfg, endpoint_of(server, model="llama-3.1-70b"), log=lambda _: None)
    assert result.manifest.extra["funnel"]["judge"]["mode"] == "filter"


def test_judge_failures_are_counted_and_keep_the_pair(project, fake):
    server = fake(lambda body, n: (200, "not json") if n % 2 else verdict_script(body, n))
    cfg = load_config(project, ("curate.judge.mode=filter", "curate.dedup.near=false"))
    result = stage.run(project, cfg, endpoint_of(server), log=lambda _: None)
    judge = result.manifest.extra["funnel"]["judge"]
    assert judge["failures"]["schema"] == (len(server.requests) + 1) // 2
    curated = read(project / "out" / "curate" / "curated.jsonl")
    failed = [p for p in curated if p["judge"] and p["judge"].get("error") == "schema"]
    assert failed and all(p["kept"] for p in failed)


def test_warns_when_eval_has_a_language_training_lacks():
    stats = {"train": {"by_lang": {"en": 40}}, "val": {"by_lang": {"en": 5, "de": 2}},
             "eval": {"by_lang": {"en": 20, "de": 9, "und": 1}}}
    lines = stage.untrained_languages(stats)
    assert len(lines) == 2
    assert lines[0].startswith("warning: 2 val items are in 'de'") and "curate.splits.seed" in lines[0]
    assert lines[1].startswith("warning: 9 eval items are in 'de'")
    assert stage.untrained_languages({"train": {"by_lang": {"en": 1, "de": 1}},
                                      "eval": {"by_lang": {"de": 3}}}) == []


def test_negatives_per_context_put_foreign_questions_on_each_training_context(project):
    _, cfg = run(project, "curate.dedup.near=false", "curate.negatives_per_context=2", "curate.distractors=0.5",
                 "curate.on_topic=0")
    records, _ = outputs(project)
    chunks = {c["id"]: c for c in read(project / "out" / "ingest" / "chunks.jsonl")}
    funnel = json.loads((project / "out" / "curate" / "funnel.json").read_text())
    train = records["train"]
    by_context: dict[tuple, list[dict]] = {}
    for r in train:
        by_context.setdefault(tuple(r["meta"]["context_ids"]), []).append(r)
    answerable = [r for r in train if r["meta"]["type"] != "unanswerable"]
    # a chunk's questions share one context (with its distractors), and that exact context carries two
    # foreign questions, so training computes it once for all of them
    assert len(by_context) == len({r["meta"]["chunk_id"] for r in answerable})
    for context_ids, items in by_context.items():
        own = [r for r in items if r["meta"]["type"] != "unanswerable"]
        foreign = [r for r in items if r["meta"]["type"] == "unanswerable"]
        assert own and len(foreign) == 2, context_ids
        assert len({r["messages"][1]["content"].rsplit("Question:", 1)[0] for r in items}) == 1
        docs = {chunks[c]["doc_id"] for c in context_ids}
        for neg in foreign:
            assert neg["messages"][2]["content"] == cfg.prompt.refusal
            assert chunks[neg["meta"]["chunk_id"]]["doc_id"] not in docs
            assert overlap(neg["meta"]["question"], "\n".join(chunks[c]["text"] for c in context_ids)) <= 0.5
    assert any(len(c) > 1 for c in by_context), "distractors still apply"
    assert len({r["id"] for r in train}) == len(train)
    assert funnel["unanswerable"]["train"]["unanswerable"] == 2 * len(by_context)
    # val and eval keep their shares
    for split in ("val", "eval"):
        negatives = [r for r in records[split] if r["meta"]["type"] == "unanswerable"]
        share = cfg.curate.unanswerable[split]
        assert abs(len(negatives) - round((len(records[split]) - len(negatives)) * share / (1 - share))) <= 1


def test_a_foreign_question_is_not_reused_while_enough_unused_candidates_remain():
    from collections import Counter
    from random import Random

    from sovllm.curate.negatives import foreign_questions

    chunks, contexts = {}, []
    for i in range(6):  # six contexts of document a, all about the policy
        chunks[f"a-{i}"] = {"id": f"a-{i}", "doc_id": "a", "lang": "en", "text": f"policy rule{i} clause{i} scope{i}"}
        contexts.append(chunks[f"a-{i}"])
    chunks["b-0"] = {"id": "b-0", "doc_id": "b", "lang": "en", "text": "other"}
    # the short question shares half its content words with every context: the hardest everywhere
    pairs = [{"id": "short", "chunk_id": "b-0", "question": "What is the security policy?"}]
    pairs += [{"id": f"q{k}", "chunk_id": "b-0", "question": f"Where does term{k} meet word{k} and item{k}?"}
              for k in range(10)]
    uses: Counter = Counter()
    for context in contexts:
        for pair in foreign_questions([context], pairs, chunks, 1, max_overlap=0.5, rng=Random(0), lang="en",
                                      uses=uses):
            uses[pair["id"]] += 1
    assert sorted(uses.values()) == [1] * 6  # six contexts, six different questions
    again = foreign_questions([contexts[0]], pairs, chunks, 1, max_overlap=0.5, rng=Random(0), lang="en")
    assert again[0]["id"] in {p["id"] for p in pairs}
    # without uses it is ranked by difficulty alone: the short question is among the best two every time
    firsts = {foreign_questions([c], pairs, chunks, 1, max_overlap=0.5, rng=Random(s), lang="en")[0]["id"]
              for s in range(20) for c in contexts}
    assert "short" in firsts


def test_a_fraction_of_a_negative_per_context_is_drawn_per_context(project):
    run(project, "curate.dedup.near=false", "curate.negatives_per_context=0.5")
    records, _ = outputs(project)
    counts: dict[tuple, int] = {}
    for r in records["train"]:
        key = tuple(r["meta"]["context_ids"])
        counts[key] = counts.get(key, 0) + (r["meta"]["type"] == "unanswerable")
    assert set(counts.values()) == {0, 1}
    assert 0.2 < sum(counts.values()) / len(counts) < 0.8
