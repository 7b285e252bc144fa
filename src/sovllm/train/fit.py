"""The training loop: transformers' Trainer with a PEFT model, loss only where there are labels.

`LossTrainer.compute_loss` calls the model with `logits_to_keep` = the positions where some row of
the batch has a label (the answer tokens), so the output head runs only there instead of producing
logits for every prompt position and throwing almost all of them away: for 600-token prompts with
40-token answers that skips most of the vocabulary projection (49k × 576 per token for SmolLM2) and
its memory. Going through the model's own forward (not its decoder directly) keeps a
DistributedDataParallel wrapper in the call, so data-parallel training syncs the gradients. The loss is the
token-level mean over the whole optimizer step (transformers passes `num_items_in_batch`), so
gradient accumulation does not change what is averaged.

Batching: `grouped` sorts each epoch's examples by length into micro-batches and shuffles the
batch order (`GroupedSampler`; transformers' own length-grouped sampler only sorts within small
"mega-batches" and left 14 % padding on the example corpus); `padded` is the tutorial's recipe
(shuffled, padded to the longest). Packing unrelated examples is not used; examples that share a
context are trained as one shared-prefix tree (`data.Tree`: the context once, every question and
answer after it at the positions it would have alone, under a mask that hides the other branches),
which gives each example exactly its own loss and gradient.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from sovllm.train.data import (
    IGNORE,
    Collator,
    Example,
    ExampleDataset,
    Tree,
    TreeDataset,
)


@dataclass
class FitResult:
    steps: int
    best_val_loss: float | None
    best_step: int | None
    train_loss: float | None
    loss_tokens: int
    padded_tokens: int
    real_tokens: int
    seconds: float
    stopped_early: bool
    history: list[dict] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.loss_tokens / self.seconds if self.seconds else 0.0

    @property
    def padding_share(self) -> float:
        return 1 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0


class GroupedSampler:
    """Length-grouped batches: every epoch, examples sorted by length (ties broken at random) are cut
    into micro-batches of `batch_size`, and the order of the batches is shuffled. Batches are as
    homogeneous as the data allows; which examples meet changes only among equal lengths."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed, self.epoch = lengths, batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        import random

        rng = random.Random(f"{self.seed}:{self.epoch}")
        keys = [(n, rng.random()) for n in self.lengths]
        order = sorted(range(len(keys)), key=keys.__getitem__)
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        rng.shuffle(batches)
        return iter([i for batch in batches for i in batch])


def selective_loss(model, inputs: dict, num_items: int | None = None, first_weight: float = 1.0, first_tokens: int = 2):
    """(summed-or-mean loss, loss token count): logits only at positions whose next token is a label.

    `first_weight` ≠ 1 multiplies the loss of each completion's first `first_tokens` labels (where an
    answer and the refusal sentence part ways); training uses 1, `benchmarks/refusal.py` compares."""
    import torch
    import torch.nn.functional as F

    # The collator pads on the right, so under the causal mask no real token ever sees a pad token and
    # positions count from 0 either way: no padding mask is needed. Without one, SDPA runs its causal
    # kernel instead of materialising a [batch, 1, L, L] mask (measured: 8.4 -> 7.5 GB at 4 x 1000 tokens).
    # Shared-prefix trees (data.Tree) bring their own positions and a [batch, 1, L, L] mask.
    extra = {"attention_mask": inputs["tree_mask"], "position_ids": inputs["position_ids"]} if "tree_mask" in inputs else {}
    targets = inputs["labels"][:, 1:]
    mask = targets != IGNORE
    # The output head runs only at the columns where some row has a label (`logits_to_keep`), through
    # the model's own forward, so a DistributedDataParallel wrapper sees the call and syncs gradients.
    keep = mask.any(0).nonzero().squeeze(1)
    output = model(input_ids=inputs["input_ids"], **extra, logits_to_keep=keep, use_cache=False)
    mask = mask[:, keep]
    logits, targets = output.logits[mask], targets[:, keep][mask]
    if first_weight == 1.0:
        total = F.cross_entropy(logits.float(), targets, reduction="sum")
    else:
        position = (mask.long().cumsum(1) - 1)[mask]  # index of each label inside its completion
        weight = torch.where(position < first_tokens, first_weight, 1.0)
        total = (F.cross_entropy(logits.float(), targets, reduction="none") * weight).sum()
    count = int(mask.sum())
    divisor = num_items if num_items else max(count, 1)
    if isinstance(divisor, torch.Tensor):
        divisor = divisor.to(total.device)
    return total / divisor, count


