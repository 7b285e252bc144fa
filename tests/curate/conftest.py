"""A small synthetic project for curate: 12 documents × 3 chunks with distinct vocabularies, two pairs per chunk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TOPICS = [
    ("backup", "Frankfurt", "snapshot", "retention"), ("laptop", "Bitlocker", "encryption", "helpdesk"),
    ("invoice", "Ledgerline", "payment", "dunning"), ("holiday", "Urlaub", "vacation", "carryover"),
    ("incident", "pager", "escalation", "postmortem"), ("office", "Porto", "badge", "reception"),
    ("release", "Tourbook", "changelog", "rollout"), ("password", "FIDO2", "rotation", "vault"),
    ("travel", "Bahn", "reimbursement", "receipt"), ("support", "Hafen", "ticket", "priority"),
    ("onboarding", "buddy", "checklist", "mentor"), ("privacy", "GDPR", "deletion", "consent"),
]


def make_chunks(n_docs: int = 12) -> list[dict]:
    chunks = []
    for d in range(n_docs):
        a, b, c, e = TOPICS[d % len(TOPICS)]
        doc_id = f"{d:016x}"
        for k in range(3):
            text = (f"The {a} rules of {b} apply to every team. A {c} must be recorded within {k + d + 2} days. "
                    f"Each {e} request needs approval from the {a} owner in {b}. Section {k} explains the {c} "
                    f"limits for {a} number {k + 10 * d}.")
            chunks.append({"id": f"{doc_id}-{k:05d}", "doc_id": doc_id, "text": text, "n_tokens": 60,
                           "heading_path": [f"{a.title()} policy", f"Part {k}"], "lang": "en",
                           "source": {"path": f"docs/{a}.md", "sha256": "0" * 64, "page": None}})
    return chunks


def make_pairs(chunks: list[dict]) -> list[dict]:
    pairs = []
    for chunk in chunks:
        a, b, c = chunk["heading_path"][0].split()[0].lower(), chunk["text"].split()[4], chunk["text"].split()[10]
        k = chunk["id"][-1]
        pairs.append({"id": f"{chunk['id']}-factual", "chunk_id": chunk["id"], "type": "factual",
                      "question": f"Within how many days must a {c} for {a} part {k} be recorded?",
                      "answer": chunk["text"].split(". ")[1] + ".", "generator": {"model": "m", "endpoint": "e"}})
        pairs.append({"id": f"{chunk['id']}-conceptual", "chunk_id": chunk["id"], "type": "conceptual",
                      "question": f"Who approves {a} requests in {b} for part {k}?",
                      "answer": chunk["text"].split(". ")[2] + ".", "generator": {"model": "m", "endpoint": "e"}})
    return pairs


# seed 13 puts 6 / 3 / 3 of the 12 documents into train / val / eval
SPLIT_CONFIG = "curate:\n  splits: {train: 0.5, val: 0.25, eval: 0.25, seed: 13}\n"


def write_project(root: Path, chunks: list[dict], pairs: list[dict], config: str = SPLIT_CONFIG) -> Path:
    (root / "out" / "ingest").mkdir(parents=True, exist_ok=True)
    (root / "out" / "synth").mkdir(parents=True, exist_ok=True)
    (root / "sovllm.yaml").write_text("version: 1\nproject:\n  name: t\n" + config, encoding="utf-8")
    (root / "out" / "ingest" / "chunks.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chunks))
    (root / "out" / "synth" / "qa.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return root


@pytest.fixture
def project(tmp_path):
    chunks = make_chunks()
    return write_project(tmp_path / "p", chunks, make_pairs(chunks))


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
