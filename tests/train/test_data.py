"""Encoding, position-based labels, and the stop-token audit that rejects the tutorial's bug."""

from __future__ import annotations

import pytest

from sovllm.errors import InputError
from sovllm.models.chat import end_of_turn_id
from sovllm.models.tiny import build_tiny_tokenizer
from sovllm.models.tokenizer import normalise_tokenizer
from sovllm.train.data import IGNORE, Collator, ExampleDataset, audit, encode


def record(i: int, answer: str = "Backups are kept for 35 days.", context_words: int = 5) -> dict:
    return {"id": f"r{i}", "messages": [
        {"role": "system", "content": "Answer from the context."},
        {"role": "user", "content": "Context: " + "backup policy " * context_words * (i + 1) + "\nQuestion: How long?"},
        {"role": "assistant", "content": answer}]}


@pytest.fixture(scope="module")
def tokenizer():
    return normalise_tokenizer(build_tiny_tokenizer())


def test_encode_splits_prompt_and_completion_at_the_assistant_turn(tokenizer):
    eot = end_of_turn_id(tokenizer)
    example = encode(record(0), tokenizer, eot)
    prompt = tokenizer.decode(example.prompt_ids)
    assert prompt.endswith("<|im_start|>assistant\n") and "Answer from the context." in prompt
    assert example.completion_ids[-1] == eot
    assert tokenizer.decode(example.completion_ids[:-1]) == "Backups are kept for 35 days."


def test_labels_are_set_by_position_and_keep_the_end_of_turn(tokenizer):
    eot = end_of_turn_id(tokenizer)
    examples = [encode(record(i), tokenizer, eot) for i in range(3)]
    batch = Collator(tokenizer.pad_token_id)([ExampleDataset(examples)[i] for i in range(3)])
    width = batch["input_ids"].shape[1]
    for row, e in enumerate(examples):
        labels = batch["labels"][row].tolist()
        start, end = len(e.prompt_ids), len(e)
        assert labels[:start] == [IGNORE] * start
        assert labels[start:end] == e.completion_ids and labels[end - 1] == eot
        assert labels[end:] == [IGNORE] * (width - end)
        assert batch["attention_mask"][row].tolist() == [1] * end + [0] * (width - end)


def test_audit_passes_and_reports(tokenizer):
    eot = end_of_turn_id(tokenizer)
    kept, report = audit([encode(record(i), tokenizer, eot) for i in range(5)], tokenizer, max_length=4096,
                         too_long="drop", batch_size=2)
    assert len(kept) == 5 and report.as_dict()["passed"] and report.eot_id == eot != report.pad_id


def buggy_collator(pad_id):
    """The tutorial's recipe: copy input ids to labels, then mask every pad-id position."""
    import torch

    def collate(features):
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.tensor([f["input_ids"] + [pad_id] * (width - len(f["input_ids"])) for f in features])
        labels = ids.clone()
        labels[ids == pad_id] = IGNORE
        return {"input_ids": ids, "labels": labels, "attention_mask": (ids != pad_id).long()}

    return collate


def test_audit_rejects_the_buggy_dataset_pad_eq_eos_masked_by_id():
    raw = build_tiny_tokenizer()  # as shipped: pad = eos = <|im_end|>
    eot = end_of_turn_id(raw)
    assert raw.pad_token_id == eot
    examples = [encode(record(i), raw, eot) for i in range(4)]
    with pytest.raises(InputError, match="stop-token audit failed"):
        audit(examples, raw, max_length=4096, too_long="drop", batch_size=2, collate=buggy_collator(raw.pad_token_id))


def test_audit_checks_the_collated_labels_not_just_the_tokenizer(tokenizer):
    # pad is safe, but this collator masks the end-of-turn id itself: the labels prove it
    eot = end_of_turn_id(tokenizer)
    examples = [encode(record(i), tokenizer, eot) for i in range(4)]
    with pytest.raises(InputError, match=r"end-of-turn token \(id \d+\) at position \d+ is not a label"):
        audit(examples, tokenizer, max_length=4096, too_long="drop", batch_size=2, collate=buggy_collator(eot))


def test_prompt_labels_are_rejected(tokenizer):
    eot = end_of_turn_id(tokenizer)
    examples = [encode(record(i), tokenizer, eot) for i in range(2)]

    def everything(features):
        batch = Collator(tokenizer.pad_token_id)(features)
        batch["labels"] = batch["input_ids"].clone()
        return batch

    with pytest.raises(InputError, match="prompt tokens carry labels"):
        audit(examples, tokenizer, max_length=4096, too_long="drop", batch_size=2, collate=everything)


def test_too_long_examples_are_dropped_or_fail(tokenizer):
    eot = end_of_turn_id(tokenizer)
    examples = [encode(record(i, context_words=40), tokenizer, eot) for i in range(4)]
    limit = sorted(len(e) for e in examples)[1]
    kept, report = audit(examples, tokenizer, max_length=limit, too_long="drop", batch_size=2)
    assert len(kept) == 2 and len(report.dropped_too_long) == 2
    with pytest.raises(InputError, match="2 examples exceed train.max_length"):
        audit(examples, tokenizer, max_length=limit, too_long="fail", batch_size=2)


def test_record_without_answer_is_a_clear_error(tokenizer):
    bad = record(0)
    bad["messages"] = bad["messages"][:2]
    with pytest.raises(InputError, match="record 'r0' must have messages ending with an assistant turn"):
        encode(bad, tokenizer, end_of_turn_id(tokenizer))