def make_trainer(model, tokenizer, train: list[Example] | list[Tree], val: list[Example] | list[Tree], args, *,
                 batching: str, callbacks: list, pad_id: int, first_weight: float = 1.0, batch_sampler=None):
    """A transformers Trainer with sovllm's loss, collator and batching; `train` and `val` hold examples
    or shared-prefix trees (`data.share_prefixes`).

    `first_weight` and `batch_sampler` exist for `benchmarks/refusal.py`, which compares training
    variants on this same Trainer: `first_weight` as in `selective_loss`; `batch_sampler` yields
    each micro-batch as a list of indices into `train` (with `__len__` and `set_epoch`) and
    replaces `batching`."""
    from transformers import Trainer

    counters = {"loss_tokens": 0, "padded": 0, "real": 0}

    class LossTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, count = selective_loss(model, inputs, num_items_in_batch, first_weight=first_weight)
            if num_items_in_batch is not None and self.args.average_tokens_across_devices:
                # num_items_in_batch counts the labels of every process; DDP averages the gradients over
                # the processes, so each process scales its share back up (as transformers' own loss does)
                loss = loss * self.accelerator.num_processes
            if model.training:
                counters["loss_tokens"] += count
                counters["padded"] += inputs["input_ids"].numel()
                counters["real"] += int(inputs["attention_mask"].sum())
            return (loss, None) if return_outputs else loss

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            import torch

            inputs = self._prepare_inputs(inputs)
            with torch.no_grad():
                loss, _ = selective_loss(model, inputs)
            return loss.detach(), None, None

        def _get_train_sampler(self, train_dataset=None):
            if batching != "grouped":
                return super()._get_train_sampler(train_dataset)
            return GroupedSampler([len(u) for u in train], self.args.per_device_train_batch_size, self.args.seed)

        def get_train_dataloader(self):
            if batch_sampler is None:
                return super().get_train_dataloader()
            from torch.utils.data import DataLoader

            return self.accelerator.prepare(DataLoader(self.train_dataset, batch_sampler=batch_sampler,
                                                       collate_fn=self.data_collator))

    args.train_sampling_strategy = "random"
    trainer = LossTrainer(model=model, args=args, train_dataset=_dataset(train),
                          eval_dataset=_dataset(val) if val else None, data_collator=Collator(pad_id),
                          callbacks=callbacks)
    trainer.sovllm_counters = counters
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for quiet in (PrinterCallback, ProgressCallback):  # sovllm shows its own progress and summary
        trainer.remove_callback(quiet)
    return trainer


def _dataset(units: list[Example] | list[Tree]):
    return TreeDataset(units) if units and isinstance(units[0], Tree) else ExampleDataset(units)


def progress_callback(bar):
    """A TrainerCallback advancing a sovllm progress bar per optimizer step (loss in the label)."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                bar.advance(f"loss {logs['loss']:.3f}")
            elif logs and "eval_loss" in logs:
                bar.advance(f"val loss {logs['eval_loss']:.3f}", step=0)

    return Progress()


def training_arguments(out_dir: Path, *, steps: int, batch_size: int, grad_accum: int, learning_rate: float,
                       warmup_ratio: float, weight_decay: float, eval_steps: int, seed: int,
                       gradient_checkpointing: bool, has_val: bool, device: str = "cpu", precision: str = "fp32",
                       processes: int = 1, checkpoints: bool = True):
    """The Trainer's settings for sovllm training: cosine schedule with warmup, a log entry every
    step, val loss (when there is val data) and a checkpoint every `eval_steps`, the best one restored
    at the end. `checkpoints=False` writes none and restores nothing (a benchmark that never resumes).
    `precision` bf16/fp16 trains under autocast (fp16 with loss scaling); with `processes` > 1 (under
    torchrun) the Trainer runs DistributedDataParallel, over gloo on a CPU and NCCL on GPUs."""
    from transformers import TrainingArguments

    evaluate = has_val
    distributed = {"ddp_backend": "gloo" if device == "cpu" else "nccl", "ddp_find_unused_parameters": False} \
        if processes > 1 else {}
    return TrainingArguments(
        output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size, gradient_accumulation_steps=grad_accum,
        learning_rate=learning_rate, lr_scheduler_type="cosine", warmup_steps=math.ceil(warmup_ratio * steps),
        weight_decay=weight_decay, logging_steps=1, eval_strategy="steps" if evaluate else "no",
        eval_steps=eval_steps if evaluate else None, save_strategy="steps" if checkpoints else "no",
        save_steps=eval_steps, save_total_limit=2, load_best_model_at_end=evaluate and checkpoints,
        metric_for_best_model="eval_loss" if evaluate else None,
        greater_is_better=False, prediction_loss_only=True, remove_unused_columns=False, label_names=["labels"],
        report_to="none", seed=seed, data_seed=seed, activation_checkpointing=gradient_checkpointing,
        use_cpu=device == "cpu", bf16=precision == "bf16", fp16=precision == "fp16", dataloader_num_workers=0,
        disable_tqdm=True, save_only_model=False, **distributed,
    )


def run_fit(trainer, *, resume: Path | None = None) -> FitResult:
    """Train (resuming from checkpoint folder `resume`); returns counts and the best val loss."""
    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    seconds = time.perf_counter() - started
    state = trainer.state
    history = [dict(h) for h in state.log_history]
    evals = [h for h in history if "eval_loss" in h]
    best = min(evals, key=lambda h: h["eval_loss"]) if evals else None
    c = trainer.sovllm_counters
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # data parallel: every process counted its own batches
        import torch

        totals = torch.tensor([c["loss_tokens"], c["padded"], c["real"]], dtype=torch.float64)
        dist.all_reduce(totals)
        c = dict(zip(("loss_tokens", "padded", "real"), (int(v) for v in totals.tolist())))
    stopped = state.global_step < trainer.args.max_steps
    return FitResult(steps=state.global_step, best_val_loss=best["eval_loss"] if best else None,
                     best_step=best["step"] if best else None, train_loss=output.training_loss,
                     loss_tokens=c["loss_tokens"], padded_tokens=c["padded"], real_tokens=c["real"],
                     seconds=seconds, stopped_early=stopped, history=history)
