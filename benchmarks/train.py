"""Training throughput: sovllm's length-grouped batching vs the tutorial's padded batching, and
(`--peer trl`) sovllm's training vs TRL's SFTTrainer.

Both runs train the same LoRA preset on the same examples (one epoch each, same batch size,
accumulation, max length, dtype fp32, threads, seed, activation checkpointing off) on the bundled
SmolLM2-135M, in one process, with sovllm's loss (logits only at label positions). They differ only
in batching: `grouped` (transformers' length-grouped sampler) vs `padded` (shuffled, padded to the
longest in the batch, as the tutorial did). Reported per run: loss-bearing tokens/s, the padding
share, and MFU against the fp32 matmul peak measured here. Runs alternate (padded, grouped, …) and
the best of `--repeats` is kept for each. Prints JSON.

    .venv/bin/python benchmarks/train.py --data examples/acme/out/curate/train.jsonl [--examples 64]

`--peer trl` (needs `pip install trl`): the same examples, tokenised once by sovllm (prompt via the
base model's chat template, completion = answer + end-of-turn; TRL gets them pre-tokenised with
its `completion_mask`, so both train on exactly the same tokens with a completion-only loss), the
same LoRA config, learning rate, cosine schedule with warmup, one epoch, fp32, threads and seed.
sovllm trains as its train stage does (shared-context trees, `train.batch_size` trees per step,
loss only at label positions); TRL's SFTTrainer trains with its defaults otherwise (padded
batches of `--trl-batch-size` examples, logits for every position). Reported per run: loss tokens
(completion tokens trained) per second of `Trainer.train`, and the val loss of the result — the
token-mean loss over val completions, computed by the same code for both adapters, outside both
trainers. Runs alternate sovllm, TRL, sovllm, TRL, … (`--repeats`); medians are reported.

    .venv/bin/python benchmarks/train.py --peer trl --data examples/acme/out/curate/train.jsonl \
        --val examples/acme/out/curate/val.jsonl --contexts 32 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def matmul_peak(threads: int, n: int = 2048, repeats: int = 5) -> float:
    """fp32 GFLOP/s of a square matmul: the practical peak MFU is measured against."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * n ** 3 / best / 1e9


def model_flops(model, real_tokens: int, loss_tokens: int) -> float:
    """Useful FLOPs of a LoRA step: forward + input-gradient backward through the frozen body (≈ 4 × params
    per real token; no weight gradients), and forward + backward of the output head at loss positions."""
    base = model.get_base_model()
    head = base.get_output_embeddings().weight
    embed = base.get_input_embeddings().weight
    body = sum(p.numel() for p in base.parameters()) - embed.numel() - (0 if head is embed else head.numel())
    return 4 * body * real_tokens + 6 * head.numel() * loss_tokens


def one_run(base_path: str, tokenizer, examples, batching: str, args, peak: float) -> dict:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from sovllm.config import TrainSection
    from sovllm.train.fit import make_trainer, run_fit, training_arguments
    from sovllm.train.lora import lora_config

    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model.config.use_cache = False
    model = get_peft_model(model, lora_config(TrainSection(preset=args.preset)))
    steps = len(examples) // (args.batch_size * args.grad_accum)
    with tempfile.TemporaryDirectory() as tmp:
        targs = training_arguments(Path(tmp), steps=steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                                   learning_rate=2e-4, warmup_ratio=0.0, weight_decay=0.0, eval_steps=10 ** 6,
                                   seed=args.seed, gradient_checkpointing=False, has_val=False)
        targs.save_strategy = "no"
        trainer = make_trainer(model, tokenizer, examples, [], targs, batching=batching, callbacks=[],
                               pad_id=tokenizer.pad_token_id)
        fit = run_fit(trainer)
    flops = model_flops(model, fit.real_tokens, fit.loss_tokens)
    return {"batching": batching, "steps": fit.steps, "seconds": round(fit.seconds, 2),
            "loss_tokens": fit.loss_tokens, "real_tokens": fit.real_tokens, "padded_tokens": fit.padded_tokens,
            "loss_tokens_per_s": round(fit.tokens_per_s, 1), "padding_share": round(fit.padding_share, 4),
            "processed_tokens_per_s": round(fit.padded_tokens / fit.seconds, 1),
            "mfu": round(flops / fit.seconds / (peak * 1e9), 4)}


