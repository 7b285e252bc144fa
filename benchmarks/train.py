"""Training throughput: sovllm's length-grouped batching vs the tutorial's padded batching.

Both runs train the same LoRA preset on the same examples (one epoch each, same batch size,
accumulation, max length, dtype fp32, threads, seed, activation checkpointing off) on the bundled
SmolLM2-135M, in one process, with sovllm's loss (logits only at label positions). They differ only
in batching: `grouped` (transformers' length-grouped sampler) vs `padded` (shuffled, padded to the
longest in the batch, as the tutorial did). Reported per run: loss-bearing tokens/s, the padding
share, and MFU against the fp32 matmul peak measured here. Runs alternate (padded, grouped, …) and
the best of `--repeats` is kept for each. Prints JSON.

    .venv/bin/python benchmarks/train.py --data examples/acme/out/curate/train.jsonl [--examples 64]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT / "examples" / "acme" / "out" / "curate" / "train.jsonl"))
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
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
