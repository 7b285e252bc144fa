"""The ingest stage end to end on a tiny model: contract fields, stable unique IDs, dedup, bad files."""

from __future__ import annotations

import json
import os

import pytest

from sovllm.artifacts import read_jsonl
from sovllm.cli import main
from sovllm.config import load_config
from sovllm.errors import InputError
from sovllm.ingest import stage
from sovllm.project import init_project
from tests.ingest.conftest import make_pdf

DOC = "# Travel\n\n{body}\n\n## Hotels\n\nLeipzig: 110 EUR per night. Berlin: 140 EUR per night.\n"


@pytest.fixture
def project(tmp_path, tiny_model_dir):
    init_project(tmp_path / "p")
    root = tmp_path / "p"
    config = root / "sovllm.yaml"
    config.write_text(config.read_text().replace("base: smollm2-135m-instruct", f"base: {tiny_model_dir}")
                      .replace("chunk_size: 512", "chunk_size: 128").replace("chunk_overlap: 64", "chunk_overlap: 16"))
    docs = root / "documents"
    (docs / "hr").mkdir()
    (docs / "it").mkdir()
    (docs / "hr" / "faq.md").write_text(DOC.format(body=" ".join(f"Vacation rule {i}: 30 days." for i in range(40))), encoding="utf-8")
    (docs / "it" / "faq.md").write_text(DOC.format(body=" ".join(f"VPN rule {i}: sessions end after 9 hours." for i in range(40))), encoding="utf-8")
    return root


def run(root, **kwargs):
    return stage.run(root, load_config(root), warn=lambda _: None, **kwargs)


def chunks(root):
    return list(read_jsonl(root / "out" / "ingest" / "chunks.jsonl"))


def test_records_follow_the_data_contract(project):
    result = run(project)
    records = chunks(project)
    assert records and result.manifest.counts["chunks"] == len(records)
    for r in records:
        assert set(r) == {"id", "doc_id", "text", "n_tokens", "heading_path", "lang", "source", "meta"}
        assert r["text"].strip() and 0 < r["n_tokens"] <= 128
        assert r["source"]["path"] in ("hr/faq.md", "it/faq.md") and len(r["source"]["sha256"]) == 64
        assert r["lang"] == "en" and r["heading_path"][0] == "Travel"
    stats = json.loads((project / "out" / "ingest" / "stats.json").read_text())
    assert stats["documents"] == 2 and sum(stats["token_histogram"].values()) == len(records)


def test_same_file_name_in_two_folders_gives_distinct_unique_ids(project):
    run(project)
    records = chunks(project)
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids))
    doc_ids = {r["source"]["path"]: r["doc_id"] for r in records}
    assert doc_ids["hr/faq.md"] != doc_ids["it/faq.md"]
    # Identical "Hotels" sections in both files: the second copy is an exact duplicate and dropped.
    assert sum("110 EUR" in r["text"] for r in records) == 1
    assert json.loads((project / "out" / "ingest" / "stats.json").read_text())["duplicates_removed"] == 1


def test_ids_are_stable_and_local_to_their_document(project):
    run(project)
    before = {r["id"]: r["text"] for r in chunks(project)}
    assert run(project).skipped  # nothing changed
    (project / "documents" / "it" / "faq.md").write_text(DOC.format(body=" ".join(f"VPN rule {i}: sessions end after 8 hours." for i in range(40))))
    assert not run(project).skipped
    after = {r["id"]: r["text"] for r in chunks(project)}
    unchanged = {i: t for i, t in before.items() if "Vacation" in t}
    assert unchanged and all(after[i] == t for i, t in unchanged.items())


