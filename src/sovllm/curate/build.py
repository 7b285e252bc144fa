"""Building the split files from kept pairs: answerable records, negatives and distractors per split.

Everything here happens within one split: negatives pair a split's questions with the same split's
chunks, distractors come from the same split's other documents, so the leak check at the end can
never fail unless this code is wrong. Randomness comes from one seeded generator per split.
"""

from __future__ import annotations

import random
from collections import Counter

from sovllm.config import Config
from sovllm.curate.negatives import (
    build_negatives,
    foreign_questions,
    pick_distractors,
    wanted,
    with_distractors,
)
from sovllm.curate.records import make_record
from sovllm.curate.split import SPLITS, check_leak_free


def build_splits(kept: list[dict], chunks: list[dict], doc_split: dict[str, str], cfg: Config
                 ) -> tuple[dict[str, list[dict]], dict]:
    """(records by split, statistics by split) for the kept pairs."""
    section, prompt = cfg.curate, cfg.prompt
    chunk_by_id = {c["id"]: c for c in chunks}
    chunk_split = {c["id"]: doc_split[c["doc_id"]] for c in chunks}
    records: dict[str, list[dict]] = {}
    stats: dict[str, dict] = {}
    for split in SPLITS:
        rng = random.Random(f"{section.seed}:{split}")
        pairs = [p for p in kept if chunk_split[p["chunk_id"]] == split]
        split_chunks = [c for c in chunks if chunk_split[c["id"]] == split]
        share = section.unanswerable.get(split, 0.0)
        per_context = section.negatives_per_context if split == "train" else 0
        negatives, neg_stats = build_negatives(pairs, split_chunks, chunk_by_id,
                                               0 if per_context else wanted(len(pairs), share),
                                               max_overlap=section.max_overlap, rng=rng)
        out, with_extra = [], 0
        distract = section.distractors if split == "train" else 0.0
        chunk_contexts: dict[str, list[dict]] = {}  # with negatives_per_context: one context per chunk
        for pair in pairs:
            chunk = chunk_by_id[pair["chunk_id"]]
            contexts = chunk_contexts.get(chunk["id"]) if per_context else None
            if contexts is None:
                contexts = [chunk]
                if distract and rng.random() < distract:
                    extra = pick_distractors(split_chunks, {chunk["doc_id"]}, rng.randint(1, section.max_distractors), rng)
                    contexts = with_distractors(chunk, extra, rng, section.max_context_tokens)
                chunk_contexts[chunk["id"]] = contexts
            with_extra += len(contexts) > 1
            out.append(make_record(pair["id"], prompt=prompt, contexts=contexts, question=pair["question"],
                                   answer=pair["answer"], chunk=chunk, type_=pair["type"], pair_id=pair["id"]))
        uses: Counter = Counter()
        for chunk_id, contexts in chunk_contexts.items() if per_context else ():
            whole, part = int(per_context), per_context - int(per_context)
            count = whole + (1 if part and rng.random() < part else 0)
            neg_stats.wanted += count
            for foreign in foreign_questions(contexts, pairs, chunk_by_id, count, max_overlap=section.max_overlap,
                                             rng=rng, lang=chunk_by_id[chunk_id].get("lang"), uses=uses):
                uses[foreign["id"]] += 1
                out.append(make_record(f"{foreign['id']}-unanswerable-{uses[foreign['id']]}", prompt=prompt,
                                       contexts=contexts, question=foreign["question"], answer=prompt.refusal,
                                       chunk=chunk_by_id[foreign["chunk_id"]], type_="unanswerable",
                                       pair_id=foreign["id"], lang=chunk_by_id[chunk_id].get("lang")))
                neg_stats.built += 1
                with_extra += len(contexts) > 1
        for neg in negatives:
            source = chunk_by_id[neg.pair["chunk_id"]]
            contexts = [neg.context]
            if distract and rng.random() < distract:
                extra = pick_distractors(split_chunks, {neg.context["doc_id"], source["doc_id"]},
                                         rng.randint(1, section.max_distractors), rng,
                                         question=neg.pair["question"], max_overlap=section.max_overlap)
                contexts = with_distractors(neg.context, extra, rng, section.max_context_tokens)
                with_extra += len(contexts) > 1
            out.append(make_record(f"{neg.pair['id']}-unanswerable", prompt=prompt, contexts=contexts,
                                   question=neg.pair["question"], answer=prompt.refusal, chunk=source,
                                   type_="unanswerable", pair_id=neg.pair["id"], lang=neg.context.get("lang")))
        records[split] = out
        stats[split] = {
            "documents": len({c["doc_id"] for c in split_chunks}), "chunks": len(split_chunks),
            "answerable": len(pairs), "unanswerable": len(out) - len(pairs), "unanswerable_wanted": neg_stats.wanted,
            "negatives_discarded_overlap": neg_stats.discarded_overlap,
            "negatives_without_other_document": neg_stats.no_context, "with_distractors": with_extra,
            "by_type": dict(sorted(Counter(r["meta"]["type"] for r in out).items())),
            "by_lang": dict(sorted(Counter(r["meta"]["lang"] or "und" for r in out).items())),
        }
    check_leak_free(records, chunk_split)
    return records, stats
