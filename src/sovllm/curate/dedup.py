"""Deduplication of questions: exact (after normalising) and near duplicates (MinHash-LSH).

Near duplicates are found with datasketch's MinHash-LSH over a question's content words and their
bigrams (`sovllm.text.shingles`), so "What is the backup retention period?" and "What is the
retention period of backups?" meet while questions that merely share a template ("What is …?") do
not. Candidates from the LSH
index are confirmed with the MinHash similarity estimate; clusters are the connected components.
Within and across chunks alike, a cluster keeps its best pair (`rank`) and the others are dropped
with `dup_of` pointing at the keeper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from sovllm.config import DedupSection
from sovllm.text import norm_question, shingles


@dataclass
class Duplicate:
    kind: str  # "duplicate" (exact) or "near_duplicate"
    keeper: str


def _components(ids: list[str], edges: list[tuple[str, str]]) -> list[list[str]]:
    parent = {i: i for i in ids}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[str, list[str]] = {}
    for i in ids:
        groups.setdefault(find(i), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def find_duplicates(pairs: list[dict], section: DedupSection, rank: Callable[[dict], tuple]) -> dict[str, Duplicate]:
    """Pair id → Duplicate for every pair that loses to a better one of its cluster.

    `rank(pair)` orders pairs within a cluster: the smallest key is kept.
    """
    by_id = {p["id"]: p for p in pairs}
    dropped: dict[str, Duplicate] = {}

    def resolve(groups: list[list[str]], kind: str) -> None:
        for group in groups:
            keeper = min(group, key=lambda i: (rank(by_id[i]), i))
            for i in group:
                if i != keeper:
                    dropped[i] = Duplicate(kind, keeper)

    if section.exact:
        by_key: dict[str, list[str]] = {}
        for p in pairs:
            by_key.setdefault(norm_question(p["question"]), []).append(p["id"])
        resolve([g for g in by_key.values() if len(g) > 1], "duplicate")
    if section.near:
        survivors = [p for p in pairs if p["id"] not in dropped]
        resolve(_near_groups(survivors, section), "near_duplicate")
    return dropped


def _near_groups(pairs: list[dict], section: DedupSection) -> list[list[str]]:
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=section.threshold, num_perm=section.num_perm)
    hashes: dict[str, MinHash] = {}
    for p in pairs:
        grams = shingles(p["question"])
        if len(grams) < 3:  # too little text to call two questions near-identical
            continue
        m = MinHash(num_perm=section.num_perm, seed=1)
        m.update_batch([g.encode("utf-8") for g in sorted(grams)])
        hashes[p["id"]] = m
        lsh.insert(p["id"], m)
    edges = []
    for pid, m in hashes.items():
        for other in lsh.query(m):
            if other > pid and m.jaccard(hashes[other]) >= section.threshold:
                edges.append((pid, other))
    return _components(list(hashes), edges)