def val_loss(model, examples, pad_id: int) -> float:
    """Token-mean loss over the completions of `examples` (one example per row, no trees)."""
    import torch

    from sovllm.train.data import Collator, ExampleDataset
    from sovllm.train.fit import selective_loss

    model.eval()
    collate, data = Collator(pad_id), ExampleDataset(examples)
    total, count = 0.0, 0
    with torch.inference_mode():
        for i in range(len(data)):
            loss, n = selective_loss(model, collate([data[i]]), 1)  # divisor 1: the summed loss
            total, count = total + float(loss), count + n
    return total / count


def peer_lora(args):
    from sovllm.config import TrainSection
    from sovllm.train.lora import lora_config

    return lora_config(TrainSection(preset=args.preset))


def sovllm_peer_run(base_path: str, tokenizer, train, val, args) -> dict:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from sovllm.train.data import share_prefixes
    from sovllm.train.fit import make_trainer, run_fit, training_arguments

    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model.config.use_cache = False
    model = get_peft_model(model, peer_lora(args))
    units = share_prefixes(train, max_tokens=args.max_length)
    steps = -(-len(units) // args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        targs = training_arguments(Path(tmp), steps=steps, batch_size=args.batch_size, grad_accum=1,
                                   learning_rate=args.learning_rate, warmup_ratio=0.05, weight_decay=0.0,
                                   eval_steps=10 ** 6, seed=args.seed, gradient_checkpointing=False, has_val=False,
                                   checkpoints=False)
        trainer = make_trainer(model, tokenizer, units, [], targs, batching="grouped", callbacks=[],
                               pad_id=tokenizer.pad_token_id)
        fit = run_fit(trainer)
    return {"trainer": "sovllm", "steps": fit.steps, "units": len(units), "seconds": round(fit.seconds, 2),
            "loss_tokens": fit.loss_tokens, "loss_tokens_per_s": round(fit.loss_tokens / fit.seconds, 1),
            "val_loss": round(val_loss(model, val, tokenizer.pad_token_id), 4)}


def trl_peer_run(base_path: str, tokenizer, train, val, args) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model.config.use_cache = False
    rows = [{"input_ids": e.prompt_ids + e.completion_ids,
             "completion_mask": [0] * len(e.prompt_ids) + [1] * len(e.completion_ids)} for e in train]
    steps = -(-len(rows) // args.trl_batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        config = SFTConfig(output_dir=tmp, max_steps=steps, per_device_train_batch_size=args.trl_batch_size,
                           gradient_accumulation_steps=1, learning_rate=args.learning_rate, lr_scheduler_type="cosine",
                           warmup_steps=-(-steps * 5 // 100), weight_decay=0.0, logging_steps=1, save_strategy="no",
                           report_to="none", seed=args.seed, data_seed=args.seed, use_cpu=True, bf16=False,
                           max_length=args.max_length, completion_only_loss=True, disable_tqdm=True,
                           dataloader_num_workers=0)
        trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer, peft_config=peer_lora(args))
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # its per-step dicts would go to stdout, into the JSON
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    loss_tokens = sum(len(e.completion_ids) for e in train)  # one epoch: every completion once
    return {"trainer": f"trl {trl.__version__} SFTTrainer", "steps": steps, "batch_size": args.trl_batch_size,
            "seconds": round(seconds, 2), "loss_tokens": loss_tokens,
            "loss_tokens_per_s": round(loss_tokens / seconds, 1),
            "val_loss": round(val_loss(trainer.model, val, tokenizer.pad_token_id), 4)}


