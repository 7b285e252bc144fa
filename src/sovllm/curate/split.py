"""Splits grouped by document: a document's split is a function of (doc_id, seed) alone.

`u = sha256(seed, doc_id)` mapped to [0, 1) is compared with the cumulative fractions, so adding
a document never moves another one and every process (whatever PYTHONHASHSEED) agrees. All chunks
and pairs of a document share its split, so no val or eval context is ever seen in training.
"""

from __future__ import annotations

import hashlib

from sovllm.config import SplitSection

SPLITS = ("train", "val", "eval")


def unit_interval(doc_id: str, seed: int) -> float:
    digest = hashlib.sha256(f"sovllm-split\0{seed}\0{doc_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def split_of(doc_id: str, section: SplitSection) -> str:
    """'train', 'val' or 'eval' for a document."""
    u = unit_interval(doc_id, section.seed)
    if u < section.train:
        return "train"
    if u < section.train + section.val:
        return "val"
    return "eval"


def assign(documents: dict[str, str], section: SplitSection) -> dict:
    """The `splits.json` content for documents {doc_id: path}."""
    docs = {doc_id: {"split": split_of(doc_id, section), "path": path} for doc_id, path in sorted(documents.items())}
    return {"seed": section.seed, "fractions": {s: getattr(section, s) for s in SPLITS},
            "rule": "split = sha256('sovllm-split', seed, doc_id) as a number in [0,1) against the cumulative fractions",
            "documents": docs}


def check_leak_free(records: dict[str, list[dict]], chunk_split: dict[str, str]) -> None:
    """Raise if any record uses a chunk of a document from another split (a bug, never user input)."""
    for split, items in records.items():
        for item in items:
            for chunk_id in [item["meta"]["chunk_id"], *item["meta"]["context_ids"]]:
                owner = chunk_split.get(chunk_id)
                if owner != split:
                    raise RuntimeError(f"split leak: {item['id']} in {split} uses chunk {chunk_id} of a {owner} document")
