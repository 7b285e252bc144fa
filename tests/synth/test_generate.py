"""The generation loop against a scripted endpoint: retries, backoff, bounded concurrency, reuse,
sharding and merging."""

from __future__ import annotations

import asyncio
import json
from contextlib import contextmanager

import pytest

from sovllm.artifacts import read_jsonl
from sovllm.config import load_config
from sovllm.endpoint import ChatClient
from sovllm.errors import BackendError, InputError
from sovllm.project import init_project
from sovllm.synth import stage
from sovllm.synth.generate import Settings, generate
from sovllm.synth.prompt import PromptSet
from tests.synth.conftest import CHUNKS, chunk_for, endpoint_of, first_sentence, good_free, text_of

SETTINGS = dict(types=["factual", "conceptual"], temperature=0.5, top_p=1.0, seed=0, max_attempts=3, grounding=0.6,
                question_max=120, answer_max=240)


def run(chunks, endpoint, tmp_path, *, extractive=False, concurrency=4, reuse=True, **overrides):
    settings = Settings(**{**SETTINGS, **overrides}, extractive=extractive)
    return asyncio.run(generate(chunks, endpoint=endpoint, prompts=PromptSet(), settings=settings,
                                cache_path=tmp_path / "cache.jsonl", concurrency=concurrency, timeout=30, reuse=reuse))


def test_free_mode_retries_invalid_output_then_records_the_failure(fake, tmp_path):
    def script(body, n):
        chunk = chunk_for(body)
        types = body["response_format"]["json_schema"]["schema"]["required"]
        if chunk["id"] == "doc0-00000":  # always ungrounded: fails after max_attempts
            return 200, json.dumps({t: {"question": f"Where is Paris {t}?", "answer": "Paris is in France."}
                                    for t in types})
        if chunk["id"] == "doc1-00000" and "conceptual" in types and len(types) == 2:
            pair = {"question": "How long does a Tunnelwerk session last?", "answer": first_sentence(chunk["text"])}
            return 200, json.dumps({"factual": pair, "conceptual": {"question": "Where is Paris located?",
                                                                    "answer": "Paris is in France."}})
        return good_free(body, n)

    endpoint = fake(script)
    results, stats = run(CHUNKS[:2], endpoint_of(endpoint), tmp_path)
    by_chunk = {r["chunk_id"]: r for r in results.values()}
    failed = by_chunk["doc0-00000"]
    assert failed["pairs"] == [] and failed["requests"] == 3
    assert {f["reason"] for f in failed["failed"]} == {"grounding"} and "Paris" in failed["failed"][0]["raw"]
    retried = by_chunk["doc1-00000"]
    assert [p["type"] for p in retried["pairs"]] == ["factual", "conceptual"] and retried["requests"] == 2
    # the retry asked only for the missing type
    second = [b for b in endpoint.requests if "Part 1" in text_of(b)][1]
    assert second["response_format"]["json_schema"]["schema"]["required"] == ["conceptual"]


