"""Turning chat records into training examples, batching them, and auditing that every answer stops.

An example is prompt + completion token ids. The prompt is the system and user turns rendered with
the base model's own template up to the assistant header; the completion is the answer followed by
the template's end-of-turn token (`<|im_end|>`). Labels are the completion ids at completion
*positions* and -100 everywhere else — never decided by comparing token ids, because on models
whose pad equals eos that comparison also erases the end of every answer.

`audit` proves before training, on the batches the collator really produces, that each example's
end-of-turn token is a label, that pad differs from it, and that no answer is cut by `max_length`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from sovllm.errors import InputError
from sovllm.models.chat import end_of_turn_id, render

IGNORE = -100


@dataclass
class Example:
    id: str
    prompt_ids: list[int]
    completion_ids: list[int]

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.completion_ids

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


def split_record(record: dict, where: str) -> tuple[str | None, list[dict], str]:
    """(system, messages up to the answer, answer) of a train/val record; InputError names the record."""
    messages = record.get("messages")
    if not isinstance(messages, list) or len(messages) < 2 or messages[-1].get("role") != "assistant":
        raise InputError(f"{where}: record {record.get('id')!r} must have messages ending with an assistant turn",
                         hint="train.jsonl comes from 'sovllm curate' (system, user, assistant)")
    system = messages[0]["content"] if messages[0].get("role") == "system" else None
    rest = [m for m in messages[:-1] if m.get("role") != "system"]
    answer = messages[-1].get("content") or ""
    if not answer.strip():
        raise InputError(f"{where}: record {record.get('id')!r} has an empty answer")
    return system, rest, answer


def encode(record: dict, tokenizer, eot_id: int, where: str = "train.jsonl") -> Example:
    """Prompt and completion ids of one record (completion = answer + end-of-turn token)."""
    system, prompt_messages, answer = split_record(record, where)
    prompt = render(tokenizer, prompt_messages, system, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [eot_id]
    return Example(str(record.get("id")), prompt_ids, completion_ids)


class Collator:
    """Right-pads a batch; labels by position (completion positions only), attention mask 0 on padding."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict]) -> dict:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        ids, labels, mask = [], [], []
        for f in features:
            n, start = len(f["input_ids"]), f["prompt_len"]
            pad = width - n
            ids.append(f["input_ids"] + [self.pad_id] * pad)
            labels.append([IGNORE] * start + f["input_ids"][start:] + [IGNORE] * pad)
            mask.append([1] * n + [0] * pad)
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}


class ExampleDataset:
    """A list of examples as the dicts the collator and the length-grouped sampler read."""

    def __init__(self, examples: list[Example]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        e = self.examples[i]
        return {"input_ids": e.input_ids, "prompt_len": len(e.prompt_ids)}


@dataclass
class AuditReport:
    examples: int = 0
    kept: int = 0
    dropped_too_long: list[str] = field(default_factory=list)
    eot_id: int | None = None
    pad_id: int | None = None
    max_length: int = 0
    failures: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"examples": self.examples, "kept": self.kept, "dropped_too_long": len(self.dropped_too_long),
                "dropped_ids": self.dropped_too_long[:20], "eot_id": self.eot_id, "pad_id": self.pad_id,
                "max_length": self.max_length, "passed": not self.failures, "failures": self.failures[:20]}


def audit(examples: list[Example], tokenizer, *, max_length: int, too_long: str, batch_size: int,
          collate: Callable[[list[dict]], dict] | None = None, eot_id: int | None = None
          ) -> tuple[list[Example], AuditReport]:
    """Examples that are safe to train on, and the audit report; InputError when the audit fails.

    The check runs on the collator's real output in batches of `batch_size`, so a collator that
    masks by token id (and with pad = eos erases the end of every answer) is caught here.
    """
    eot = end_of_turn_id(tokenizer) if eot_id is None else eot_id
    report = AuditReport(examples=len(examples), eot_id=eot, pad_id=tokenizer.pad_token_id, max_length=max_length)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == eot:
        report.failures.append(f"pad token id {tokenizer.pad_token_id} equals the end-of-turn token id {eot}: "
                               "padding would hide the end of every answer")
    kept = []
    for e in examples:
        if len(e) > max_length:
            report.dropped_too_long.append(e.id)
        elif not e.completion_ids or e.completion_ids[-1] != eot:
            report.failures.append(f"{e.id}: the completion does not end with the end-of-turn token")
        else:
            kept.append(e)
    if report.dropped_too_long and too_long == "fail":
        report.failures.append(f"{len(report.dropped_too_long)} examples exceed train.max_length={max_length} "
                               f"(first: {report.dropped_too_long[0]}); raise max_length or set train.too_long: drop")
    collate = collate or Collator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    dataset = ExampleDataset(kept)
    # mixed lengths in every audited batch, so padding is present where it can do harm
    order = sorted(range(len(kept)), key=lambda i: len(kept[i]))
    order = order[::2] + order[1::2][::-1]
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        batch = collate([dataset[i] for i in idx])
        for row, i in enumerate(idx):
            e = kept[i]
            labels = batch["labels"][row].tolist()
            end = len(e) - 1
            if labels[end] != eot:
                report.failures.append(f"{e.id}: the end-of-turn token (id {eot}) at position {end} is not a label "
                                       f"(label there: {labels[end]}); the model would never learn to stop")
            elif any(lab != IGNORE for lab in labels[:len(e.prompt_ids)]):
                report.failures.append(f"{e.id}: prompt tokens carry labels (loss must be on the completion only)")
    report.kept = len(kept)
    if report.failures:
        more = f" (and {len(report.failures) - 1} more problems)" if len(report.failures) > 1 else ""
        raise InputError(f"stop-token audit failed: {report.failures[0]}{more}",
                         hint="fix the tokenizer's pad token or the collator; see docs/train.md")
    return kept, report
