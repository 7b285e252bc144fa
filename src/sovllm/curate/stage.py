"""The curate stage: `qa.jsonl` + `chunks.jsonl` → curated pairs, grouped splits and a funnel.

Order: rule flags → exact duplicates → near duplicates → LLM judge → kept pairs → document splits
→ per-split records with negatives and distractors. Every removal is counted in `funnel.json`
(answerable and unanswerable separately) and recorded on the pair in `curated.jsonl`
(`kept`, `drop_reason`, `dup_of`), which `sovllm curate review` turns into a page. A run that
keeps fewer than `curate.min_kept` answerable pairs writes its files, then fails naming the filter
that removed most.

Judge modes: `off`; `report` grades a seeded sample of at most `report_limit` pairs and removes
nothing (the funnel says how many it *would* remove); `filter` grades every surviving pair and
drops ratings outside `judge.keep`; `auto` filters only with a judge that is not the bundled
135M model (a configured `curate.judge` endpoint or project endpoint serving another model) and
otherwise reports.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from sovllm import layout
from sovllm.artifacts import (
    StageContext,
    StageResult,
    read_jsonl,
    run_stage,
    write_atomic,
    write_jsonl,
)
from sovllm.config import Config
from sovllm.curate.build import build_splits
from sovllm.curate.dedup import find_duplicates
from sovllm.curate.judge import Judge, get_rubric
from sovllm.curate.rules import flags_for
from sovllm.curate.split import SPLITS, assign
from sovllm.endpoint import Endpoint
from sovllm.errors import ConfigError, InputError
from sovllm.models.registry import BUNDLED
from sovllm.synth.validate import grounding_ratio

RATING_ORDER = {"A": 0, "B": 1, "C": 2, None: 1}


def load_inputs(root: Path, cfg: Config) -> tuple[Path, Path, list[dict], list[dict]]:
    """Chunks and pairs, checked: every pair names a known chunk and has question, answer and type."""
    chunks_path = layout.folder(root, cfg, "chunks") / "chunks.jsonl"
    qa_path = layout.folder(root, cfg, "pairs") / "qa.jsonl"
    if not chunks_path.is_file():
        raise InputError(f"{chunks_path}: no chunks yet", hint="run 'sovllm ingest' first")
    if not qa_path.is_file():
        raise InputError(f"{qa_path}: no QA pairs yet", hint="run 'sovllm synth' first")
    chunks = list(read_jsonl(chunks_path))
    known = {c["id"] for c in chunks}
    pairs = []
    for n, pair in enumerate(read_jsonl(qa_path), 1):
        missing = [k for k in ("id", "chunk_id", "question", "answer", "type") if k not in pair]
        if missing:
            raise InputError(f"{qa_path}:{n}: record lacks {', '.join(missing)}",
                             hint="qa.jsonl must come from 'sovllm synth' (or follow its contract)")
        if pair["chunk_id"] not in known:
            raise InputError(f"{qa_path}:{n}: pair {pair['id']} names chunk {pair['chunk_id']}, which "
                             f"{chunks_path.name} does not contain", hint="re-run 'sovllm synth' after 'sovllm ingest'")
        pairs.append(pair)
    return chunks_path, qa_path, chunks, pairs


def judge_endpoint_config(cfg: Config) -> Endpoint | None:
    """The configured judge endpoint (`curate.judge.base_url`), or None for the project endpoint."""
    import os

    judge = cfg.curate.judge
    if not judge.base_url:
        return None
    if not judge.model:
        raise ConfigError("curate.judge.model is required when curate.judge.base_url is set")
    key = os.environ.get(judge.api_key_env) if judge.api_key_env else None
    if judge.api_key_env and not key:
        raise ConfigError(f"curate.judge.api_key_env names {judge.api_key_env}, which is not set")
    return Endpoint(judge.base_url.rstrip("/"), judge.model, key)


def resolve_mode(mode: str, endpoint: Endpoint) -> str:
    """'filter', 'report' or 'off' for the configured mode and the endpoint that will judge."""
    if mode != "auto":
        return mode
    bundled = endpoint.embedded or endpoint.model in BUNDLED
    return "report" if bundled else "filter"


def _rank(chunk_by_id: dict[str, dict]) -> Callable[[dict], tuple]:
    # the best pair of a duplicate cluster: fewest flags, best grounded answer, then the shorter question
    def rank(pair: dict) -> tuple:
        grounding = grounding_ratio(pair["answer"], chunk_by_id[pair["chunk_id"]]["text"])
        return (len(pair["flags"]), -round(grounding, 3), len(pair["question"]))
    return rank


def untrained_languages(split_stats: dict) -> list[str]:
    """Warnings for languages that val or eval items use but no training example does: the adapter
    never learns to answer (or refuse) in them, and eval measures that gap, not the fine-tuning."""
    trained = set((split_stats.get("train") or {}).get("by_lang") or {})
    lines = []
    for split in ("val", "eval"):
        missing = {lang: n for lang, n in ((split_stats.get(split) or {}).get("by_lang") or {}).items()
                   if lang not in trained and lang != "und"}
        for lang, n in sorted(missing.items()):
            lines.append(f"warning: {n} {split} items are in '{lang}', but no training example is (no kept "
                         f"pair of a '{lang}' document is in train); add '{lang}' documents or try another curate.splits.seed "
                         f"(splits.json lists each document's split and kept pairs)")
    return lines


def funnel_table(curated: list[dict], judge_info: dict, split_stats: dict) -> dict:
    removed = Counter(p["drop_reason"] for p in curated if not p["kept"])
    return {
        "answerable": {"input": len(curated), "removed": dict(removed.most_common()),
                       "kept": sum(p["kept"] for p in curated)},
        "judge": judge_info,
        "flags_seen": dict(Counter(f for p in curated for f in p["flags"]).most_common()),
        "unanswerable": {s: {k: split_stats[s][k] for k in ("unanswerable_wanted", "negatives_discarded_overlap",
                                                            "negatives_without_other_document", "unanswerable",
                                                            "unanswerable_on_topic", "unanswerable_foreign")}
                         for s in split_stats},
        "splits": split_stats,
    }


def run(root: Path, cfg: Config, endpoint_factory: Callable, *, quick: bool = False, force: bool = False,
        progress_factory: Callable | None = None, log: Callable[[str], None] = print) -> StageResult:
    """Run (or skip when up to date) curate for the project at `root`.

    `endpoint_factory()` yields the project endpoint; it is entered only when the judge needs it.
    """
    chunks_path, qa_path, chunks, pairs = load_inputs(root, cfg)
    out_dir = layout.folder(root, cfg, "splits")
    section = cfg.curate
    get_rubric(section.judge.rubric)  # unknown rubric: fail before any work
    config = {"curate": section.model_dump(mode="json"), "prompt": cfg.prompt.model_dump(),
              "endpoint": cfg.endpoint.model_dump(), "model": cfg.model.base, "quick": quick}

    def work(ctx: StageContext) -> None:
        chunk_by_id = {c["id"]: c for c in chunks}
        curated = []
        for pair in pairs:
            flags = flags_for(pair, chunk_by_id[pair["chunk_id"]], section, tuple(cfg.ingest.languages))
            dropping = [f for f in flags if f in section.rules]
            curated.append({**pair, "flags": flags, "judge": None, "kept": not dropping,
                            "drop_reason": dropping[0] if dropping else None, "dup_of": None})
        survivors = [p for p in curated if p["kept"]]
        by_id = {p["id"]: p for p in survivors}
        for pid, dup in find_duplicates(survivors, section.dedup, _rank(chunk_by_id)).items():
            pair = by_id[pid]
            pair.update(kept=False, drop_reason=dup.kind, dup_of=dup.keeper)
            pair["flags"].append(dup.kind)
        judge_info = _judge(curated, chunk_by_id, cfg, endpoint_factory, quick, progress_factory, log, ctx)
        kept = [p for p in curated if p["kept"]]
        kept_per_chunk = Counter(p["chunk_id"] for p in kept)
        splits = assign(chunks, section.splits, kept_per_chunk)
        chunk_split = splits["chunks"]
        records, split_stats = build_splits(kept, chunks, chunk_split, cfg)
        for pair in curated:
            pair["split"] = chunk_split[pair["chunk_id"]]
        funnel = {**funnel_table(curated, judge_info, split_stats), "split_unit": splits["unit"],
                  "leakage": splits.get("leakage")}
        write_jsonl(ctx.out_dir / "curated.jsonl", curated)
        for split in SPLITS:
            write_jsonl(ctx.out_dir / f"{split}.jsonl", records[split])
        for doc_id, entry in splits["documents"].items():
            entry["pairs"] = sum(1 for p in kept if chunk_by_id[p["chunk_id"]]["doc_id"] == doc_id)
        write_atomic(ctx.out_dir / "splits.json", json.dumps(splits, indent=2, ensure_ascii=False) + "\n")
        write_atomic(ctx.out_dir / "funnel.json", json.dumps(funnel, indent=2, ensure_ascii=False) + "\n")
        ctx.counts.update({"pairs": len(curated), "kept": len(kept),
                           **{f"{s}_records": len(records[s]) for s in SPLITS}})
        ctx.extra.update({"funnel": funnel})
        minimum = min(1, section.min_kept) if quick else section.min_kept
        if not curated and minimum:
            raise InputError(f"{qa_path}: synth produced no QA pairs, nothing to curate",
                             hint="see out/synth/errors.jsonl and summary.json; a random or very small base model "
                                  "cannot write valid pairs")
        if len(kept) < minimum:
            worst = max(funnel["answerable"]["removed"].items(), key=lambda kv: kv[1], default=("nothing", 0))
            raise InputError(f"curate kept {len(kept)} of {len(curated)} answerable pairs, fewer than "
                             f"curate.min_kept ({minimum}); the filter that removed most is '{worst[0]}' "
                             f"({worst[1]} pairs)",
                             hint=f"see {ctx.out_dir / 'funnel.json'} and 'sovllm curate review'; relax that "
                                  f"filter in curate.* or generate more pairs")
        for split in ("val", "eval"):
            if not records[split]:
                log(f"warning: the {split} split is empty (no group with kept pairs could be given to it); "
                    f"add documents")
        for line in untrained_languages(split_stats):
            log(line)

    return run_stage("curate", out_dir, work, inputs=[chunks_path, qa_path], config=config, force=force,
                     verify=lambda m: all((out_dir / f"{s}.jsonl").is_file() for s in SPLITS))


def _judge(curated: list[dict], chunk_by_id: dict, cfg: Config, endpoint_factory: Callable, quick: bool,
           progress_factory: Callable | None, log: Callable[[str], None], ctx: StageContext) -> dict:
    """Grade pairs with the judge as the mode says; returns the funnel's judge section."""
    section = cfg.curate.judge
    if section.mode == "off":
        return {"mode": "off"}
    configured = judge_endpoint_config(cfg)

    @contextmanager
    def judge_endpoint():
        if configured is not None:
            yield configured
        else:
            with endpoint_factory() as endpoint:
                yield endpoint

    survivors = [p for p in curated if p["kept"]]
    if not survivors:
        return {"mode": section.mode, "graded": 0}
    with judge_endpoint() as endpoint:
        mode = resolve_mode(section.mode, endpoint)
        items = survivors
        limit = min(section.report_limit, section.quick_limit) if quick else section.report_limit
        if mode == "report" and len(items) > limit:
            items = sorted(random.Random(cfg.curate.seed).sample(items, limit), key=lambda p: p["id"])
        elif quick and len(items) > section.quick_limit:
            items = sorted(random.Random(cfg.curate.seed).sample(items, section.quick_limit), key=lambda p: p["id"])
        log(f"judge ({mode}, rubric {section.rubric}): grading {len(items)} pairs with {endpoint.model}")
        # report-only grading is for orientation: the worked examples would double the prompt tokens
        judge = Judge(endpoint, get_rubric(section.rubric), max_tokens=section.max_tokens,
                      concurrency=section.concurrency, timeout=cfg.synth.timeout_s, few_shot=mode == "filter")
        bar = progress_factory(len(items)) if progress_factory else None
        try:
            verdicts, stats = asyncio.run(judge.grade_many(
                [{"context": chunk_by_id[p["chunk_id"]]["text"], "question": p["question"], "answer": p["answer"]}
                 for p in items], on_done=lambda v: bar.advance(str(v.rating)) if bar else None))
        finally:
            if bar:
                bar.close()
    would_remove = 0
    for pair, verdict in zip(items, verdicts):
        pair["judge"] = verdict.as_dict()
        if verdict.rating is not None and verdict.rating not in section.keep:
            would_remove += 1
            if mode == "filter":
                pair.update(kept=False, drop_reason="judge")
    ratings = Counter(v.rating for v in verdicts if v.rating)
    ctx.model.update({"judge": endpoint.model, "judge_endpoint": endpoint.base_url, "judge_embedded": endpoint.embedded})
    ctx.counts.update({"judge_prompt_tokens": stats.prompt_tokens, "judge_generated_tokens": stats.completion_tokens})
    info = {"mode": mode, "configured_mode": section.mode, "rubric": section.rubric, "model": endpoint.model,
            "graded": len(items), "of": len(survivors), "ratings": {r: ratings.get(r, 0) for r in ("A", "B", "C")},
            "hallucinations": sum(bool(v.hallucination) for v in verdicts), "failures": stats.failures,
            "keep": list(section.keep), "few_shot": mode == "filter"}
    info["removed" if mode == "filter" else "would_remove"] = would_remove
    if mode == "report":
        info["why_report_only"] = ("the judge is the bundled 135M model, too weak to filter (set curate.judge.mode: "
                                   "filter or configure a stronger curate.judge endpoint)"
                                   if section.mode == "auto" else "curate.judge.mode is report")
    return info


def write_review_page(root: Path, cfg: Config, path: Path | None = None) -> Path:
    """Write the review page of the last curate run (default out/curate/review.html)."""
    from sovllm.curate.review import write_review

    splits = layout.folder(root, cfg, "splits")
    curated_path = splits / "curated.jsonl"
    if not curated_path.is_file():
        raise InputError(f"{curated_path}: nothing curated yet", hint="run 'sovllm curate' first")
    chunks = {c["id"]: c for c in read_jsonl(layout.folder(root, cfg, "chunks") / "chunks.jsonl")}
    funnel_path = splits / "funnel.json"
    funnel = json.loads(funnel_path.read_text(encoding="utf-8")) if funnel_path.is_file() else None
    if funnel:
        funnel = {"answerable": funnel["answerable"], "judge": funnel["judge"]}
    path = path or splits / "review.html"
    write_review(path, list(read_jsonl(curated_path)), chunks, title=f"{cfg.project.name}: curated pairs to review",
                 funnel=funnel)
    return path
