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
from sovllm.models.prompt import last_user_turn, prompt_before_question

IGNORE = -100


@dataclass
class Example:
    id: str
    prompt_ids: list[int]
    completion_ids: list[int]
    share_key: str | None = None  # the prompt before the question: examples with equal keys can share it

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
    question = (record.get("meta") or {}).get("question")
    share_key = prompt_before_question(prompt, last_user_turn(prompt_messages), question)
    return Example(str(record.get("id")), prompt_ids, completion_ids, share_key)


class Collator:
    """Right-pads a batch; labels by position (completion positions only), attention mask 0 on padding.

    A batch of shared-prefix trees (`Tree.feature`) also gets `position_ids` and `tree_mask`, the
    [batch, 1, L, L] boolean attention mask: causal, and a branch sees only the prefix and itself."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict]) -> dict:
        import torch

        if any("branch" in f for f in features):
            return self._trees(features)
        width = max(len(f["input_ids"]) for f in features)
        ids, labels, mask = [], [], []
        for f in features:
            n, start = len(f["input_ids"]), f["prompt_len"]
            pad = width - n
            ids.append(f["input_ids"] + [self.pad_id] * pad)
            labels.append([IGNORE] * start + f["input_ids"][start:] + [IGNORE] * pad)
            mask.append([1] * n + [0] * pad)
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}

    def _trees(self, features: list[dict]) -> dict:
        import torch

        features = [f if "branch" in f else Tree.single(f).feature() for f in features]
        width = max(len(f["input_ids"]) for f in features)
        ids, labels, mask, positions, branch = [], [], [], [], []
        for f in features:
            pad = width - len(f["input_ids"])
            ids.append(f["input_ids"] + [self.pad_id] * pad)
            labels.append(f["labels"] + [IGNORE] * pad)
            mask.append([1] * len(f["input_ids"]) + [0] * pad)
            positions.append(f["position_ids"] + [0] * pad)
            branch.append(f["branch"] + [PAD_BRANCH] * pad)
        b = torch.tensor(branch)
        # key k is visible from query q when k <= q and k is in the prefix or in q's own branch; padding
        # sees padding (and the prefix), never the other way round, so no row of the mask is empty
        visible = (b[:, :, None] == b[:, None, :]) | (b[:, None, :] == PREFIX_BRANCH)
        visible &= torch.ones(width, width, dtype=torch.bool).tril()
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask),
                "position_ids": torch.tensor(positions), "tree_mask": visible[:, None]}


PREFIX_BRANCH, PAD_BRANCH = -1, -2


@dataclass
class Tree:
    """Examples whose prompts begin with the same tokens (one context, several questions), laid out
    as one sequence: the shared prefix once, then each example's rest, every rest positioned right
    after the prefix and attending only to the prefix and itself. Each example's loss and gradient
    are exactly those of the example alone; the prefix is computed once instead of once per example."""

    ids: list[str]
    prefix: list[int]
    branches: list[list[int]]   # each example's tokens after the prefix (rest of the prompt + completion)
    starts: list[int]           # where in its branch each completion begins

    def __len__(self) -> int:
        return len(self.prefix) + sum(len(b) for b in self.branches)

    @property
    def answer_tokens(self) -> int:
        """Completion tokens of all its examples (the tokens that carry a label)."""
        return sum(len(b) - start for b, start in zip(self.branches, self.starts))

    @classmethod
    def single(cls, feature: dict) -> "Tree":
        start = feature["prompt_len"]
        return cls([""], [], [feature["input_ids"]], [start])

    def feature(self) -> dict:
        ids, labels = list(self.prefix), [IGNORE] * len(self.prefix)
        positions, branch = list(range(len(self.prefix))), [PREFIX_BRANCH] * len(self.prefix)
        for i, (rest, start) in enumerate(zip(self.branches, self.starts)):
            ids += rest
            labels += [IGNORE] * start + rest[start:]
            positions += range(len(self.prefix), len(self.prefix) + len(rest))
            branch += [i] * len(rest)
        return {"input_ids": ids, "labels": labels, "position_ids": positions, "branch": branch}


def _common_prefix(sequences: list[list[int]]) -> int:
    n = min(len(s) for s in sequences)
    first = sequences[0]
    for i in range(n):
        if any(s[i] != first[i] for s in sequences[1:]):
            return i
    return n


def share_prefixes(examples: list[Example], *, max_tokens: int) -> list[Tree]:
    """Examples grouped into trees by `share_key` (in first-seen order), each tree at most
    `max_tokens` long; an example without a key, or alone with its key, is a tree of one.

    The shared prefix is the examples' longest common run of prompt tokens, less one, so that every
    branch keeps a prompt token whose output predicts the first answer token (the labels are shifted
    by one position, and a branch's first token must not be predicted across branches)."""
    groups: dict[object, list[Example]] = {}
    for i, e in enumerate(examples):
        groups.setdefault(e.share_key if e.share_key is not None else ("alone", i), []).append(e)
    trees: list[Tree] = []
    for members in groups.values():
        pending: list[Example] = []
        for e in members:
            if pending and len(_tree(pending + [e])) > max_tokens:
                trees.append(_tree(pending))
                pending = []
            pending.append(e)
        if pending:
            trees.append(_tree(pending))
    return trees


def _tree(members: list[Example]) -> Tree:
    shared = 0 if len(members) == 1 else _common_prefix([e.prompt_ids for e in members])
    shared = max(0, min(shared, min(len(e.prompt_ids) for e in members) - 1))
    return Tree([e.id for e in members], members[0].input_ids[:shared], [e.input_ids[shared:] for e in members],
                [len(e.prompt_ids) - shared for e in members])


class TreeDataset:
    """Shared-prefix trees as the dicts the collator and the length-grouped sampler read."""

    def __init__(self, trees: list[Tree]):
        self.trees = trees
        self.features = [t.feature() for t in trees]

    def __len__(self) -> int:
        return len(self.trees)

    def __getitem__(self, i: int) -> dict:
        return self.features[i]


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
