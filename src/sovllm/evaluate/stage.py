"""The eval stage: base and adapters on `eval.jsonl` → predictions, summary, report, MLflow, promotion.

Models default to the base model plus this project's adapter (`out/train/adapter`, served under
`train.adapter_name`); `eval.models` names any models the endpoint serves instead (the first is the
reference every other one is compared with). With no endpoint configured the embedded server
starts with the adapters loaded. `--promote` adds the registered model's current `champion`
version to the run, compares the candidate with it (or with the base model when there is no
champion yet) and moves the alias only when the candidate's token F1 is better by the paired test.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from pathlib import Path
from typing import Callable

from sovllm.artifacts import (
    Manifest,
    StageContext,
    StageResult,
    read_jsonl,
    run_stage,
    sha256_path,
    write_atomic,
    write_jsonl,
)
from sovllm.config import Config
from sovllm.endpoint import CompletionCache, open_endpoint
from sovllm.errors import ConfigError, InputError
from sovllm.evaluate import judge as judging
from sovllm.evaluate import promotion
from sovllm.evaluate.predict import Item, Model, predict, retrieved_items
from sovllm.evaluate.summary import (
    check_targets,
    most_different,
    summarise,
    token_totals,
)
from sovllm.layout import folder
from sovllm.models.adapter import adapter_name, inspect_adapter
from sovllm.models.prompt import split_user_message, system_prompt
from sovllm.models.tokenizer import load_tokenizer
from sovllm.stats import percentile

BASE = "base"
# --quick is a smoke run of every check, sized to keep `sovllm run --quick` within its 5 minutes: at most
# this many retrieved-context items, judged items per model, repeats, verbosity probes and gold items.
QUICK_CAPS = {"retrieved": 4, "judge_items": 2, "repeat": 1, "verbosity": 1, "gold": 6}


def load_items(path: Path) -> list[Item]:
    if not path.is_file():
        raise InputError(f"{path}: no eval split yet", hint="run 'sovllm curate' first")
    items = []
    for n, record in enumerate(read_jsonl(path), 1):
        try:
            items.append(Item.from_record(record))
        except (KeyError, IndexError, TypeError) as exc:
            raise InputError(f"{path}:{n}: not an eval record (missing {exc})",
                             hint="eval.jsonl must come from 'sovllm curate' (messages + meta)") from None
        except ValueError as exc:
            raise InputError(f"{path}:{n}: not an eval record ({exc})",
                             hint="eval.jsonl must come from 'sovllm curate' (messages + meta)") from None
    if not items:
        raise InputError(f"{path}: the eval split is empty", hint="adjust curate.splits so documents hash into eval")
    return items


def sample(items: list, limit: int, seed: int) -> list:
    """A seeded sample of at most `limit` items in their original order (0 = all)."""
    if not limit or len(items) <= limit:
        return list(items)
    chosen = set(random.Random(seed).sample(range(len(items)), limit))
    return [item for i, item in enumerate(items) if i in chosen]


def quick_items(items: list[Item], limit: int, seed: int) -> list[Item]:
    """A seeded sample with answerable and unanswerable items in the split's proportions, and the
    unanswerable ones spread over their kinds (on-topic, other-document) in proportion, at least one
    of each kind there is, so the smoke run reports every kind."""
    answerable = [i for i in items if i.answerable]
    rest = [i for i in items if not i.answerable]
    kinds: dict[str, list[Item]] = {}
    for item in rest:
        kinds.setdefault(item.negative or "", []).append(item)
    n_rest = min(len(rest), max(len(kinds), round(limit * len(rest) / len(items))), max(limit - 1, len(kinds)))
    shares = {k: max(1, round(n_rest * len(v) / len(rest))) for k, v in kinds.items()} if rest else {}
    while sum(shares.values()) > n_rest:  # rounding up gave too many: take from the largest share above 1
        largest = max((k for k in shares if shares[k] > 1), key=shares.get, default=None)
        if largest is None:
            break
        shares[largest] -= 1
    picked = [i for k, group in sorted(kinds.items()) for i in sample(group, min(len(group), shares[k]), seed)]
    return sample(answerable, max(0, limit - len(picked)), seed) + picked


def fingerprint_file(path: Path) -> str:
    return sha256_path(path)[:16]


def refusal_summary(path) -> dict:
    """The adapter's refusal calibration as summary.json states it: bias and support weights (None without one)."""
    refusal = inspect_adapter(path).refusal
    if refusal is None:
        return {"refusal_bias": None, "refusal_support_weight": None, "refusal_line_weight": None}
    return {"refusal_bias": round(refusal.bias, 4), "refusal_support_weight": round(refusal.support_weight, 4),
            "refusal_line_weight": round(refusal.line_weight, 4)}