def test_extractive_mode_answers_are_chunk_sentences(fake, tmp_path):
    def script(body, n):
        statement = text_of(body).split("\n", 1)[1]
        words = [w.strip(".,„“\"") for w in statement.split() if len(w) > 4][:3]
        start = "Was passiert mit " if "Aussage" in text_of(body) else "What happens with "
        return 200, json.dumps({"question": start + " ".join(words) + "?"})

    endpoint = fake(script)
    results, _ = run(CHUNKS[:4], endpoint_of(endpoint, embedded=True), tmp_path, extractive=True)
    for record in results.values():
        chunk = next(c for c in CHUNKS if c["id"] == record["chunk_id"])
        assert record["pairs"], record
        for pair in record["pairs"]:
            assert pair["answer"] in chunk["text"] and pair["question"].endswith("?")
    schema = endpoint.requests[0]["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["question"]["pattern"].startswith("^(What|")


def test_server_errors_are_retried_with_backoff(fake, tmp_path, monkeypatch):
    import sovllm.endpoint

    sleeps = []

    async def record_sleep(delay):
        sleeps.append(delay)

    monkeypatch.setattr(sovllm.endpoint, "_sleep", record_sleep)

    def script(body, n):
        if n == 1:
            return 429, "slow down", {"Retry-After": "2"}
        if n == 2:
            return 503, "overloaded"
        return good_free(body, n)

    endpoint = fake(script)
    results, stats = run(CHUNKS[:1], endpoint_of(endpoint), tmp_path, concurrency=1)
    assert next(iter(results.values()))["pairs"] and len(endpoint.requests) == 3
    assert len(sleeps) == 2 and 1.0 <= sleeps[0] <= 3.0  # Retry-After: 2, jittered ±50 %
    assert 0.5 <= sleeps[1] <= 3.0  # second retry: exponential backoff (2 s ± 50 %)


def test_client_gives_up_after_bounded_retries(fake):
    endpoint = fake(lambda body, n: (500, "broken"))
    client = ChatClient(endpoint_of(endpoint), max_retries=2, backoff=0.01)
    with pytest.raises(BackendError, match="after 3 attempts"):
        asyncio.run(client.complete([{"role": "user", "content": "hi"}]))
    assert len(endpoint.requests) == 3


def test_bad_request_is_not_retried_and_is_recorded(fake, tmp_path):
    endpoint = fake(lambda body, n: (400, "This model's maximum context length is 2048 tokens."))
    results, _ = run(CHUNKS[:1], endpoint_of(endpoint), tmp_path)
    record = next(iter(results.values()))
    assert len(endpoint.requests) == 1 and record["failed"][0]["reason"] == "endpoint"
    assert "maximum context length" in record["failed"][0]["raw"]


def test_concurrency_is_bounded(fake, tmp_path):
    endpoint = fake(good_free, delay=0.2)
    chunks = [{**CHUNKS[i % 6], "id": f"c{i}", "text": CHUNKS[i % 6]["text"] + f" Note {i}."} for i in range(12)]
    run(chunks, endpoint_of(endpoint), tmp_path, concurrency=3)
    assert endpoint.max_in_flight == 3


def test_reuse_is_keyed_by_text_and_settings(fake, tmp_path):
    endpoint = fake(good_free)
    run(CHUNKS, endpoint_of(endpoint), tmp_path)
    first = len(endpoint.requests)
    _, stats = run(CHUNKS, endpoint_of(endpoint), tmp_path)
    assert len(endpoint.requests) == first and stats.reused == len(CHUNKS)
    moved = [{**c, "id": c["id"].replace("doc", "renamed")} for c in CHUNKS]  # same text, new ids: reused
    run(moved, endpoint_of(endpoint), tmp_path)
    assert len(endpoint.requests) == first
    edited = [dict(c) for c in CHUNKS]
    edited[2]["text"] += " Added sentence."
    _, stats = run(edited, endpoint_of(endpoint), tmp_path)
    assert len(endpoint.requests) == first + 1 and stats.generated == 1
    run(CHUNKS, endpoint_of(endpoint), tmp_path, pairs_per_chunk=9)  # free mode ignores it: reused
    assert len(endpoint.requests) == first + 1
    run(CHUNKS, endpoint_of(endpoint), tmp_path, temperature=0.9)  # other sampling: regenerate all
    assert len(endpoint.requests) == first + 1 + len(CHUNKS)


@pytest.fixture
def project(tmp_path):
    init_project(tmp_path / "p")
    root = tmp_path / "p"
    (root / "out" / "ingest").mkdir(parents=True)
    (root / "out" / "ingest" / "chunks.jsonl").write_text("".join(json.dumps(c) + "\n" for c in CHUNKS))
    return root


def test_shards_and_merge_equal_an_unsharded_run(fake, project):
    endpoint = fake(good_free)
    cfg = load_config(project, ["synth.types=[factual, conceptual]"])

    @contextmanager
    def factory():
        yield endpoint_of(endpoint)

    whole = stage.run(project, cfg, factory, log=lambda _: None)
    unsharded = list(read_jsonl(project / "out" / "synth" / "qa.jsonl"))
    assert whole.manifest.counts["pairs"] == len(unsharded) > 0
    for k in (1, 2, 3):
        stage.run(project, cfg, factory, shard=(k, 3), log=lambda _: None)
    shard_ids = [{p["chunk_id"] for p in read_jsonl(project / "out" / "synth" / "shards" / f"{k}-of-3" / "qa.jsonl")}
                 for k in (1, 2, 3)]
    assert not (shard_ids[0] & shard_ids[1]) and not (shard_ids[1] & shard_ids[2])
    (project / "out" / "synth" / "qa.jsonl").unlink()
    result = stage.merge(project, cfg, 3)
    merged = list(read_jsonl(project / "out" / "synth" / "qa.jsonl"))
    assert result["pairs"] == len(merged) and [p["id"] for p in merged] == [p["id"] for p in unsharded]


def test_merge_refuses_missing_shards(fake, project):
    cfg = load_config(project)
    with pytest.raises(Exception, match="2 of 2 shards have no successful run"):
        stage.merge(project, cfg, 2)


def test_parse_shard():
    assert stage.parse_shard("2/4") == (2, 4)
    for bad in ("0/4", "5/4", "x", "1-2"):
        with pytest.raises(Exception, match="--shard"):
            stage.parse_shard(bad)


def test_a_torn_last_cache_line_is_cut_off_on_resume(fake, tmp_path):
    """kill -9 during the cache write: the resumed run must not glue its records to the cut-off line."""
    endpoint = fake(good_free)
    run(CHUNKS[:3], endpoint_of(endpoint), tmp_path, concurrency=1)
    cache = tmp_path / "cache.jsonl"
    lines = cache.read_bytes().splitlines(keepends=True)
    cache.write_bytes(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    asked = len(endpoint.requests)
    _, stats = run(CHUNKS[:3], endpoint_of(endpoint), tmp_path, concurrency=1)  # resume: the torn chunk again
    assert stats.reused == 2 and stats.generated == 1
    assert len(list(read_jsonl(cache))) == 3  # every line whole: no glued record
    _, stats = run(CHUNKS[:3], endpoint_of(endpoint), tmp_path, concurrency=1)
    assert stats.reused == 3 and len(endpoint.requests) == asked + 1


def test_a_corrupt_cache_line_in_the_middle_is_an_error_naming_file_and_line(fake, tmp_path):
    endpoint = fake(good_free)
    run(CHUNKS[:3], endpoint_of(endpoint), tmp_path, concurrency=1)
    cache = tmp_path / "cache.jsonl"
    lines = cache.read_text().splitlines(keepends=True)
    cache.write_text(lines[0] + lines[1][:20] + "\n" + lines[2])
    asked = len(endpoint.requests)
    with pytest.raises(InputError, match=r"cache.jsonl:2: not valid JSON") as err:
        run(CHUNKS[:3], endpoint_of(endpoint), tmp_path, concurrency=1)
    assert "delete that line (or the whole file)" in str(err.value) and len(endpoint.requests) == asked


SECTIONS = {"id": "k-00000", "doc_id": "k", "lang": "en", "heading_path": ["Night Shift Handover"], "n_tokens": 200,
            "source": {"path": "k.md", "sha256": "0" * 64, "page": None}, "meta": {},
            "text": "Handover times\nThe evening handover starts at 21:15 in the ward office. The morning handover "
                    "starts at 6:00 for every ward.\n\nIsolation patients are handed over at the bedside by the nurse. "
                    "Night nurses write the report while the day team reads it first.\n"
                    "Who signs\n- Form: NM-P-12 in the yellow folder\nStudent nurses may never sign as nurse in charge "
                    "because they lack the licence. The deputy on the roster signs when the nurse in charge is absent."}


def question_about(body, n):
    """A usable question for the statement in an extractive prompt (three of its longer words)."""
    statement = text_of(body).split("\n", 1)[1]
    words = [w.strip(".,„“\"") for w in statement.split() if len(w) > 4][:3]
    return 200, json.dumps({"question": "What happens with " + " ".join(words) + "?"})


def synth_project(tmp_path, chunks):
    init_project(tmp_path / "p")
    root = tmp_path / "p"
    (root / "out" / "ingest").mkdir(parents=True)
    (root / "out" / "ingest" / "chunks.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chunks))
    return root


def test_extractive_mode_asks_several_questions_per_chunk_besides_its_structure_pairs(fake, tmp_path):
    root = synth_project(tmp_path, [SECTIONS])
    endpoint = fake(question_about)

    @contextmanager
    def factory():
        yield endpoint_of(endpoint, embedded=True)

    kinds = "synth.structure=[faq, overview, field, table]"  # `sovllm init` may write an older list
    cfg = load_config(root, ["synth.pairs_per_chunk=4", kinds])
    stage.run(root, cfg, factory, log=lambda _: None)
    pairs = list(read_jsonl(root / "out" / "synth" / "qa.jsonl"))
    model = [p for p in pairs if p["generator"]["method"] == "model"]
    overview = next(p for p in pairs if p["generator"]["method"] == "overview")
    assert len(model) == 4 and len(endpoint.requests) == 4  # asked although the chunk has structure pairs
    assert [p["id"] for p in model] == ["k-00000-factual", "k-00000-conceptual", "k-00000-comparison",
                                        "k-00000-factual-2"]
    assert len({p["id"] for p in pairs}) == len(pairs) and {p["generator"]["method"] for p in pairs} == \
        {"model", "overview", "field"}
    asked = [text_of(b) for b in endpoint.requests]
    # no request for a sentence a structure pair already answers, and no sentence asked twice
    assert not any(sentence in prompt for prompt in asked for sentence in overview["answer"].split(". "))
    assert len({p["answer"] for p in model}) == 4
    assert any("Student nurses" in p["answer"] for p in model)  # the second section is covered too
    summary = json.loads((root / "out" / "synth" / "summary.json").read_text())
    assert summary["pairs_by_method"]["model"] == 4 and summary["pairs_per_chunk"] == len(pairs)

    (root / "out" / "synth" / "qa.jsonl").unlink()  # rebuilt from the cache: same ids, no request
    stage.run(root, cfg, factory, force=True, log=lambda _: None)
    assert [p["id"] for p in read_jsonl(root / "out" / "synth" / "qa.jsonl")] == [p["id"] for p in pairs]
    assert len(endpoint.requests) == 4
    # the structure pairs decide which sentences are asked about: turning them off re-asks the chunk
    stage.run(root, load_config(root, ["synth.pairs_per_chunk=4", "synth.structure=[]"]), factory,
              log=lambda _: None)
    assert len(endpoint.requests) == 8


def test_retries_per_question_are_bounded_by_max_attempts(fake, tmp_path):
    endpoint = fake(lambda body, n: (200, json.dumps({"question": "What is the answer to this question?"})))
    results, _ = run([SECTIONS], endpoint_of(endpoint, embedded=True), tmp_path, extractive=True, max_attempts=2,
                     pairs_per_chunk=3, types=["factual", "conceptual", "comparison"])
    record = next(iter(results.values()))
    assert record["pairs"] == [] and len(endpoint.requests) <= 3 * 2
    assert {f["reason"] for f in record["failed"]} == {"generic"}


def test_the_bundled_model_is_asked_for_english_chunks_only_by_default(fake, tmp_path):
    from sovllm.endpoint import Endpoint

    german = {**SECTIONS, "id": "g-00000", "doc_id": "g", "lang": "de",
              "text": "Die Übergabe beginnt um 21:15 Uhr im Stationszimmer der Station. Danach zählt die Nachtschicht."}
    root = synth_project(tmp_path, [SECTIONS, german])

    def script(body, n):
        if "Aussage" in text_of(body):
            return 200, json.dumps({"question": "Wann beginnt die Übergabe im Stationszimmer?"})
        return question_about(body, n)

    endpoint = fake(script)

    @contextmanager
    def factory():
        yield Endpoint(endpoint.base_url, "smollm2-135m-instruct", None, True)

    logs = []
    stage.run(root, load_config(root), factory, log=logs.append)
    assert not any("Aussage" in text_of(b) for b in endpoint.requests) and endpoint.requests
    assert "asked for 1 of 2 chunks (synth.model_languages: en)" in logs[0]
    stage.run(root, load_config(root, ["synth.model_languages=[en, de]"]), factory, log=logs.append)
    assert any("Aussage" in text_of(b) for b in endpoint.requests)
