"""Does the adapter learn *when* to refuse? A training probe on a project's curated splits.

Trains a LoRA adapter on a `train.jsonl` through the same Trainer as `sovllm train`
(`sovllm.train.steps.lora_model` and `sovllm.train.fit`: the project's LoRA preset, schedule,
answer-only loss and `train.batching`), and after every `--probe-every` epochs asks the adapter
every item of an `eval.jsonl` with gold context, greedily, for the first `--tokens` tokens. An
item counts as refused when that beginning is the project's refusal sentence. Prints refusal
accuracy on the unanswerable items and the false-refusal rate on the answerable ones — the two
refusal targets of `sovllm eval` — without the cost of full answers, so training-data and schedule
variants can be compared side by side (docs/experiments/ has the figures).

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
context alone, `--score calibrated` the adapter's calibrated score margin − w × support − v × line support (w, v from its
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
import tempfile
import time
from pathlib import Path


class PairedBatches:
    """`--paired` micro-batches: each question's train items (its own and a foreign context)
    together, in a new seeded order every epoch (the Trainer calls `set_epoch`)."""

    def __init__(self, groups: list[list[int]], seed: int):
        self.groups, self.seed, self.epoch = groups, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self):
        order = list(self.groups)
        random.Random(f"{self.seed}:{self.epoch}").shuffle(order)
        return iter(order)


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
    from transformers import TrainerCallback

    from sovllm.config import load_config
    from sovllm.evaluate.metrics import is_refusal
    from sovllm.stats import separation
    from sovllm.train.data import Collator, encode, share_prefixes
    from sovllm.train.fit import make_trainer, run_fit, training_arguments
    from sovllm.train.steps import load_base, lora_model, setup_torch
    from sovllm.train.stopcheck import greedy_completions

    cfg = load_config(args.project / "sovllm.yaml")
    out = args.project / cfg.project.output_dir / "curate"
    train_path, eval_path = args.train or out / "train.jsonl", args.eval or out / "eval.jsonl"
    section = cfg.train
    setup_torch(section)
    base, tokenizer, eot = load_base(cfg)
    pad = tokenizer.pad_token_id
    read = lambda p: [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]  # noqa: E731
    train_records = read(train_path)
    train = [encode(r, tokenizer, eot, str(train_path)) for r in train_records]
    items = read(eval_path)
    probes = [encode(r, tokenizer, eot, str(eval_path)) for r in items]
    refusal = cfg.prompt.refusal.strip()

    if args.adapter:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(base.path), dtype=torch.float32)
        model.config.use_cache = False
        model = PeftModel.from_pretrained(model, str(args.adapter), is_trainable=True)
    else:
        model = lora_model(base.path, section, top_layers=args.top_layers)
    batch_size, grad_accum = args.batch_size or section.batch_size, args.grad_accum or section.grad_accum
    units = share_prefixes(train, max_tokens=section.max_length * 4) if args.share else train
    paired = None
    if args.paired:
        questions: dict[str, list[int]] = {}  # a question's items, one micro-batch
        for i, record in enumerate(train_records):
            questions.setdefault(record["meta"]["question"], []).append(i)
        paired = PairedBatches(list(questions.values()), section.seed)
    batches_per_epoch = len(paired) if paired else math.ceil(len(units) / batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / grad_accum)
    total = args.max_steps or max(1, math.ceil(args.epochs * len(units) / (batch_size * grad_accum)))
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
        from sovllm.models.prompt import record_turn as turn

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
                from sovllm.models.prompt import last_user_turn

                # the per-request bias minus the constant: - w * support - v * line support
                turns = [calibration.bias_for(last_user_turn(r.get("messages"))) for r in items]
                scores = [m + (b - calibration.bias if b is not None else 0.0) for m, b in zip(scores, turns)]
                refused = [m + calibration.bias >= 0 for m in scores]
                extra = {"support_weight": calibration.support_weight, "line_weight": calibration.line_weight,
                         "bias": calibration.bias,
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

    probe_at = {min(total, round(steps_per_epoch * args.probe_every * k)) for k in range(1, 1000)} | {total}
    if args.share:
        print(json.dumps({"trees": len(units), "examples": len(train), "tree_tokens": sum(map(len, units)),
                          "example_tokens": sum(map(len, train))}), flush=True)
    results = []

    class Probes(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            if state.global_step in probe_at:
                results.append(probe(state.global_step))

    with tempfile.TemporaryDirectory() as scratch:
        # fp32 on the CPU whatever the machine has: the probes feed the model CPU tensors
        settings = training_arguments(Path(scratch), steps=total, batch_size=batch_size, grad_accum=grad_accum,
                                      learning_rate=args.lr or section.learning_rate,
                                      warmup_ratio=section.warmup_ratio, weight_decay=section.weight_decay,
                                      eval_steps=total, seed=section.seed,
                                      gradient_checkpointing=section.gradient_checkpointing, has_val=False,
                                      checkpoints=False)
        trainer = make_trainer(model, tokenizer, units, [], settings, batching=section.batching, callbacks=[Probes()],
                               pad_id=pad, first_weight=args.decision_weight, batch_sampler=paired)
        fit = run_fit(trainer)
    print(json.dumps({"train": str(train_path), "eval": str(eval_path), "examples": len(train), "steps": total,
                      "train_s": round(fit.seconds - sum(r["probe_s"] for r in results), 1),
                      "probes": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
