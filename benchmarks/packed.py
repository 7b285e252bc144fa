"""MKL vs oneDNN packed linear layers on the bundled model: forward passes and LoRA training steps.

Two copies of SmolLM2-135M in one process, one with plain `nn.Linear` (PyTorch's CPU default,
MKL sgemm), one with every linear layer turned into `PackedLinear` below (oneDNN's
`_linear_pointwise` on a weight reordered once; for frozen LoRA base layers the backward pass uses a
packed transposed copy). They run
the same inputs alternately, so load on the machine hits both alike; the best of `--repeats` is
kept per shape. Forward shapes: prefill of one 512-token prompt, of 4 × 450 tokens, and decode
steps of 8 and 32 rows (logits of the last position only, as the engine asks). Training: forward
and backward of sovllm's loss with the `standard` LoRA preset on micro-batches of 2 (`--micro-batch`) real
training examples (`--data`, a curated `train.jsonl`), with the largest relative difference of the LoRA
gradients between the two. Prints JSON.

Measured and rejected for the product (docs/serve.md, "Measured and rejected"): these isolated
passes run faster on oneDNN here, but whole stages did not: `sovllm eval` took 588 s with the
packed layers and 552 s without, back to back on the same project (answers 387 vs 329 s, judge 189
vs 204 s), and the packed copies raised the peak memory of `sovllm run` from 5.1 to 6.7 GB.

    .venv/bin/python benchmarks/packed.py [--data examples/acme/out/curate/train.jsonl] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int):
    rows = x.reshape(-1, x.shape[-1])
    if not rows.is_contiguous():
        rows = rows.contiguous()
    y = torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "")
    return y.reshape(*x.shape[:-1], out_features)


class _FrozenPackedLinear(torch.autograd.Function):
    """y = x Wᵀ + b with a frozen W (LoRA's base layers): forward packed, backward only dx = dy W."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return _packed_linear(x, layer.packed_weight(), layer.bias, layer.out_features)

    @staticmethod
    def backward(ctx, grad):
        layer = ctx.layer
        return _packed_linear(grad, layer.packed_weight(transposed=True), None, layer.in_features), None


class PackedLinear(torch.nn.Linear):
    """An `nn.Linear` whose forward runs oneDNN on a once-packed weight, unless the weight itself trains."""

    _packed: dict | None = None

    def packed_weight(self, transposed: bool = False) -> torch.Tensor:
        w = self.weight
        stamp = (w._version, w.data_ptr())
        if self._packed is None or self._packed["stamp"] != stamp:
            self._packed = {"stamp": stamp}
        if transposed not in self._packed:
            with torch.no_grad():
                self._packed[transposed] = _pack(w.t().contiguous() if transposed else w)
        return self._packed[transposed]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.dtype != w.dtype or x.device.type != "cpu" or x.numel() == 0:
            return F.linear(x, w, self.bias)
        if not torch.is_grad_enabled() or not (x.requires_grad or w.requires_grad):
            return _packed_linear(x, self.packed_weight(), self.bias, self.out_features)
        if w.requires_grad or (self.bias is not None and self.bias.requires_grad):
            return F.linear(x, w, self.bias)
        return _FrozenPackedLinear.apply(x, self)


def pack_linears(model) -> int:
    """Make every fp32 CPU nn.Linear of `model` a PackedLinear in place; returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and module.weight.dtype == torch.float32:
            module.__class__ = PackedLinear
            count += 1
    return count




def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "examples" / "acme" / "out" / "curate" / "train.jsonl")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, default=4, help="training micro-batches")
    parser.add_argument("--micro-batch", type=int, default=2, help="examples per micro-batch (train.batch_size)")
    parser.add_argument("--train-repeats", type=int, default=2, help="passes over the training micro-batches")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from sovllm.models import registry
    from sovllm.models.chat import end_of_turn_id
    from sovllm.models.tokenizer import load_tokenizer
    from sovllm.train.data import Collator, encode
    from sovllm.train.fit import selective_loss

    if not torch.backends.mkldnn.is_available():
        raise SystemExit("this torch build has no oneDNN")
    torch.set_num_threads(args.threads)
    base = registry.resolve(registry.DEFAULT_BASE)

    def load(pack: bool):
        model = AutoModelForCausalLM.from_pretrained(str(base.path), dtype=torch.float32).eval()
        model.config.use_cache = False
        if pack:
            pack_linears(model)
        return model

    plain, fast = load(False), load(True)
    result = {"threads": args.threads, "repeats": args.repeats, "forward": [], "train": None}

    def order(r: int, first, second):
        return (first, second) if r % 2 == 0 else (second, first)  # ABBA: neither side always goes first

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
            for r in range(args.repeats):
                for tag, model in order(r, ("mkl", plain), ("onednn", fast)):
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
        size = args.micro_batch
        spread = max(1, (len(examples) - size) // args.batches)
        batches = [collate([{"input_ids": e.input_ids, "prompt_len": len(e.prompt_ids)} for e in examples[i:i + size]])
                   for i in range(0, len(examples) - size + 1, spread)][:args.batches]
        lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0)
        models = {}
        for tag, model in (("mkl", plain), ("onednn", fast)):
            torch.manual_seed(0)
            models[tag] = get_peft_model(model, lora).train()
        seconds = {"mkl": 0.0, "onednn": 0.0}
        worst = 0.0
        for r, batch in enumerate(batches * args.train_repeats):
            grads = {}
            for tag, model in order(r, *models.items()):
                def step():
                    loss, _ = selective_loss(model, batch)
                    loss.backward()
                seconds[tag] += timed(step)
                grads[tag] = [p.grad.clone() for p in model.parameters() if p.requires_grad]
                model.zero_grad()
            worst = max(worst, max(float((a - b).abs().max() / (a.abs().max() + 1e-12))
                                   for a, b in zip(grads["mkl"], grads["onednn"])))
        result["train"] = {"micro_batches": len(batches) * args.train_repeats, "shapes": [list(b["input_ids"].shape) for b in batches],
                           "mkl_s": round(seconds["mkl"], 2), "onednn_s": round(seconds["onednn"], 2),
                           "speedup": round(seconds["mkl"] / seconds["onednn"], 2),
                           "max_relative_grad_difference": float(f"{worst:.2e}")}
    else:
        result["train"] = f"skipped: no {args.data} (run `sovllm curate` first or pass --data)"
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
