"""The synth stage: `chunks.jsonl` → `qa.jsonl`, `errors.jsonl`, `summary.json`, `manifest.json`.

`--shard K/N` processes the chunks whose id hashes to K−1 modulo N into `out/synth/shards/K-of-N/`;
`merge` combines all N shards into `out/synth/` (and their caches into its cache), so an Argo
fan-out can run N pods. `sweep` measures throughput and error rate per concurrency level on a
sample of chunks, each level from an empty cache, and recommends one.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Callable

from sovllm import layout
from sovllm.artifacts import (
    StageContext,
    StageResult,
    load_manifest,
    read_jsonl,
    run_stage,
    write_atomic,
    write_jsonl,
)
from sovllm.config import Config
from sovllm.endpoint import Endpoint
from sovllm.errors import ConfigError, InputError
from sovllm.models.registry import BUNDLED
from sovllm.synth.generate import (
    RunStats,
    Settings,
    assemble,
    chunk_key,
    generate,
    load_cache,
)
from sovllm.synth.headings import mark_section_openings
from sovllm.synth.prompt import PromptSet
from sovllm.synth.structure import structure_pairs

CACHE = "cache.jsonl"


def parse_shard(spec: str | None) -> tuple[int, int] | None:
    """'K/N' → (K, N) with 1 ≤ K ≤ N."""
    if not spec:
        return None
    try:
        k, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {spec!r}: expected K/N, e.g. --shard 2/4") from None
    if not 1 <= k <= n:
        raise ConfigError(f"--shard {spec!r}: K must be between 1 and N")
    return k, n


def in_shard(chunk_id: str, shard: tuple[int, int]) -> bool:
    k, n = shard
    return int(hashlib.sha256(chunk_id.encode()).hexdigest()[:8], 16) % n == k - 1


def load_chunks(root: Path, cfg: Config, *, quick: bool = False, shard=None) -> tuple[Path, list[dict]]:
    path = layout.folder(root, cfg, "chunks") / "chunks.jsonl"
    if not path.is_file():
        raise InputError(f"{path}: no chunks yet", hint="run 'sovllm ingest' first")
    chunks = list(read_jsonl(path))
    mark_section_openings(chunks)  # before sampling and sharding: it depends on the previous chunk
    if quick:
        chunks = random.Random(cfg.synth.seed).sample(chunks, min(cfg.synth.quick_chunks, len(chunks)))
        chunks.sort(key=lambda c: c["id"])
    if shard:
        chunks = [c for c in chunks if in_shard(c["id"], shard)]
    return path, chunks


def prompt_set(root: Path, cfg: Config) -> PromptSet:
    return PromptSet(root / cfg.synth.prompt_dir if cfg.synth.prompt_dir else None)


def model_languages(cfg: Config, endpoint: Endpoint) -> list[str] | None:
    """The chunk languages the model writes questions for (None: all).

    The bundled 135M model writes no usable German (its questions are word salad; measured in
    docs/synth.md), so by default it is asked for English chunks only; asking it for the others
    costs requests and adds garbled pairs.
    """
    if cfg.synth.model_languages is not None:
        return list(cfg.synth.model_languages)
    return ["en"] if endpoint.model in BUNDLED else None


def model_chunks(chunks: list[dict], cfg: Config, settings: Settings, languages: list[str] | None = None) -> list[dict]:
    """The chunks the model is asked for: those in `languages` (None: all), and with `fill` only
    those without structure pairs."""
    asked = [c for c in chunks if languages is None or c.get("lang") in languages]
    if not settings.fill or not cfg.synth.structure:
        return asked
    return [c for c in asked if not structure_pairs(c, cfg.synth.structure, cfg.synth.answer_max_chars)]


def summarise(chunks: list[dict], pairs: list[dict], errors: list[dict], stats: RunStats, wall: float) -> dict:
    with_pair = {p["chunk_id"] for p in pairs}
    methods = [p["generator"].get("method", "model") for p in pairs]
    with_model_pair = {p["chunk_id"] for p, method in zip(pairs, methods) if method == "model"}
    by_method = dict(Counter(methods))
    by_type: dict[str, int] = {}
    for p in pairs:
        by_type[p["type"]] = by_type.get(p["type"], 0) + 1
    langs = {}
    for lang in sorted({c.get("lang", "und") for c in chunks}):
        ids = [c["id"] for c in chunks if c.get("lang", "und") == lang]
        langs[lang] = {"chunks": len(ids), "with_pair": sum(i in with_pair for i in ids),
                       "with_model_pair": sum(i in with_model_pair for i in ids),
                       "pairs": sum(p["chunk_id"] in set(ids) for p in pairs)}
    return {
        "chunks": len(chunks), "reused": stats.reused, "generated": stats.generated, "pairs": len(pairs),
        "chunks_with_pair": len(with_pair), "share_with_pair": round(len(with_pair) / max(len(chunks), 1), 3),
        "chunks_with_model_pair": len(with_model_pair), "pairs_per_chunk": round(len(pairs) / max(len(chunks), 1), 2),
        "pairs_by_type": by_type, "pairs_by_method": by_method,
        "failures": len(errors), "failures_by_reason": dict(sorted(stats.by_reason.items())),
        "by_language": langs, "requests": stats.requests, "prompt_tokens": stats.prompt_tokens,
        "generated_tokens": stats.completion_tokens, "prompt_time_s": round(stats.ttft_s, 1),
        "generation_time_s": round(stats.request_s - stats.ttft_s, 1), "wall_s": round(wall, 1),
        # throughput of the model: structure pairs cost no request
        "pairs_per_min": round(60 * by_method.get("model", 0) / wall, 1) if wall > 0 and stats.generated else None,
    }


def run(root: Path, cfg: Config, endpoint_factory: Callable, *, quick: bool = False, force: bool = False,
        shard: tuple[int, int] | None = None, reuse: bool = True, progress_factory: Callable | None = None,
        log: Callable[[str], None] = print) -> StageResult:
    """Run (or skip when up to date) synth for the project at `root`.

    `endpoint_factory()` is a context manager yielding the Endpoint; it is entered only when the
    stage actually has to run.
    """
    chunks_path, chunks = load_chunks(root, cfg, quick=quick, shard=shard)
    base = layout.folder(root, cfg, "pairs")
    out_dir = layout.folder(root, cfg, "shards") / f"{shard[0]}-of-{shard[1]}" if shard else base
    prompts = prompt_set(root, cfg)
    config = {"synth": cfg.synth.model_dump(), "endpoint": cfg.endpoint.model_dump(),
              "model": cfg.model.base if not cfg.endpoint.base_url else None, "quick": quick,
              "shard": list(shard) if shard else None,
              "templates": {lang: prompts.template_hash(lang) for lang in ("en", "de")}}

    def work(ctx: StageContext) -> None:
        started = time.perf_counter()
        with endpoint_factory() as endpoint:
            settings = Settings.from_config(cfg.synth, embedded=endpoint.embedded)
            languages = model_languages(cfg, endpoint)
            asked = model_chunks(chunks, cfg, settings, languages)
            if len(asked) < len(chunks):
                why = [f"synth.model_languages: {', '.join(languages)}"] if languages is not None else []
                why += ["synth.model_pairs: fill"] if settings.fill else []
                log(f"synth: the model is asked for {len(asked)} of {len(chunks)} chunks ({'; '.join(why)}); "
                    f"the others get structure pairs only")
            bar = progress_factory(len(asked)) if progress_factory else None
            done = {"pairs": 0, "failed": 0}

            def on_done(record):
                done["pairs"] += len(record["pairs"])
                done["failed"] += len(record["failed"])
                if bar:
                    bar.advance(f"{done['pairs']} pairs, {done['failed']} failed")

            try:
                results, stats = asyncio.run(generate(
                    asked, endpoint=endpoint, prompts=prompts, settings=settings, cache_path=ctx.out_dir / CACHE,
                    concurrency=cfg.synth.concurrency, timeout=cfg.synth.timeout_s, reuse=reuse, on_done=on_done))
            finally:
                if bar:
                    bar.close()
            keys = {c["id"]: chunk_key(c, prompts, endpoint.model, settings) for c in chunks}
            wanted = {keys[c["id"]] for c in asked}  # a cached result of a chunk not asked for now is not used
            results = {k: v for k, v in results.items() if k in wanted}
            pairs, errors = assemble(chunks, results, keys, endpoint, stats, structure=cfg.synth.structure,
                                     answer_max=cfg.synth.answer_max_chars)
            stats.chunks = len(chunks)
        wall = time.perf_counter() - started
        write_jsonl(ctx.out_dir / "qa.jsonl", pairs)
        write_jsonl(ctx.out_dir / "errors.jsonl", errors)
        summary = summarise(chunks, pairs, errors, stats, wall)
        write_atomic(ctx.out_dir / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        ctx.model.update({"generator": endpoint.model, "endpoint": endpoint.base_url, "embedded": endpoint.embedded})
        ctx.counts.update({k: summary[k] for k in ("chunks", "reused", "generated", "pairs", "failures",
                                                   "prompt_tokens", "generated_tokens")})
        ctx.timings.update({"prompt_time_s": summary["prompt_time_s"], "generation_time_s": summary["generation_time_s"]})
        ctx.extra.update({"prompt_hashes": config["templates"], "summary": summary,
                          "answer_mode": "extractive" if settings.extractive else "free"})

    return run_stage("synth", out_dir, work, inputs=[chunks_path], config=config, force=force,
                     verify=lambda m: (out_dir / "qa.jsonl").is_file())


def merge(root: Path, cfg: Config, shards: int) -> dict:
    """Combine `shards` shard outputs into out/synth (qa, errors, cache, summary, manifest)."""
    base = layout.folder(root, cfg, "pairs")
    dirs = [layout.folder(root, cfg, "shards") / f"{k}-of-{shards}" for k in range(1, shards + 1)]
    missing = [str(d) for d in dirs if (m := load_manifest(d)) is None or m.status != "ok"]
    if missing:
        raise InputError(f"cannot merge: {len(missing)} of {shards} shards have no successful run: {', '.join(missing)}",
                         hint="run the missing 'sovllm synth --shard K/N' first")
    manifests = [load_manifest(d) for d in dirs]
    settings = {json.dumps({k: v for k, v in m.config.items() if k != "shard"}, sort_keys=True) for m in manifests}
    if len(settings) != 1:
        raise InputError("cannot merge: the shards were generated with different settings; re-run them alike")
    shared = json.loads(next(iter(settings)))
    # the order an unsharded run writes: its chunks as load_chunks gives them (--quick: the sample, by id)
    _, chunks = load_chunks(root, cfg, quick=bool(shared.get("quick")))
    order = {c["id"]: i for i, c in enumerate(chunks)}
    pairs, errors, cache = [], [], {}
    for d in dirs:
        pairs += list(read_jsonl(d / "qa.jsonl"))
        errors += list(read_jsonl(d / "errors.jsonl"))
        cache.update(load_cache(d / CACHE))
    # stable sorts: within a chunk the shard files already hold the configured type order
    pairs.sort(key=lambda p: order.get(p["chunk_id"], 1 << 30))
    errors.sort(key=lambda e: order.get(e["chunk_id"], 1 << 30))
    if len({p["id"] for p in pairs}) != len(pairs):
        raise InputError("cannot merge: the shards overlap (a pair id appears twice)")

    def work(ctx: StageContext) -> None:
        write_jsonl(ctx.out_dir / "qa.jsonl", pairs)
        write_jsonl(ctx.out_dir / "errors.jsonl", errors)
        existing = load_cache(ctx.out_dir / CACHE)
        existing.update(cache)
        write_jsonl(ctx.out_dir / CACHE, existing.values())
        ctx.counts.update({"pairs": len(pairs), "failures": len(errors), "shards": shards})
        ctx.model.update(manifests[0].model)
        ctx.extra.update({"merged_from": [str(d) for d in dirs]})

    config = {**shared, "merged_shards": shards}
    result = run_stage("synth", base, work, inputs=[d / "qa.jsonl" for d in dirs], config=config, force=True)
    return {"pairs": len(pairs), "failures": len(errors), "shards": shards, "manifest": str(base / "manifest.json"),
            "skipped": result.skipped}


def sweep(root: Path, cfg: Config, endpoint: Endpoint, levels: list[int], sample: int,
          log: Callable[[str], None] = print) -> dict:
    """Throughput and error rate per concurrency level on the same sample, each from an empty cache."""
    _, chunks = load_chunks(root, cfg)
    chunks = random.Random(cfg.synth.seed).sample(chunks, min(sample, len(chunks)))
    prompts = prompt_set(root, cfg)
    settings = Settings.from_config(cfg.synth, embedded=endpoint.embedded)
    rows = []
    for level in levels:
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            results, stats = asyncio.run(generate(chunks, endpoint=endpoint, prompts=prompts, settings=settings,
                                                  cache_path=Path(tmp) / CACHE, concurrency=level,
                                                  timeout=cfg.synth.timeout_s, reuse=False))
            wall = time.perf_counter() - started
        keys = {c["id"]: chunk_key(c, prompts, endpoint.model, settings) for c in chunks}
        pairs, errors = assemble(chunks, results, keys, endpoint, stats)
        requested = max(stats.pairs + stats.failures, 1)  # questions asked (structure pairs are off here)
        row = {"concurrency": level, "chunks": len(chunks), "wall_s": round(wall, 1),
               "pairs": len(pairs), "pairs_per_min": round(60 * len(pairs) / wall, 1),
               "chunks_per_min": round(60 * len(chunks) / wall, 1),
               "error_rate": round(len(errors) / requested, 3), "requests": stats.requests,
               "prompt_tokens": stats.prompt_tokens, "generated_tokens": stats.completion_tokens,
               "prompt_time_s": round(stats.ttft_s, 1), "generation_time_s": round(stats.request_s - stats.ttft_s, 1)}
        rows.append(row)
        log(f"concurrency {level}: {row['pairs_per_min']} pairs/min, error rate {row['error_rate']:.0%}")
    baseline = rows[0]
    acceptable = [r for r in rows if r["error_rate"] <= baseline["error_rate"] + 0.05]
    best = max(acceptable, key=lambda r: r["pairs_per_min"])
    return {"levels": rows, "recommended_concurrency": best["concurrency"],
            "reason": f"highest pairs/min ({best['pairs_per_min']}) with an error rate within 5 points of "
                      f"concurrency {baseline['concurrency']}"}
