"""Building the split files from kept pairs: answerable records, negatives and distractors per split.

Everything here happens within one split: negatives pair a split's questions with the same split's
chunks, distractors come from the same split's other documents, so the leak check at the end can
never fail unless this code is wrong. Randomness comes from one seeded generator per split.

Unanswerable items come in two kinds (`sovllm.curate.negatives`), `curate.on_topic` of them
on-topic (the pair's own chunk with its answer removed), the rest foreign (another document's
question). In val and eval they make up `curate.unanswerable` of the split; when one kind cannot
be built (a split with one document has no foreign questions) the other fills in. In train with
`curate.negatives_per_context`, each context carries its share of foreign questions, and each
on-topic negative is a context of its own: the chunk without one pair's answer, asked that pair's
question (refused) and, where one is left, another pair's question whose answer is still there
(answered), so the model learns to look for the fact, not for a kind of text.
"""

from __future__ import annotations

import random
from collections import Counter

from sovllm.config import Config
from sovllm.curate.negatives import (
    build_negatives,
    build_on_topic,
    foreign_questions,
    on_topic_context,
    pick_distractors,
    wanted,
    with_distractors,
)
from sovllm.curate.records import make_record
from sovllm.curate.split import SPLITS, check_leak_free


def _on_topic_tree(contexts: list[dict], chunk: dict, pairs: list[dict], rng: random.Random,
                   max_overlap: float, used: set[str]) -> tuple[list[dict], dict, dict | None] | None:
    """For a training context: (contexts with `chunk` ablated, the refused pair, a pair still answered)."""
    order = [p for p in pairs if p["chunk_id"] == chunk["id"] and p["id"] not in used]
    rng.shuffle(order)
    for pair in order:
        left = on_topic_context(chunk["text"], pair["question"], pair["answer"], max_overlap, kind=pair.get("type"))
        if left is None:
            continue
        ablated = {**chunk, "text": left}
        kept = [p for p in pairs if p["chunk_id"] == chunk["id"] and p is not pair and p["answer"] in left]
        return ([ablated if c["id"] == chunk["id"] else c for c in contexts], pair,
                rng.choice(kept) if kept else None)
    return None


