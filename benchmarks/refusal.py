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
"""

from __future__ import annotations

import argparse
import json
import math
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
    args = parser.parse_args(argv)

    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from sovllm.config import load_config
    from sovllm.evaluate.metrics import is_refusal
    from sovllm.models import registry
    from sovllm.models.chat import end_of_turn_id
    from sovllm.models.tokenizer import load_tokenizer
    from sovllm.train.data import Collator, encode
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
    train = [encode(r, tokenizer, eot, str(train_path)) for r in read(train_path)]
    items = read(eval_path)
    probes = [encode(r, tokenizer, eot, str(eval_path)) for r in items]
    refusal = cfg.prompt.refusal.strip()

    model = AutoModelForCausalLM.from_pretrained(str(base.path), dtype=torch.float32)
    model.config.use_cache = False
    model = get_peft_model(model, lora_config(section))
    per_step = section.batch_size * section.grad_accum
    steps_per_epoch = math.ceil(len(train) / per_step)
    total = max(1, math.ceil(args.epochs * len(train) / per_step))
    warmup = max(1, math.ceil(section.warmup_ratio * total))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr or section.learning_rate, weight_decay=section.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    collate = Collator(pad)

    def probe(step: int) -> dict:
        model.config.use_cache = True
        started = time.perf_counter()
        completions = greedy_completions(model, probes, eot_id=eot, pad_id=pad, max_new_tokens=args.tokens)
        refused = {}
        for i, ids in enumerate(completions):
            text = tokenizer.decode(ids, skip_special_tokens=True).strip()
            refused[i] = is_refusal(text, refusal) or (bool(text) and refusal.startswith(text))
        model.train()
        model.config.use_cache = False
        unanswerable = [i for i, r in enumerate(items) if r["meta"]["type"] == "unanswerable"]
        answerable = [i for i in range(len(items)) if i not in set(unanswerable)]
        result = {"step": step, "epoch": round(step / steps_per_epoch, 2),
                  "refusal_accuracy": round(sum(refused[i] for i in unanswerable) / max(1, len(unanswerable)), 4),
                  "false_refusals": round(sum(refused[i] for i in answerable) / max(1, len(answerable)), 4),
                  "unanswerable": len(unanswerable), "answerable": len(answerable),
                  "probe_s": round(time.perf_counter() - started, 1)}
        print(json.dumps(result), flush=True)
        return result

    probe_at = {min(total, round(steps_per_epoch * args.probe_every * k)) for k in range(1, 1000)} | {total}
    sampler = GroupedSampler([len(e) for e in train], section.batch_size, section.seed)
    started, step, results = time.perf_counter(), 0, []
    model.train()
    while step < total:
        sampler.set_epoch(step // steps_per_epoch)
        order = list(sampler)
        batches = [order[i:i + section.batch_size] for i in range(0, len(order), section.batch_size)]
        for s in range(0, len(batches), section.grad_accum):
            group = batches[s:s + section.grad_accum]
            n_items = sum(len(train[i].completion_ids) for batch in group for i in batch)
            for batch in group:
                features = [{"input_ids": train[i].input_ids, "prompt_len": len(train[i].prompt_ids)} for i in batch]
                selective_loss(model, collate(features), n_items, first_weight=args.decision_weight)[0].backward()
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
