"""The stop check after training: do answers end with the end-of-turn token, for base and adapter?

On up to `limit` val prompts, greedy generation with `max_new_tokens` = 2 × the 95th percentile of
the reference completions' lengths (answer + end-of-turn). An answer *stops* when the model emits
the end-of-turn token within that budget. The adapter must reach `min_rate` and must not stop less
often than the base model (measured with the adapter switched off, same prompts, same budget).

The base's rate depends only on the base weights, the sampled prompts and the budget, and greedy
decoding repeats it exactly; it is kept in a small file next to the adapter, so retraining on the
same val prompts (new documents that hash into train, a changed learning rate) measures only the
adapter: on two cores that halves the check.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from sovllm.stats import percentile
from sovllm.train.data import Example


@dataclass
class StopCheck:
    prompts: int
    max_new_tokens: int
    base_rate: float
    adapter_rate: float
    min_rate: float

    @property
    def passed(self) -> bool:
        return self.adapter_rate >= self.min_rate and self.adapter_rate >= self.base_rate

    def as_dict(self) -> dict:
        return {"prompts": self.prompts, "max_new_tokens": self.max_new_tokens, "base_rate": round(self.base_rate, 4),
                "adapter_rate": round(self.adapter_rate, 4), "min_rate": self.min_rate, "passed": self.passed}


def greedy_completions(model, examples: list[Example], *, eot_id: int, pad_id: int, max_new_tokens: int,
                       batch_size: int = 8) -> list[list[int]]:
    """Greedy completion ids (prompt excluded) per example, in input order. Batches are cut from the
    examples sorted by prompt length, so little of each batch is left padding."""
    import torch

    model.eval()
    out: list[list[int]] = [[] for _ in examples]
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt_ids))
    for b in range(0, len(order), batch_size):
        batch = order[b:b + batch_size]
        width = max(len(examples[i].prompt_ids) for i in batch)
        ids = torch.tensor([[pad_id] * (width - len(examples[i].prompt_ids)) + examples[i].prompt_ids for i in batch])
        mask = torch.tensor([[0] * (width - len(examples[i].prompt_ids)) + [1] * len(examples[i].prompt_ids)
                             for i in batch])
        with torch.inference_mode():
            rows = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                                  max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eot_id,
                                  pad_token_id=pad_id)
        for i, row in zip(batch, rows):
            out[i] = row[width:].tolist()
    return out


def stop_rate(model, examples: list[Example], *, eot_id: int, pad_id: int, max_new_tokens: int,
              batch_size: int = 8) -> float:
    """Share of examples whose greedy completion contains the end-of-turn token."""
    completions = greedy_completions(model, examples, eot_id=eot_id, pad_id=pad_id, max_new_tokens=max_new_tokens,
                                     batch_size=batch_size)
    return sum(eot_id in c for c in completions) / len(examples) if examples else 0.0


def _base_key(base_id: str, sample: list[Example], *, budget: int, eot_id: int, pad_id: int) -> str:
    text = json.dumps([base_id, budget, eot_id, pad_id, [e.prompt_ids for e in sample]])
    return hashlib.sha256(text.encode()).hexdigest()


def _cached_base_rate(cache: Path | None, key: str) -> float | None:
    try:
        stored = json.loads(cache.read_text(encoding="utf-8")) if cache else {}
    except (OSError, ValueError):  # missing or unreadable: measure again
        return None
    return stored.get("base_rate") if isinstance(stored, dict) and stored.get("key") == key else None


def check_stopping(model, val: list[Example], *, eot_id: int, pad_id: int, min_rate: float, limit: int,
                   base_id: str | None = None, cache: Path | None = None) -> StopCheck:
    """Stop rates of the base (adapter disabled) and the adapter on the first `limit` val examples.
    With `base_id` and `cache` (a JSON file), the base's rate is reused while weights, prompts and budget
    are the same."""
    from sovllm.artifacts import write_atomic

    sample = sorted(val, key=lambda e: e.id)[:limit]
    budget = max(4, math.ceil(2 * percentile([len(e.completion_ids) for e in val], 0.95)))
    key = _base_key(base_id, sample, budget=budget, eot_id=eot_id, pad_id=pad_id) if base_id and cache else ""
    base = _cached_base_rate(cache, key) if key else None
    if base is None:
        with model.disable_adapter():
            base = stop_rate(model, sample, eot_id=eot_id, pad_id=pad_id, max_new_tokens=budget)
        if key:
            write_atomic(cache, json.dumps({"key": key, "base_id": base_id, "prompts": len(sample),
                                            "max_new_tokens": budget, "base_rate": base}) + "\n")
    adapter = stop_rate(model, sample, eot_id=eot_id, pad_id=pad_id, max_new_tokens=budget)
    return StopCheck(len(sample), budget, base, adapter, min_rate)