def build_splits(kept: list[dict], chunks: list[dict], chunk_split: dict[str, str], cfg: Config
                 ) -> tuple[dict[str, list[dict]], dict]:
    """(records by split, statistics by split) for the kept pairs; `chunk_split` maps chunk id → split."""
    section, prompt = cfg.curate, cfg.prompt
    chunk_by_id = {c["id"]: c for c in chunks}
    records: dict[str, list[dict]] = {}
    stats: dict[str, dict] = {}

    def answerable(pair, contexts, record_id=None):
        chunk = chunk_by_id[pair["chunk_id"]]
        return make_record(record_id or pair["id"], prompt=prompt, contexts=contexts, question=pair["question"],
                           answer=pair["answer"], chunk=chunk, type_=pair["type"], pair_id=pair["id"])

    def refused(pair, contexts, record_id, kind, lang):
        return make_record(record_id, prompt=prompt, contexts=contexts, question=pair["question"],
                           answer=prompt.refusal, chunk=chunk_by_id[pair["chunk_id"]], type_="unanswerable",
                           pair_id=pair["id"], lang=lang, negative=kind)

    for split in SPLITS:
        rng = random.Random(f"{section.seed}:{split}")
        pairs = [p for p in kept if chunk_split[p["chunk_id"]] == split]
        split_chunks = [c for c in chunks if chunk_split[c["id"]] == split]
        per_context = section.negatives_per_context if split == "train" else 0
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
            out.append(answerable(pair, contexts))
        negatives, neg_stats = [], None
        if per_context:
            uses: Counter = Counter()
            ablated_pairs: set[str] = set()
            wanted_total = 0
            for chunk_id, contexts in chunk_contexts.items():
                whole, part = int(per_context), per_context - int(per_context)
                count = whole + (1 if part and rng.random() < part else 0)
                wanted_total += count
                on_topic = sum(rng.random() < section.on_topic for _ in range(count))
                lang = chunk_by_id[chunk_id].get("lang")
                for _ in range(on_topic):
                    tree = _on_topic_tree(contexts, chunk_by_id[chunk_id], pairs, rng, section.max_overlap,
                                          ablated_pairs)
                    if tree is None:
                        break
                    ablated, pair, still = tree
                    ablated_pairs.add(pair["id"])
                    out.append(refused(pair, ablated, f"{pair['id']}-on-topic", "on_topic", lang))
                    if still is not None:
                        out.append(answerable(still, ablated, f"{still['id']}-without-{pair['id']}"))
                    with_extra += len(ablated) > 1
                for foreign in foreign_questions(contexts, pairs, chunk_by_id, count - on_topic,
                                                 max_overlap=section.max_overlap, rng=rng, lang=lang, uses=uses):
                    uses[foreign["id"]] += 1
                    out.append(refused(foreign, contexts, f"{foreign['id']}-unanswerable-{uses[foreign['id']]}",
                                       "foreign", lang))
                    with_extra += len(contexts) > 1
            n_wanted = wanted_total
        else:
            n_wanted = wanted(len(pairs), section.unanswerable.get(split, 0.0))
            on_topic = build_on_topic(pairs, chunk_by_id, round(n_wanted * section.on_topic),
                                      max_overlap=section.max_overlap, rng=rng)
            negatives, neg_stats = build_negatives(pairs, split_chunks, chunk_by_id, n_wanted - len(on_topic),
                                                   max_overlap=section.max_overlap, rng=rng)
            if len(on_topic) + len(negatives) < n_wanted:  # too few foreign questions: more on-topic ones
                on_topic += build_on_topic(pairs, chunk_by_id, n_wanted - len(on_topic) - len(negatives),
                                           max_overlap=section.max_overlap, rng=rng,
                                           exclude={p["id"] for p, _ in on_topic})
            for pair, ablated in on_topic:
                out.append(refused(pair, [ablated], f"{pair['id']}-on-topic", "on_topic", ablated.get("lang")))
        for neg in negatives:
            source = chunk_by_id[neg.pair["chunk_id"]]
            contexts = [neg.context]
            if distract and rng.random() < distract:
                extra = pick_distractors(split_chunks, {neg.context["doc_id"], source["doc_id"]},
                                         rng.randint(1, section.max_distractors), rng,
                                         question=neg.pair["question"], max_overlap=section.max_overlap)
                contexts = with_distractors(neg.context, extra, rng, section.max_context_tokens)
                with_extra += len(contexts) > 1
            out.append(refused(neg.pair, contexts, f"{neg.pair['id']}-unanswerable", "foreign",
                               neg.context.get("lang")))
        records[split] = out
        kinds = Counter(r["meta"].get("negative") for r in out if r["meta"]["type"] == "unanswerable")
        stats[split] = {
            "documents": len({c["doc_id"] for c in split_chunks}), "chunks": len(split_chunks),
            "answerable": sum(r["meta"]["type"] != "unanswerable" for r in out),
            "unanswerable": sum(kinds.values()), "unanswerable_wanted": n_wanted,
            "unanswerable_on_topic": kinds.get("on_topic", 0), "unanswerable_foreign": kinds.get("foreign", 0),
            "negatives_discarded_overlap": neg_stats.discarded_overlap if neg_stats else 0,
            "negatives_without_other_document": neg_stats.no_context if neg_stats else 0,
            "with_distractors": with_extra,
            "by_type": dict(sorted(Counter(r["meta"]["type"] for r in out).items())),
            "by_lang": dict(sorted(Counter(r["meta"]["lang"] or "und" for r in out).items())),
        }
    check_leak_free(records, chunk_split)
    return records, stats
