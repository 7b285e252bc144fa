"""Grouped splits: a group's split is a function of (group, seed) alone, with one exception.

The groups are documents, or with few documents sections (`sovllm.ingest.groups`). `u =
sha256(seed, group)` mapped to [0, 1) is compared with the cumulative fractions, so adding a
document never moves another one and every process (whatever PYTHONHASHSEED) agrees. All chunks and
pairs of a group share its split, so no val or eval context is ever seen in training.

The exception keeps val and eval from being empty on a small corpus: when no group with kept pairs
hashed into eval (or val), the train group closest to that split's interval moves there (the
highest `u` for eval, the one nearest the val interval for val), and `splits.json` lists it under
`moved`.
"""

from __future__ import annotations

import hashlib

from sovllm.config import SplitSection
from sovllm.ingest.groups import chunk_groups, split_unit

SPLITS = ("train", "val", "eval")
LEAKAGE = ("split by section ({why}): an eval question's document may have other sections in train, so eval "
           "measures a model that has read that document's neighbouring sections (optimistic); with "
           "{n} or more documents curate splits by document")


def unit_interval(group: str, seed: int) -> float:
    digest = hashlib.sha256(f"sovllm-split\0{seed}\0{group}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def split_of(group: str, section: SplitSection) -> str:
    """'train', 'val' or 'eval' for a group."""
    u = unit_interval(group, section.seed)
    if u < section.train:
        return "train"
    if u < section.train + section.val:
        return "val"
    return "eval"


def _fill_empty(split: dict[str, str], u: dict[str, float], weight: dict[str, int], section: SplitSection) -> list[str]:
    """Move groups so that val and eval each hold a group with kept pairs, train keeping at least one."""
    moved = []
    val_mid = section.train + section.val / 2
    for target, distance in (("eval", lambda g: -u[g]), ("val", lambda g: abs(u[g] - val_mid))):
        useful = [g for g in split if weight.get(g, 0) > 0]
        if any(split[g] == target for g in useful):
            continue
        donors = [g for g in useful if split[g] == "train"]
        if len(donors) < 2:  # train keeps one; take from the other split that has two
            donors = [g for g in useful if split[g] != target and sum(split[h] == split[g] for h in useful) > 1]
        if donors:
            group = min(donors, key=lambda g: (distance(g), g))
            split[group] = target
            moved.append(group)
    return moved


def assign(chunks: list[dict], section: SplitSection, kept: dict[str, int] | None = None) -> dict:
    """The `splits.json` content for `chunks`; `kept` counts kept pairs per chunk id (for the fill-up)."""
    documents: dict[str, str] = {}
    for chunk in chunks:
        documents.setdefault(chunk["doc_id"], chunk["source"]["path"])
    unit = split_unit(len(documents), section)
    chunk_group = chunk_groups(chunks, unit)
    groups = sorted(set(chunk_group.values()))
    u = {g: unit_interval(g, section.seed) for g in groups}
    split = {g: split_of(g, section) for g in groups}
    weight: dict[str, int] = {}
    for chunk_id, group in chunk_group.items():
        weight[group] = weight.get(group, 0) + (kept or {}).get(chunk_id, 1 if kept is None else 0)
    moved = _fill_empty(split, u, weight, section)
    chunk_split = {chunk_id: split[g] for chunk_id, g in chunk_group.items()}
    docs = {}
    for doc_id, path in sorted(documents.items()):
        counts = {s: sum(1 for c in chunks if c["doc_id"] == doc_id and chunk_split[c["id"]] == s) for s in SPLITS}
        used = [s for s in SPLITS if counts[s]]
        docs[doc_id] = {"split": used[0] if len(used) == 1 else "mixed", "path": path,
                        "chunks": {s: n for s, n in counts.items() if n}}
    out = {"seed": section.seed, "fractions": {s: getattr(section, s) for s in SPLITS}, "unit": unit,
           "rule": f"split = sha256('sovllm-split', seed, {unit}) as a number in [0,1) against the cumulative "
                   f"fractions; a {unit} is " + ("a document" if unit == "document" else "a chunk, with the chunks "
                                                   "continuing it (overlap) when a long section was split"),
           "groups": {g: {"split": split[g], "pairs": weight[g] if kept is not None else None} for g in groups},
           "moved": moved, "documents": docs, "chunks": chunk_split}
    if unit == "section":
        why = ("curate.splits.unit: section" if section.unit == "section"
               else f"the corpus has {len(documents)} documents, fewer than curate.splits.min_documents")
        out["leakage"] = LEAKAGE.format(why=why, n=section.min_documents)
    return out


def check_leak_free(records: dict[str, list[dict]], chunk_split: dict[str, str]) -> None:
    """Raise if any record uses a chunk of a group from another split (a bug, never user input)."""
    for split, items in records.items():
        for item in items:
            for chunk_id in [item["meta"]["chunk_id"], *item["meta"]["context_ids"]]:
                owner = chunk_split.get(chunk_id)
                if owner != split:
                    raise RuntimeError(f"split leak: {item['id']} in {split} uses chunk {chunk_id} of a {owner} group")