def adapter_fingerprint(path: Path, base_id: str | None) -> str:
    """Weights, base and the refusal bias the embedded server applies: what decides an adapter's answers."""
    fp = f"adapter:{fingerprint_file(path / 'adapter_model.safetensors')}:{base_id}"
    refusal = inspect_adapter(path).refusal
    if refusal is None:
        return fp
    fp = f"{fp}:refusal{refusal.token_ids}{refusal.bias:+.4f}"
    if (refusal.support_weight or refusal.line_weight) and refusal.vocabulary is not None:
        table = json.dumps([refusal.vocabulary.documents, refusal.vocabulary.df], sort_keys=True)
        fp += f"-{refusal.support_weight:.4f}xsupport:{hashlib.sha256(table.encode()).hexdigest()[:16]}"
        fp += f"-{refusal.line_weight:.4f}xline" if refusal.line_weight else ""
    return fp


def answer_budget(items: list[Item], cfg: Config) -> int:
    """eval.max_tokens, or 2 × the 95th percentile of the reference answers' token counts."""
    if cfg.eval.max_tokens:
        return cfg.eval.max_tokens
    from sovllm.models import registry

    try:
        tokenizer = load_tokenizer(registry.resolve(cfg.model.base).path)
        counts = [len(tokenizer(i.reference, add_special_tokens=False)["input_ids"]) + 1 for i in items]
    except Exception:  # noqa: BLE001 - no local tokenizer (remote-only setup): ~4 characters per token
        counts = [len(i.reference) // 4 + 1 for i in items]
    return max(16, int(2 * percentile(counts, 0.95) + 0.999))


def eval_chunks(root: Path, cfg: Config) -> list[dict]:
    """The chunks of the eval split (the retrieval index)."""
    splits = json.loads((folder(root, cfg, "splits") / "splits.json").read_text())
    chunks = read_jsonl(folder(root, cfg, "chunks") / "chunks.jsonl")
    if "chunks" in splits:  # split by section, a document's chunks can lie in several splits
        return [c for c in chunks if splits["chunks"].get(c["id"]) == "eval"]
    docs = {d for d, v in splits["documents"].items() if v["split"] == "eval"}  # splits.json before units
    return [c for c in chunks if c["doc_id"] in docs]


def split_info(root: Path, cfg: Config) -> dict:
    """How curate grouped the splits: `unit` (document | section) and, for sections, the `leakage` sentence."""
    path = folder(root, cfg, "splits") / "splits.json"
    splits = json.loads(path.read_text()) if path.is_file() else {}
    unit = splits.get("unit", "document")  # splits.json written before units grouped by document
    if unit != "section":
        return {"unit": unit, "leakage": None}
    leakage = splits.get("leakage") or ("split by section: an eval question's document may have other sections "
                                        "in train, so eval figures may be optimistic")
    return {"unit": unit, "leakage": leakage.rstrip(". ")}


def plan_adapters(root: Path, cfg: Config, champion: Path | None) -> dict[str, str]:
    """name → path of every adapter the embedded server must load."""
    adapters = dict(cfg.eval.adapters)
    own = folder(root, cfg, "adapter") / "adapter"
    if (own / "adapter_config.json").is_file():
        adapters.setdefault(adapter_name(cfg), str(own))
    if champion is not None:
        adapters["champion"] = str(champion)
    for name, path in adapters.items():
        if not (Path(path) / "adapter_config.json").is_file():
            raise ConfigError(f"eval.adapters.{name}: {path} is not an adapter folder (no adapter_config.json)")
    return adapters


def resolve_models(cfg: Config, endpoint, adapters: dict[str, str], base_id: str | None) -> list[Model]:
    names = list(cfg.eval.models) or [BASE] + [n for n in adapters if n != "champion"]
    if "champion" in adapters and "champion" not in names:
        names.append("champion")
    models = []
    for name in names:
        if name in (BASE, endpoint.model):
            fp = f"base:{base_id}" if endpoint.embedded and base_id else ""
            models.append(Model(BASE, endpoint.model, fp))
        elif name in adapters:
            fp = adapter_fingerprint(Path(adapters[name]), base_id) if endpoint.embedded else ""
            models.append(Model(name, name, fp))
        else:  # a name only the configured endpoint knows: never cached (its weights may change)
            models.append(Model(name, name, ""))
    if len(models) < 2:
        raise ConfigError("evaluation needs at least two models to compare",
                          hint="train an adapter first ('sovllm train') or list models in eval.models")
    return models


def context_of(item: Item) -> str:
    """The chunk text(s) of the user turn, for the judge."""
    content = item.messages[1]["content"]
    parts = split_user_message(content)
    return parts[0] if parts else content


def run(root: Path, cfg: Config, endpoint_factory: Callable | None = None, *, quick: bool = False,
        force: bool = False, promote: bool = False, log: Callable[[str], None] = print,
        progress_factory: Callable | None = None, in_pipeline: bool = False) -> StageResult:
    """Run (or skip when up to date) the evaluation of the project at `root`.

    `endpoint_factory(adapters)` yields the endpoint with those adapters served (default: the
    configured endpoint or the embedded server). In a pipeline run (`in_pipeline`) an empty eval
    split is a warning, not an error.
    """
    splits_dir, report_dir = folder(root, cfg, "splits"), folder(root, cfg, "report")
    eval_path = splits_dir / "eval.jsonl"
    if in_pipeline and eval_path.is_file() and not eval_path.read_text().strip():
        log("warning: eval skipped: the eval split is empty (no document hashed into it); adjust curate.splits")
        return StageResult(Manifest(stage="eval", key="", created_at="", status="empty"), skipped=True, seconds=0.0)
    items_all = load_items(eval_path)
    section = cfg.eval
    if promote and quick and not promotion.candidate(root, cfg).get("version"):
        # --quick reports a failed stop check instead of failing, and registers nothing
        log("promote: the --quick adapter was not registered (its stop check did not pass); nothing to promote")
        promote = False
    champion = promotion.fetch_champion(root, cfg, log) if promote else None
    adapters = plan_adapters(root, cfg, champion.path if champion else None)
    gold_path = root / section.judge.gold
    inputs = [eval_path] + [Path(p) / "adapter_model.safetensors" for p in adapters.values()]
    inputs += [Path(p) / "manifest.json" for p in adapters.values() if (Path(p) / "manifest.json").is_file()]
    inputs += [gold_path] if section.judge.enabled and gold_path.is_file() else []
    splits_path = splits_dir / "splits.json"
    inputs += [splits_path] if splits_path.is_file() else []  # the report states the split unit and its risk
    config = {"eval": section.model_dump(mode="json"), "prompt": cfg.prompt.model_dump(), "model": cfg.model.base,
              "endpoint": cfg.endpoint.model_dump(), "judge": cfg.curate.judge.model_dump(mode="json"),
              "quick": quick, "promote": promote, "adapters": sorted(adapters)}
    factory = endpoint_factory or (lambda a: open_endpoint(cfg, log=log, adapters=a))

    def work(ctx: StageContext) -> None:
        from sovllm.models import registry

        items = quick_items(items_all, section.quick_limit, section.seed) if quick else items_all
        max_tokens = answer_budget(items_all, cfg)
        try:
            base_id = registry.resolve(cfg.model.base).base_id
        except Exception:  # noqa: BLE001 - remote-only: no local base model
            base_id = None
        runs = [items]
        if "retrieved" in section.contexts:
            answerable = [i for i in items if i.answerable]
            limit = QUICK_CAPS["retrieved"] if quick else section.retrieved_limit
            runs.append(retrieved_items(sample(answerable, limit, section.seed), eval_chunks(root, cfg),
                                        section.retrieval_k))
        if "gold" not in section.contexts:
            runs = runs[1:]
        cache = CompletionCache(ctx.out_dir / "cache.jsonl")
        with factory(adapters) as endpoint:
            embedded = endpoint.embedded
            models = resolve_models(cfg, endpoint, adapters, base_id)
            log(f"eval: {', '.join(m.label for m in models)} on {len(items)} items "
                f"({sum(len(r) for r in runs)} prompts per model, max_tokens {max_tokens})")
            total = sum(len(r) for r in runs) * len(models)
            bar = progress_factory(total) if progress_factory else None
            started = time.perf_counter()
            # one pass over every context mode keeps the server's batch full until the very end
            rows = predict(endpoint, models, [i for r in runs for i in r], max_tokens=max_tokens,
                           refusal=cfg.prompt.refusal, cache=cache, concurrency=section.concurrency,
                           languages=tuple(cfg.ingest.languages), on_done=(lambda: bar.advance()) if bar else None)
            if bar:
                bar.close()
            ctx.timings["generate_s"] = round(time.perf_counter() - started, 1)
            labels = [m.label for m in models]
            summary = summarise(rows, labels, resamples=section.resamples, seed=section.seed)
            summary["targets"] = check_targets(summary)
            summary["split"] = split_info(root, cfg)
            summary["max_tokens"] = max_tokens
            summary["system_prompt"] = system_prompt(cfg.prompt)
            summary["retrieval_k"] = section.retrieval_k
            summary["resamples"] = section.resamples
            summary["tokens"] = token_totals(rows)
            summary["most_different"] = {m: most_different(rows, labels[0], m) for m in labels[1:]}
            started = time.perf_counter()
            summary["judge"] = _judge(root, cfg, endpoint, items, rows, models, quick, log, cache) \
                if section.judge.enabled else {"enabled": False}
            ctx.timings["judge_s"] = round(time.perf_counter() - started, 1)
        summary["models"] = [{"label": m.label, "served_as": m.served,
                              **(refusal_summary(adapters[m.label]) if embedded and m.label in adapters else {})}
                             for m in models]
        if promote:
            summary["promotion"] = promotion.decide(root, cfg, summary, champion, rows, log)
            if summary["promotion"].get("promoted") and not embedded:  # the endpoint's champion/challenger follows
                from sovllm.serve.publish import publish

                publish(cfg.endpoint, {cfg.eval.gate: str(folder(root, cfg, "adapter") / "adapter")},
                        api_key=endpoint.api_key, log=log)
        write_jsonl(ctx.out_dir / "predictions.jsonl", rows)
        write_atomic(ctx.out_dir / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        from sovllm.evaluate.report import write_report

        write_report(ctx.out_dir / "report.html", summary, rows)
        ctx.counts.update({"items": len(items), "predictions": len(rows), "prompt_tokens": summary["tokens"]["prompt"],
                           "generated_tokens": summary["tokens"]["generated"],
                           "judge_prompt_tokens": summary["judge"].get("prompt_tokens", 0)})
        ctx.extra.update({"headline": headline(summary), "targets": summary["targets"],
                          "promotion": summary.get("promotion")})
        ctx.extra["mlflow"] = promotion.log_to_mlflow(root, cfg, ctx.out_dir, summary, log)

    return run_stage("eval", report_dir, work, inputs=inputs, config=config, force=force,
                     verify=lambda m: (report_dir / "summary.json").is_file())


def headline(summary: dict) -> dict:
    """model → gold-context headline metrics (what the CLI table and the run summary print)."""
    mode = summary["modes"][0]
    table = summary["table"][mode]
    out = {"context": mode, "versus": summary["reference_model"]}
    if (summary.get("split") or {}).get("leakage"):
        out["leakage"] = summary["split"]["leakage"]
    for model, row in table.items():
        out[model] = {k: row.get(k) for k in ("f1", "rouge_l", "refusal_accuracy", "refusal_accuracy_on_topic",
                                              "refusal_accuracy_foreign", "false_refusal_rate", "stop_rate")}
        if model != summary["reference_model"]:
            out[model]["f1_diff"] = summary["comparisons"][mode][model]["f1"]
    return out


def _judge(root: Path, cfg: Config, endpoint, items: list[Item], rows: list[dict], models: list[Model], quick: bool,
           log: Callable[[str], None], cache: CompletionCache) -> dict:
    from sovllm.curate.stage import judge_endpoint_config

    section = cfg.eval.judge
    labels = [m.label for m in models]
    configured = judge_endpoint_config(cfg)
    judge_ep = configured or endpoint
    # the embedded base model's verdicts depend only on its weights: reusable across runs
    fingerprint = "" if configured else next((m.fingerprint for m in models if m.served == endpoint.model), "")
    by_key = {(r["model"], r["id"]): r for r in rows if r["context"] == "gold"}
    limit = min(section.items, QUICK_CAPS["judge_items"]) if quick else section.items
    chosen = sample([i for i in items if all((m, i.id) in by_key for m in labels)], limit, cfg.eval.seed + 1)
    gold = judging.load_gold(root / section.gold)
    gold = sample(gold, min(section.gold_limit or len(gold), QUICK_CAPS["gold"]) if quick else section.gold_limit, cfg.eval.seed)
    out: dict = {"enabled": True, "judge": judge_ep.describe(), "items": len(chosen)}
    log(f"judge {judge_ep.model}: {len(chosen)} items × {len(labels)} models, {len(gold)} gold items")

    async def everything() -> None:
        rubric = judging.Judge(judge_ep, judging.ANSWER_ABC, max_tokens=section.max_tokens,
                               concurrency=cfg.eval.concurrency, few_shot=False, cache=cache, fingerprint=fingerprint)
        pair = judging.PairJudge(judge_ep, max_tokens=section.max_tokens, concurrency=cfg.eval.concurrency,
                                 cache=cache, fingerprint=fingerprint)
        again = judging.Judge(judge_ep, judging.ANSWER_ABC, max_tokens=section.max_tokens,
                              concurrency=cfg.eval.concurrency, few_shot=False)  # repeats are asked, never cached
        graded = [{"context": context_of(i), "question": i.question, "reference": i.reference,
                   "answer": by_key[(m, i.id)]["answer"], "model": m} for m in labels for i in chosen]
        repeat_n = min(section.repeat, QUICK_CAPS["repeat"]) if quick else section.repeat
        repeats = graded[-repeat_n:] if repeat_n else []
        comparisons = [{"context": context_of(i), "question": i.question, "reference": i.reference,
                        "a": by_key[(labels[0], i.id)]["answer"], "b": by_key[(m, i.id)]["answer"], "model": m}
                       for m in labels[1:] for i in chosen]
        probes_n = min(section.verbosity, QUICK_CAPS["verbosity"]) if quick else section.verbosity
        probes = [{"context": context_of(i), "question": i.question, "reference": i.reference, "a": i.reference,
                   "b": judging.padded(i.reference, i.question)} for i in chosen if i.answerable][:probes_n]
        gold_items = [{"context": g["context"], "question": g["question"], "reference": g["reference"],
                       "a": g["answer_1"], "b": g["answer_2"]} for g in gold]
        (verdicts, stats), (again, stats2), outcomes, probe_out, gold_out = await asyncio.gather(
            rubric.grade_many(graded), again.grade_many(repeats), pair.compare_many(comparisons),
            pair.compare_many(probes), pair.compare_many(gold_items))
        grades = {}
        for m in labels:
            mine = [v for v, g in zip(verdicts, graded) if g["model"] == m]
            grades[m] = {r: sum(v.rating == r for v in mine) for r in ("A", "B", "C")}
            grades[m]["failed"] = sum(v.rating is None for v in mine)
        same = [a.rating == b.rating for a, b in zip(verdicts[len(graded) - len(repeats):], again)
                if a.rating is not None and b.rating is not None]
        pairwise = {}
        for m in labels[1:]:
            mine = [o for o, c in zip(outcomes, comparisons) if c["model"] == m]
            decided = [o for o in mine if o.winner is not None]
            pairwise[m] = {"versus": labels[0], "items": len(mine), "wins": sum(o.winner == "b" for o in decided),
                           "losses": sum(o.winner == "a" for o in decided), "ties": sum(o.winner == "tie" for o in decided),
                           "failed": len(mine) - len(decided),
                           "position_consistency": round(sum(o.consistent for o in decided) / len(decided), 4)
                           if decided else None}
        decided_probes = [o for o in probe_out if o.winner is not None]
        out.update({
            "rubric": judging.ANSWER_ABC.name, "grades": grades,
            "repeat_consistency": round(sum(same) / len(same), 4) if same else None, "repeat_items": len(repeats),
            "pairwise": pairwise,
            "verbosity_probe": {"items": len(probes), "padded_wins": sum(o.winner == "b" for o in decided_probes),
                                "failed": len(probes) - len(decided_probes),
                                "passed": bool(decided_probes) and not any(o.winner == "b" for o in decided_probes)},
            "agreement": judging.agreement([g["label"] for g in gold], [judging.gold_label(o) for o in gold_out],
                                           section.kappa_min) if gold else {"items": 0, "reliable": False,
                                                                            "note": f"no gold labels at {section.gold}"},
            "gold_verdicts": [{"id": g["id"], "label": g["label"], "judge": judging.gold_label(o)}
                              for g, o in zip(gold, gold_out)],
            "failures": _merge(stats.failures, stats2.failures, pair.counts.failures),
            "verdicts": stats.graded + stats2.graded + pair.counts.graded,
            "prompt_tokens": stats.prompt_tokens + stats2.prompt_tokens + pair.counts.prompt_tokens,
            "completion_tokens": stats.completion_tokens + stats2.completion_tokens + pair.counts.completion_tokens,
        })
        out["reliable"] = bool(out["agreement"].get("reliable"))

    asyncio.run(everything())
    return out


def _merge(*dicts: dict) -> dict:
    merged: dict = {}
    for d in dicts:
        for k, v in d.items():
            merged[k] = merged.get(k, 0) + v
    return merged


def key_of(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]
