"""`sovllm curate` and `sovllm curate review` through the real entry point."""

from __future__ import annotations

import json

from tests.cli.test_cli import cli


def test_curate_prints_funnel_and_splits(project, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    code, out, err = cli(["curate", project, "--set", "curate.judge.mode=off"], capsys)
    assert code == 0, err
    assert "curate: kept" in out and "splits (grouped by document)" in out
    code, out, _ = cli(["curate", project, "--set", "curate.judge.mode=off"], capsys)
    assert code == 0 and "up to date, skipped" in out


def test_review_writes_the_page(project, capsys):
    qa = project / "out" / "synth" / "qa.jsonl"
    pairs = [json.loads(line) for line in qa.read_text().splitlines()]
    pairs[0]["question"] = "What does the text say?"
    qa.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    assert cli(["curate", project, "--set", "curate.judge.mode=off"], capsys)[0] == 0
    code, out, _ = cli(["curate", "review", project], capsys)
    page = project / "out" / "curate" / "review.html"
    assert code == 0 and str(page) in out.replace("\n", "")
    html = page.read_text()
    assert "What does the text say?" in html and "generic_question" in html


def test_curate_before_synth_is_one_clear_line(tmp_path, capsys):
    (tmp_path / "sovllm.yaml").write_text("version: 1\n")
    (tmp_path / "out" / "ingest").mkdir(parents=True)
    (tmp_path / "out" / "ingest" / "chunks.jsonl").write_text("")
    code, _, err = cli(["curate", tmp_path], capsys)
    assert code == 2 and "qa.jsonl: no QA pairs yet" in err and "sovllm synth" in err


def test_review_before_curate_is_one_clear_line(tmp_path, capsys):
    (tmp_path / "sovllm.yaml").write_text("version: 1\n")
    code, _, err = cli(["curate", "review", tmp_path], capsys)
    assert code == 2 and "nothing curated yet" in err