def test_bad_files_are_skipped_listed_and_the_run_continues(project):
    docs = project / "documents"
    (docs / "empty.md").write_bytes(b"")
    (docs / "binary.txt").write_bytes(b"\x00\x01\x02" * 100)
    (docs / "latin1.txt").write_bytes("Überstunden".encode("latin-1"))
    (docs / "image.png").write_bytes(b"\x89PNG")
    make_pdf(docs / "secret.pdf", [[("Secret", 10)]], encrypt="pw")
    (docs / "corrupt.docx").write_bytes(b"PK\x03\x04 not really a zip")
    os.symlink(docs / "gone.md", docs / "dangling.md")  # unreadable: its target does not exist
    (project / "outside.md").write_text("# Outside\n\nNot part of the documents folder.\n")
    os.symlink(project / "outside.md", docs / "linked.md")
    (docs / "recursive.md").write_text("---\nrefs: &a [*a]\n---\n# T\n\nBody.\n")
    (docs / "undefined.html").write_bytes(b'<meta charset="undefined"><p>caf\xe9</p>')
    warnings = []
    result = stage.run(project, load_config(project), warn=warnings.append)
    skipped = {s["path"]: s["reason"] for s in result.manifest.extra["skipped"]}
    assert set(skipped) == {"empty.md", "binary.txt", "latin1.txt", "image.png", "secret.pdf", "corrupt.docx",
                            "dangling.md", "linked.md", "recursive.md", "undefined.html"}
    assert "unreadable" in skipped["dangling.md"] and "encrypted" in skipped["secret.pdf"]
    assert "not valid UTF-8" in skipped["latin1.txt"] and "unsupported format '.png'" in skipped["image.png"]
    assert skipped["linked.md"] == "symbolic link to a file outside the documents folder (not followed)"
    assert skipped["recursive.md"] == "front matter: recursive YAML alias (*a inside &a)"
    assert "declared charset 'undefined'" in skipped["undefined.html"]
    stats = json.loads((project / "out" / "ingest" / "stats.json").read_text())
    assert stats["skipped"] == result.manifest.extra["skipped"]
    assert all(any(path in w for w in warnings) for path in skipped)
    assert result.manifest.counts["documents"] == 2


def test_folder_without_usable_documents_is_exit_code_2(project, capsys):
    for path in (project / "documents").rglob("*.md"):
        path.write_bytes(b"")
    with pytest.raises(InputError, match="no usable document"):
        run(project)
    with pytest.raises(SystemExit) as info:
        main(["ingest", str(project)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error:")][0].count("no usable document") == 1


def test_quick_picks_one_document_per_format(project):
    docs = project / "documents"
    (docs / "notes.txt").write_text("PARKING\n\nTwelve spaces behind the building, booked in Kompass.\n")
    cfg = load_config(project, ["ingest.quick_documents=2"])
    result = stage.run(project, cfg, quick=True, warn=lambda _: None)
    assert {r["source"]["path"] for r in chunks(project)} == {"hr/faq.md", "notes.txt"}
    assert result.manifest.config["quick"] is True


def test_sidecar_metadata_reaches_the_records(project):
    (project / "documents" / "hr" / "faq.md.meta.yaml").write_text("owner: People team\nconfidential: true\n")
    run(project)
    meta = {r["source"]["path"]: r["meta"] for r in chunks(project)}
    assert meta["hr/faq.md"] == {"owner": "People team", "confidential": True} and meta["it/faq.md"] == {}


def test_cli_ingest_prints_the_statistics_table(project, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as info:
        main(["ingest", str(project)])
    out = capsys.readouterr().out
    assert info.value.code == 0
    for fragment in ("2 documents", "chunk length (tokens)", "hr/faq.md", "it/faq.md", "languages: en 2", "tokens/s"):
        assert fragment in out


def test_explicit_locations_move_the_stage_folders_and_the_default_layout_is_unchanged(project, tmp_path):
    from sovllm import layout

    cfg = load_config(project)
    assert layout.folder(project, cfg, "chunks") == project / "out" / "ingest"
    assert layout.folder(project, cfg, "shards") == project / "out" / "synth" / "shards"
    elsewhere = tmp_path / "mounted" / "chunks"
    moved = load_config(project, (f"project.locations.chunks={elsewhere}", "project.locations.pairs=work/pairs",
                                  f"project.documents={project / 'documents'}"))
    assert layout.folder(project, moved, "pairs") == project / "work" / "pairs"  # relative: to the project folder
    assert layout.folder(project, moved, "shards") == project / "work" / "pairs" / "shards"
    first = stage.run(project, moved, warn=lambda _: None)
    assert (elsewhere / "chunks.jsonl").is_file() and (elsewhere / "manifest.json").is_file()
    assert not (project / "out" / "ingest").exists()
    again = stage.run(project, moved, warn=lambda _: None)
    assert again.skipped and again.manifest.key == first.manifest.key
    # where a stage's folder lies is not part of its key: the default layout's run has the same key
    assert run(project).manifest.key == first.manifest.key
    from sovllm.synth.stage import load_chunks

    path, loaded = load_chunks(project, moved)
    assert path == elsewhere / "chunks.jsonl" and len(loaded) == first.manifest.counts["chunks"]
    with pytest.raises(KeyError, match="unknown artifact"):
        layout.folder(project, cfg, "ingest")
