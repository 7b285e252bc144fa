"""Does the adapter learn *when* to refuse? A training probe on a project's curated splits.

Trains a LoRA adapter (the project's preset, AdamW, cosine schedule with 5 % warmup, sovllm's
answer-only loss and length-grouped batches) on a `train.jsonl`, and after every `--probe-every`
epochs asks the adapter every item of an `eval.jsonl` with gold context, greedily, for the first
`--tokens` tokens. An item counts as refused when that beginning is the project's refusal
sentence. Prints refusal accuracy on the unanswerable items and the false-refusal rate on the
answerable ones — the two refusal targets of `sovllm eval` — without the cost of full answers, so
training-data and schedule variants can be compared side by side (docs/eval.md has the figures).

    .venv/bin/python benchmarks/refusal.py examples/acme [--train FILE] [--eval FILE] \
        [--epochs 2] [--lr 1e-3] [--decision-weight 1.0]

`--decision-weight W` multiplies the loss of the first two completion tokens (where an answer and
the refusal sentence part ways) by W; 1.0 is sovllm's own loss.

Each probe also scores every item by log P(first three tokens of the refusal sentence | prompt)
and reports how well that score separates unanswerable from answerable items: ROC AUC (0.5 = the
decision does not depend on whether the context holds the answer) and the best refusal accuracy
any threshold on it would give with ≤ 10 % false refusals. Greedy answers show where an adapter
*is* on that curve; the separation shows whether any amount of refusal bias could reach the targets.
`--score margin` uses the refusal calibration's margin instead (docs/train.md: margin + bias ≥ 0 is
exactly the greedy refusal under a bias), `--score support` the question's lexical support in its
context alone, `--score calibrated` the adapter's calibrated score margin − w × support (w from its
manifest) and also counts the items its bias refuses. `--adapter DIR` scores a trained adapter (e.g. `out/train/adapter`) instead of training one,
`--base` scores the base model too, `--no-generate` skips the greedy answers (about 2 × faster).
`--top-layers N` puts LoRA on the top N layers only (faster steps: backward stops at the lowest
adapted layer); `--paired` trains each question's items (own and foreign context) in one micro-batch;
`--share` trains the examples that share a context as shared-prefix trees, as `sovllm train` does
with `train.share_prefix` (`--batch-size`/`--grad-accum` then count trees).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("project", type=Path)
    parser.add_argument("--train", type=Path, help="default: the project's out/curate/train.jsonl")
    parser.add_argument("--eval", type=Path, help="default: the project's out/curate/eval.jsonl")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--lr", type=float, default=None, help="default: train.learning_rate")
    parser.add_argument("--probe-every", type=float, default=1.0, help="epochs between probes")
    parser.add_argument("--tokens", type=int, default=8, help="tokens generated per probe answer")
    parser.add_argument("--decision-weight", type=float, default=1.0)
    parser.add_argument("--adapter", type=Path, help="score this trained adapter instead of training one")
    parser.add_argument("--base", action="store_true", help="also score the base model (adapter disabled)")
    parser.add_argument("--no-generate", action="store_true", help="only the score separation, no greedy answers")
    parser.add_argument("--score", choices=("logprob", "margin", "support", "calibrated"), default="logprob",
                        help="logprob: log P(first three refusal tokens); margin: the refusal calibration's margin "
                             "(sovllm.train.calibrate.margins), which decides greedy refusal exactly; support: the "
                             "lexical support alone; calibrated: margin - w x support with the adapter's own w and b")
    parser.add_argument("--top-layers", type=int, default=0, help="LoRA only on the top N decoder layers (0: all)")
    parser.add_argument("--share", action="store_true",
                        help="train examples that share a context as one shared-prefix tree (sovllm.train.data.Tree)")
    parser.add_argument("--batch-size", type=int, default=0, help="micro-batch (examples or trees); 0: train.batch_size")
    parser.add_argument("--grad-accum", type=int, default=0, help="0: train.grad_accum")
    parser.add_argument("--max-steps", type=int, default=0, help="stop after N optimizer steps (0: epochs)")
    parser.add_argument("--paired", action="store_true",
                        help="micro-batches of one question's items (its own and a foreign context) instead of "
                             "length-grouped ones")
    args = parser.parse_args(argv)
    if args.share and (args.paired or args.decision_weight != 1.0):
        parser.error("--share trains trees of several examples: not with --paired or --decision-weight")

    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from sovllm.config import load_config
    from sovllm.evaluate.metrics import is_refusal
    from sovllm.evaluate.stats import separation
    from sovllm.models import registry
    from sovllm.models.chat import end_of_turn_id
    from sovllm.models.tokenizer import load_tokenizer
    from sovllm.train.data import Collator, TreeDataset, encode, share_prefixes
    from sovllm.train.fit import GroupedSampler, selective_loss
    from sovllm.train.lora import lora_config
    from sovllm.train.stopcheck import greedy_completions

    cfg = load_config(args.project / "sovllm.yaml")
    out = args.project / cfg.project.output_dir / "curate"
    train_path, eval_path = args.train or out / "train.jsonl", args.eval or out / "eval.jsonl"
    section = cfg.train
    torch.set_num_threads(section.threads or torch.get_num_threads())
    torch.manual_seed(section.seed)
    base = registry.resolve(cfg.model.base)
    tokenizer = load_tokenizer(base.path)
    eot = end_of_turn_id(tokenizer)
    pad = tokenizer.pad_token_id
    read = lambda p: [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]  # noqa: E731
    train_records = read(train_path)
    train = [encode(r, tokenizer, eot, str(train_path)) for r in train_records]
    items = read(eval_path)
    probes = [encode(r, tokenizer, eot, str(eval_path)) for r in items]
    refusal = cfg.prompt.refusal.strip()

    model = AutoModelForCausalLM.from_pretrained(str(base.path), dtype=torch.float32)
    model.config.use_cache = False
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(args.adapter), is_trainable=True)
    else:
        settings = lora_config(section)
        if args.top_layers:
            layers = model.config.num_hidden_layers
            settings.layers_to_transform = list(range(max(0, layers - args.top_layers), layers))
        model = get_peft_model(model, settings)
    batch_size, grad_accum = args.batch_size or section.batch_size, args.grad_accum or section.grad_accum
    units = share_prefixes(train, max_tokens=section.max_length * 4) if args.share else None
    features = (TreeDataset(units).features if units else
                [{"input_ids": e.input_ids, "prompt_len": len(e.prompt_ids)} for e in train])
    answer_tokens = ([t.answer_tokens for t in units] if units else
                     [len(e.completion_ids) for e in train])
    per_step = batch_size * grad_accum
    steps_per_epoch = math.ceil(len(features) / per_step)
    total = args.max_steps or max(1, math.ceil(args.epochs * len(features) / per_step))
    warmup = max(1, math.ceil(section.warmup_ratio * total))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr or section.learning_rate, weight_decay=section.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    collate = Collator(pad)
    prefix = tokenizer(refusal, add_special_tokens=False)["input_ids"][:3]
    unanswerable = [i for i, r in enumerate(items) if r["meta"]["type"] == "unanswerable"]
    answerable = [i for i in range(len(items)) if i not in set(unanswerable)]

    def refusal_scores(batch_size: int = 8) -> list[float]:
        """log P(refusal prefix | prompt) per eval item, teacher-forced."""
        model.eval()
        net = model.get_base_model()
        scores = []
        with torch.inference_mode():
            for b in range(0, len(probes), batch_size):
                chunk = probes[b:b + batch_size]
                batch = collate([{"input_ids": e.prompt_ids + prefix, "prompt_len": len(e.prompt_ids)} for e in chunk])
                hidden = net.get_decoder()(input_ids=batch["input_ids"]).last_hidden_state
                for j, e in enumerate(chunk):
                    n = len(e.prompt_ids)
                    logp = torch.log_softmax(net.get_output_embeddings()(hidden[j, n - 1:n - 1 + len(prefix)]).float(), -1)
                    scores.append(float(logp[torch.arange(len(prefix)), torch.tensor(prefix)].sum()))
        return scores

    def support() -> list[float]:
        """Each eval item's lexical support in its context (IDF over the training contexts)."""
        from sovllm.models.grounding import Vocabulary
        from sovllm.models.grounding import record_turn as turn

        vocabulary = Vocabulary.from_contexts(t[0] for t in map(turn, train_records) if t)
        return [vocabulary.support(*turn(r)) if turn(r) else 1.0 for r in items]

    def separated() -> dict:
        extra = {}
        if args.score == "support":
            scores = [-s for s in support()]  # lower support refuses
        elif args.score in ("margin", "calibrated"):
            from sovllm.train.calibrate import margins, refusal_token_ids

            scores = margins(model, [e.prompt_ids for e in probes], refusal_token_ids(tokenizer, refusal), pad_id=pad,
                             share_keys=[e.share_key for e in probes])
            if args.score == "calibrated":
                from sovllm.models.adapter import inspect_adapter

                calibration = inspect_adapter(args.adapter).refusal if args.adapter else None
                if calibration is None:
                    parser.error("--score calibrated needs --adapter with a refusal_calibration in its manifest")
                weight = calibration.support_weight
                scores = [m - weight * s for m, s in zip(scores, support())]
                refused = [m + calibration.bias >= 0 for m in scores]
                extra = {"support_weight": weight, "bias": calibration.bias,
                         "refused_unanswerable": sum(refused[i] for i in unanswerable),
                         "refused_answerable": sum(refused[i] for i in answerable)}
        else:
            scores = refusal_scores()
        sep = separation([scores[i] for i in unanswerable], [scores[i] for i in answerable], max_fpr=0.10)
        return {"auc": round(sep.auc, 4), "refusal_at_10pct_false": round(sep.recall, 4), **extra}

    def probe(step: int) -> dict:
        started = time.perf_counter()
        result = {"step": step, "epoch": round(step / steps_per_epoch, 2), **separated(),
                  "unanswerable": len(unanswerable), "answerable": len(answerable)}
        if not args.no_generate:
            model.config.use_cache = True
            completions = greedy_completions(model, probes, eot_id=eot, pad_id=pad, max_new_tokens=args.tokens)
            refused = {}
            for i, ids in enumerate(completions):
                text = tokenizer.decode(ids, skip_special_tokens=True).strip()
                refused[i] = is_refusal(text, refusal) or (bool(text) and refusal.startswith(text))
            model.config.use_cache = False
            result["refusal_accuracy"] = round(sum(refused[i] for i in unanswerable) / max(1, len(unanswerable)), 4)
            result["false_refusals"] = round(sum(refused[i] for i in answerable) / max(1, len(answerable)), 4)
        model.train()
        result["probe_s"] = round(time.perf_counter() - started, 1)
        print(json.dumps(result), flush=True)
        return result

    if args.base:
        with model.disable_adapter():
            print(json.dumps({"base": separated()}), flush=True)
    if args.adapter:
        probe(0)
        return 0

    pairs: dict[str, list[int]] = {}  # --paired: a question's items, one micro-batch
    for i, record in enumerate(train_records):
        pairs.setdefault(record["meta"]["question"], []).append(i)
    pairs = list(pairs.values())
    probe_at = {min(total, round(steps_per_epoch * args.probe_every * k)) for k in range(1, 1000)} | {total}
    sampler = GroupedSampler([len(f["input_ids"]) for f in features], batch_size, section.seed)
    if units:
        print(json.dumps({"trees": len(units), "examples": len(train), "tree_tokens": sum(map(len, units)),
                          "example_tokens": sum(map(len, train))}), flush=True)
    started, step, results = time.perf_counter(), 0, []
    model.train()
    while step < total:
        sampler.set_epoch(step // steps_per_epoch)
        order = list(sampler)
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        if args.paired:
            batches = list(pairs)
            random.Random(f"{section.seed}:{step}").shuffle(batches)
        for s in range(0, len(batches), grad_accum):
            group = batches[s:s + grad_accum]
            n_items = sum(answer_tokens[i] for batch in group for i in batch)
            for batch in group:
                inputs = collate([features[i] for i in batch])
                selective_loss(model, inputs, n_items, first_weight=args.decision_weight)[0].backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            step += 1
            if step in probe_at:
                results.append(probe(step))
            if step >= total:
                break
    print(json.dumps({"train": str(train_path), "eval": str(eval_path), "examples": len(train), "steps": total,
                      "train_s": round(time.perf_counter() - started - sum(r["probe_s"] for r in results), 1),
                      "probes": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
