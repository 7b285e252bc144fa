"""An evaluation project: real curate splits of the synthetic corpus, models served by a scripted endpoint."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from sovllm.config import load_config
from sovllm.curate import stage as curate
from tests.curate.conftest import make_chunks, make_pairs, write_project

REFUSAL = "The provided context does not contain enough information to answer this question."


def eval_project(root: Path, port: int, extra: str = "") -> Path:
    chunks = make_chunks()
    write_project(root, chunks, make_pairs(chunks), config=(
        "curate:\n  splits: {train: 0.5, val: 0.25, eval: 0.25, seed: 13}\n"
        # the scripted endpoint answers every model name it is asked for: nothing to load there
        f"endpoint:\n  base_url: http://127.0.0.1:{port}/v1\n  model: fake-model\n  adapter_loading: none\n"
        "eval:\n  models: [fake-model, tuned]\n  max_tokens: 64\n  resamples: 2000\n"
        "  judge: {items: 4, repeat: 2, verbosity: 2, gold: labels/gold.jsonl}\n" + extra))
    curate.run(root, load_config(root, ("curate.judge.mode=off",)), None, log=lambda _: None)
    return root


def reference_of(body: dict) -> str | None:
    """The eval item's reference answer (the test's oracle): by the exact user turn, else by the question."""
    user = body["messages"][-1]["content"]
    question = user.rsplit("Question:", 1)[-1].strip()
    return ANSWERS.get(user) or ANSWERS.get(question)


ANSWERS: dict[str, str] = {}


def load_answers(root: Path) -> None:
    ANSWERS.clear()
    for line in (root / "out" / "curate" / "eval.jsonl").read_text().splitlines():
        record = json.loads(line)
        ANSWERS[record["messages"][1]["content"]] = record["messages"][2]["content"]
        if record["meta"]["type"] != "unanswerable":  # unanswerable items reuse answerable questions
            ANSWERS[record["meta"]["question"]] = record["messages"][2]["content"]


def script(body: dict, n: int):
    """tuned: the reference answer; fake-model: a rambling answer that never refuses; judge calls: JSON."""
    fmt = body.get("response_format")
    if fmt:
        name = fmt["json_schema"]["name"]
        if name == "pairwise":
            user = body["messages"][-1]["content"]
            one = re.search(r"ANSWER 1: (.*?)\n\nANSWER 2:", user, re.S).group(1)
            ref = re.search(r"REFERENCE ANSWER: (.*?)\n\nANSWER 1:", user, re.S).group(1)
            return 200, json.dumps({"winner": "1" if one.strip() == ref.strip() else "2", "reasoning": "closer"})
        return 200, json.dumps({"rating": "A", "hallucination": False, "reasoning": "matches"})
    reference = reference_of(body) or "unknown"
    if body["model"] == "tuned":
        return 200, reference
    return 200, "Well, the rules are explained in detail in several documents of the team."


@pytest.fixture
def project(tmp_path, fake):
    endpoint = fake(script)
    root = eval_project(tmp_path / "p", endpoint.port)
    load_answers(root)
    return root, endpoint
