"""MKL vs oneDNN packed linear layers on the bundled model: forward passes and LoRA training steps.

Two copies of SmolLM2-135M in one process, one with plain `nn.Linear` (PyTorch's CPU default,
MKL sgemm), one after `sovllm.models.packed.pack_linears` (oneDNN, weights packed once). They run
the same inputs alternately, so load on the machine hits both alike; the best of `--repeats` is
kept per shape. Forward shapes: prefill of one 512-token prompt, of 4 × 450 tokens, and decode
steps of 8 and 32 rows (logits of the last position only, as the engine asks). Training: forward
and backward of sovllm's loss with the `standard` LoRA preset on micro-batches of 4 real training
examples (`--data`, a curated `train.jsonl`), with the largest relative difference of the LoRA
gradients between the two. Prints JSON.

    .venv/bin/python benchmarks/packed.py [--data examples/acme/out/curate/train.jsonl] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "examples" / "acme" / "out" / "curate" / "train.jsonl")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, default=4, help="training micro-batches of 4")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from sovllm.models import packed, registry
    from sovllm.models.chat import end_of_turn_id
    from sovllm.models.tokenizer import load_tokenizer
    from sovllm.train.data import Collator, encode
    from sovllm.train.fit import selective_loss

    if not packed.available():
        raise SystemExit("oneDNN packed linear layers are not available in this torch build")
    torch.set_num_threads(args.threads)
    base = registry.resolve(registry.DEFAULT_BASE)

    def load(pack: bool):
        model = AutoModelForCausalLM.from_pretrained(str(base.path), dtype=torch.float32).eval()
        model.config.use_cache = False
        if pack:
            packed.pack_linears(model)
        return model

    plain, fast = load(False), load(True)
    result = {"threads": args.threads, "repeats": args.repeats, "forward": [], "train": None}

    def timed(fn) -> float:
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started

    with torch.inference_mode():
        for rows, length in [(1, 512), (4, 450), (32, 1), (8, 1)]:
            ids = torch.randint(100, 40000, (rows, length))
            best = {"mkl": float("inf"), "onednn": float("inf")}
            for model in (plain, fast):
                model(input_ids=ids, logits_to_keep=1)
            for _ in range(args.repeats):
                for tag, model in (("mkl", plain), ("onednn", fast)):
                    best[tag] = min(best[tag], timed(lambda: model(input_ids=ids, logits_to_keep=1)))
            entry = {"shape": [rows, length], "mkl_ms": round(best["mkl"] * 1000, 1),
                     "onednn_ms": round(best["onednn"] * 1000, 1), "speedup": round(best["mkl"] / best["onednn"], 2)}
            result["forward"].append(entry)
            print(json.dumps(entry), flush=True)

    if args.data.is_file():
        tokenizer = load_tokenizer(base.path)
        eot = end_of_turn_id(tokenizer)
        examples = sorted((encode(json.loads(line), tokenizer, eot, str(args.data))
                           for line in args.data.read_text(encoding="utf-8").splitlines() if line.strip()), key=len)
        collate = Collator(tokenizer.pad_token_id)
        spread = max(1, (len(examples) - 4) // args.batches)
        batches = [collate([{"input_ids": e.input_ids, "prompt_len": len(e.prompt_ids)} for e in examples[i:i + 4]])
                   for i in range(0, len(examples) - 3, spread)][:args.batches]
        lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0)
        models = {}
        for tag, model in (("mkl", plain), ("onednn", fast)):
            torch.manual_seed(0)
            models[tag] = get_peft_model(model, lora).train()
        seconds = {"mkl": 0.0, "onednn": 0.0}
        worst = 0.0
        for batch in batches:
            grads = {}
            for tag, model in models.items():
                def step():
                    loss, _ = selective_loss(model, batch)
                    loss.backward()
                seconds[tag] += timed(step)
                grads[tag] = [p.grad.clone() for p in model.parameters() if p.requires_grad]
                model.zero_grad()
            worst = max(worst, max(float((a - b).abs().max() / (a.abs().max() + 1e-12))
                                   for a, b in zip(grads["mkl"], grads["onednn"])))
        result["train"] = {"micro_batches": len(batches), "shapes": [list(b["input_ids"].shape) for b in batches],
                           "mkl_s": round(seconds["mkl"], 2), "onednn_s": round(seconds["onednn"], 2),
                           "speedup": round(seconds["mkl"] / seconds["onednn"], 2),
                           "max_relative_grad_difference": float(f"{worst:.2e}")}
    else:
        result["train"] = f"skipped: no {args.data} (run `sovllm curate` first or pass --data)"
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