def peer_main(args, base, tokenizer, eot, threads: int) -> None:
    import statistics

    from sovllm.artifacts import read_jsonl
    from sovllm.train.data import audit, encode

    def load(path: str):
        examples = [encode(r, tokenizer, eot) for r in read_jsonl(path)]
        return audit(examples, tokenizer, max_length=args.max_length, too_long="drop", batch_size=1)[0]

    train = load(args.data)
    contexts = sorted({e.share_key for e in train}, key=str)
    chosen = set(random.Random(args.seed).sample(contexts, min(args.contexts, len(contexts)))) if args.contexts else \
        set(contexts)
    train = [e for e in train if e.share_key in chosen]
    val = load(args.val)[:args.val_examples]
    runs: dict[str, list[dict]] = {"sovllm": [], "trl": []}
    for _ in range(args.repeats):
        for name, run in (("sovllm", sovllm_peer_run), ("trl", trl_peer_run)):
            runs[name].append(run(str(base.path), tokenizer, train, val, args))
            print(json.dumps(runs[name][-1]), file=sys.stderr)
    median = {k: {m: statistics.median(r[m] for r in v) for m in ("loss_tokens_per_s", "val_loss", "seconds")}
              for k, v in runs.items()}
    print(json.dumps({
        "data": args.data, "val": args.val, "train_examples": len(train), "contexts": len(chosen),
        "val_examples": len(val), "sovllm_batch_size_trees": args.batch_size, "trl_batch_size": args.trl_batch_size,
        "learning_rate": args.learning_rate, "max_length": args.max_length, "preset": args.preset,
        "threads": threads, "dtype": "float32", "median": median,
        "speedup_loss_tokens_per_s": round(median["sovllm"]["loss_tokens_per_s"] / median["trl"]["loss_tokens_per_s"], 2),
        "val_loss_difference": round(median["sovllm"]["val_loss"] - median["trl"]["val_loss"], 4),
        "all_runs": runs,
    }, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer", choices=["trl"], help="compare sovllm's training with a peer trainer instead")
    parser.add_argument("--val", default=str(ROOT / "examples" / "acme" / "out" / "curate" / "val.jsonl"))
    parser.add_argument("--val-examples", type=int, default=64)
    parser.add_argument("--contexts", type=int, default=32, help="--peer: train on this many contexts (0 = all)")
    parser.add_argument("--trl-batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--data", default=str(ROOT / "examples" / "acme" / "out" / "curate" / "train.jsonl"))
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=None, help="default 8; --peer: 1 tree (the train stage's)")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--preset", default="standard")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    from sovllm.artifacts import read_jsonl
    from sovllm.models import registry
    from sovllm.models.chat import end_of_turn_id
    from sovllm.models.tokenizer import load_tokenizer
    from sovllm.train.data import audit, encode

    import transformers

    transformers.utils.logging.disable_progress_bar()
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    base = registry.prepare("smollm2-135m-instruct", log=lambda _: None)
    tokenizer = load_tokenizer(base.path)
    eot = end_of_turn_id(tokenizer)
    records = list(read_jsonl(args.data))
    if args.peer:
        args.batch_size = args.batch_size or 1
        peer_main(args, base, tokenizer, eot, threads)
        return
    args.batch_size = args.batch_size or 8
    examples = [encode(r, tokenizer, eot) for r in records]
    examples, _ = audit(examples, tokenizer, max_length=args.max_length, too_long="drop", batch_size=args.batch_size)
    examples = random.Random(args.seed).sample(examples, min(args.examples, len(examples)))
    peak = matmul_peak(threads)
    runs: dict[str, list[dict]] = {"padded": [], "grouped": []}
    for _ in range(args.repeats):
        for batching in ("padded", "grouped"):
            runs[batching].append(one_run(str(base.path), tokenizer, examples, batching, args, peak))
            print(json.dumps(runs[batching][-1]), file=sys.stderr)
    best = {k: max(v, key=lambda r: r["loss_tokens_per_s"]) for k, v in runs.items()}
    print(json.dumps({
        "data": args.data, "examples": len(examples), "batch_size": args.batch_size, "grad_accum": args.grad_accum,
        "max_length": args.max_length, "preset": args.preset, "threads": threads, "dtype": "float32",
        "matmul_peak_gflops": round(peak, 1), "baseline_padded": best["padded"], "sovllm_grouped": best["grouped"],
        "speedup_loss_tokens_per_s": round(best["grouped"]["loss_tokens_per_s"] / best["padded"]["loss_tokens_per_s"], 2),
        "all_runs": runs,
    }, indent=2))


if __name__ == "__main__":
    main()
