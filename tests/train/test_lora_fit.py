"""Presets and refused options; the selective loss; a tiny-model fit that changes only the adapter."""

from __future__ import annotations

import pytest

from sovllm.config import TrainSection
from sovllm.errors import ConfigError
from sovllm.train.lora import check_options, lora_config, resolved


@pytest.mark.parametrize("preset, r, targets", [
    ("minimal", 4, ["q_proj", "v_proj"]),
    ("standard", 8, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    ("all-linear", 16, "all-linear"),
    ("high-capacity", 32, "all-linear"),
])
def test_presets(preset, r, targets):
    settings = resolved(TrainSection(preset=preset))
    assert (settings["r"], settings["target_modules"], settings["lora_alpha"]) == (r, targets, 2.0 * r)


def test_explicit_values_override_the_preset():
    config = lora_config(TrainSection(preset="minimal", r=12, alpha=6, dropout=0.1, target_modules=["o_proj"],
                                      use_rslora=True))
    assert (config.r, config.lora_alpha, config.lora_dropout, set(config.target_modules), config.use_rslora) == \
        (12, 6, 0.1, {"o_proj"}, True)


@pytest.mark.parametrize("option", [{"use_dora": True}, {"modules_to_save": ["lm_head"]}, {"bias": "all"}])
def test_options_vllm_cannot_serve_are_refused_unless_allowed(option):
    with pytest.raises(ConfigError, match="vLLM cannot serve this adapter"):
        check_options(TrainSection(**option))
    check_options(TrainSection(**option), allow_non_vllm=True)
    check_options(TrainSection(**option, allow_non_vllm_adapter=True))


def _tiny_peft(tiny_model_dir, preset="standard"):
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    return get_peft_model(model, lora_config(TrainSection(preset=preset)))


def _batch(tiny_model_dir):
    from sovllm.models.chat import end_of_turn_id
    from sovllm.models.tokenizer import load_tokenizer
    from sovllm.train.data import Collator, ExampleDataset, encode
    from tests.train.test_data import record

    tok = load_tokenizer(tiny_model_dir)
    examples = [encode(record(i, answer=f"Answer number {i} is {i * 7}."), tok, end_of_turn_id(tok)) for i in range(4)]
    data = ExampleDataset(examples)
    return Collator(tok.pad_token_id)([data[i] for i in range(4)])


def test_selective_loss_equals_the_full_logits_loss(tiny_model_dir):
    import torch

    from sovllm.train.fit import selective_loss

    model = _tiny_peft(tiny_model_dir)
    batch = _batch(tiny_model_dir)
    with torch.no_grad():
        mine, count = selective_loss(model, batch)
        reference = model(**batch).loss  # transformers: all logits, shifted labels, mean over label tokens
    assert count == int((batch["labels"][:, 1:] != -100).sum())
    assert abs(mine.item() - reference.item()) < 1e-5


def test_selective_loss_weights_the_first_completion_tokens(tiny_model_dir):
    import torch
    import torch.nn.functional as F

    from sovllm.train.fit import selective_loss

    model = _tiny_peft(tiny_model_dir)
    batch = _batch(tiny_model_dir)
    with torch.no_grad():
        weighted, count = selective_loss(model, batch, first_weight=5.0, first_tokens=2)
        logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    expected, n = 0.0, 0
    for row in range(targets.shape[0]):
        for k, pos in enumerate((targets[row] != -100).nonzero().flatten().tolist()):
            ce = F.cross_entropy(logits[row, pos][None].float(), targets[row, pos][None]).item()
            expected += ce * (5.0 if k < 2 else 1.0)
            n += 1
    assert count == n
    assert abs(weighted.item() - expected / n) < 1e-4


@pytest.mark.parametrize("preset", ["minimal", "all-linear"])
def test_fit_changes_adapter_weights_only(tiny_model_dir, tmp_path, preset):
    import torch

    from sovllm.train.fit import make_trainer, run_fit, training_arguments
    from sovllm.train.data import encode
    from sovllm.models.chat import end_of_turn_id
    from sovllm.models.tokenizer import load_tokenizer
    from tests.train.test_data import record

    tok = load_tokenizer(tiny_model_dir)
    examples = [encode(record(i % 5, answer=f"It is {i}."), tok, end_of_turn_id(tok)) for i in range(12)]
    model = _tiny_peft(tiny_model_dir, preset)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    args = training_arguments(tmp_path, steps=3, batch_size=4, grad_accum=1, learning_rate=1e-2, warmup_ratio=0,
                              weight_decay=0, eval_steps=3, seed=0, gradient_checkpointing=False, has_val=False)
    fit = run_fit(make_trainer(model, tok, examples, [], args, batching="grouped", callbacks=[],
                               pad_id=tok.pad_token_id))
    assert fit.steps == 3 and fit.loss_tokens > 0
    after = dict(model.named_parameters())
    lora = [k for k in before if "lora_" in k]
    assert lora and all(after[k].requires_grad for k in lora)
    assert any(not torch.equal(before[k], after[k]) for k in lora if "lora_B" in k)
    frozen = [k for k in before if "lora_" not in k]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)



def _examples(tiny_model_dir, n: int):
    from sovllm.models.chat import end_of_turn_id
    from sovllm.models.tokenizer import load_tokenizer
    from sovllm.train.data import encode
    from tests.train.test_data import record

    tok = load_tokenizer(tiny_model_dir)
    return tok, [encode(record(i, answer=f"It is {i * 7}, says part {i}."), tok, end_of_turn_id(tok)) for i in range(n)]


def test_a_batch_sampler_chooses_the_micro_batches_and_no_checkpoint_is_written(tiny_model_dir, tmp_path):
    """What `benchmarks/refusal.py --paired` relies on to train its own micro-batches on this Trainer."""
    from sovllm.train.fit import make_trainer, run_fit, training_arguments

    tok, examples = _examples(tiny_model_dir, 5)

    class Fixed:
        def __init__(self):
            self.batches, self.epochs = [[0, 1, 2], [3], [4]], []

        def set_epoch(self, epoch):
            self.epochs.append(epoch)

        def __len__(self):
            return len(self.batches)

        def __iter__(self):
            return iter(self.batches)

    sampler = Fixed()
    args = training_arguments(tmp_path, steps=6, batch_size=2, grad_accum=1, learning_rate=1e-2, warmup_ratio=0,
                              weight_decay=0, eval_steps=3, seed=0, gradient_checkpointing=False, has_val=False,
                              checkpoints=False)
    fit = run_fit(make_trainer(_tiny_peft(tiny_model_dir), tok, examples, [], args, batching="grouped", callbacks=[],
                               pad_id=tok.pad_token_id, batch_sampler=sampler))
    lengths = [len(e.input_ids) for e in examples]
    assert fit.steps == 6 and sorted(set(sampler.epochs)) == [0, 1]  # told each epoch (transformers tells it twice)
    assert fit.loss_tokens == 2 * sum(len(e.completion_ids) for e in examples)
    assert fit.padded_tokens == 2 * (3 * max(lengths[:3]) + lengths[3] + lengths[4])  # exactly those batches
    assert not list(tmp_path.glob("checkpoint-*"))


def test_the_trainer_applies_the_first_token_weight(tiny_model_dir, tmp_path):
    import torch

    from sovllm.train.data import Collator, ExampleDataset
    from sovllm.train.fit import make_trainer, run_fit, selective_loss, training_arguments

    tok, examples = _examples(tiny_model_dir, 4)
    batch = Collator(tok.pad_token_id)([ExampleDataset(examples)[i] for i in range(4)])
    first_losses, direct = [], []
    for weight in (1.0, 5.0):
        model = _tiny_peft(tiny_model_dir)
        with torch.no_grad():
            direct.append(selective_loss(model, batch, first_weight=weight)[0].item())
        args = training_arguments(tmp_path / str(weight), steps=1, batch_size=4, grad_accum=1, learning_rate=1e-2,
                                  warmup_ratio=0, weight_decay=0, eval_steps=1, seed=0, gradient_checkpointing=False,
                                  has_val=False, checkpoints=False)
        fit = run_fit(make_trainer(model, tok, examples, [], args, batching="grouped", callbacks=[],
                                   pad_id=tok.pad_token_id, first_weight=weight))
        first_losses.append(next(h["loss"] for h in fit.history if "loss" in h))
    assert direct[1] > direct[0]
    assert first_losses[1] / first_losses[0] == pytest.approx(direct[1] / direct[0], rel=1e-3)

def test_grouped_sampler_covers_every_example_once_with_homogeneous_batches():
    import random

    from sovllm.train.fit import GroupedSampler

    lengths = [random.Random(i).randint(50, 1000) for i in range(101)]
    sampler = GroupedSampler(lengths, 4, seed=0)
    first = list(sampler)
    assert sorted(first) == list(range(101))
    batches = [first[i:i + 4] for i in range(0, 101, 4)]
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    assert 1 - sum(lengths) / padded < 0.03  # random batches of 4 pad ~20 %
    sampler.set_epoch(1)
    assert list(sampler) != first  # a new batch order every epoch


def _shared_context_records(n_contexts=2, questions=3):
    out = []
    for c in range(n_contexts):
        context = f"Context:\n\n[1] Policy {c}\n" + " ".join(f"rule{c} item{w} applies." for w in range(12 + 5 * c))
        for q in range(questions):
            question = f"What does rule {q} of policy {c} say{'?' * (q + 1)}"
            out.append({"id": f"c{c}q{q}", "meta": {"question": question}, "messages": [
                {"role": "system", "content": "Answer from the context."},
                {"role": "user", "content": f"{context}\n\nQuestion: {question}"},
                {"role": "assistant", "content": f"Rule {q} says item {q * 3} applies, policy {c}."}]})
    return out


def test_shared_prefix_trees_give_each_example_its_own_loss_and_gradient(tiny_model_dir):
    """A tree (context once, each question and answer after it, positioned and masked as if alone)
    must train exactly like the separate examples: same loss, same gradients, fewer tokens."""
    import torch

    from sovllm.models.chat import end_of_turn_id
    from sovllm.models.tokenizer import load_tokenizer
    from sovllm.train.data import Collator, ExampleDataset, TreeDataset, encode, share_prefixes
    from sovllm.train.fit import selective_loss

    tok = load_tokenizer(tiny_model_dir)
    examples = [encode(r, tok, end_of_turn_id(tok)) for r in _shared_context_records()]
    assert len({e.share_key for e in examples}) == 2
    trees = share_prefixes(examples, max_tokens=4096)
    assert [len(t.branches) for t in trees] == [3, 3]
    assert all(len(t.prefix) > 20 for t in trees) and sum(map(len, trees)) < sum(map(len, examples))
    assert sum(t.answer_tokens for t in trees) == sum(len(e.completion_ids) for e in examples)
    collate = Collator(tok.pad_token_id)
    model = _tiny_peft(tiny_model_dir)
    # non-zero LoRA B so that the adapter's gradients depend on the attention pattern too
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)

    def loss_and_grads(batch, num_items):
        model.zero_grad()
        loss, count = selective_loss(model, batch, num_items)
        loss.backward()
        return loss.item(), count, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    items = sum(len(e.completion_ids) for e in examples)
    plain = ExampleDataset(examples)
    ref_loss, ref_count, ref_grads = loss_and_grads(collate([plain[i] for i in range(len(examples))]), items)
    shared = TreeDataset(trees)
    tree_loss, tree_count, tree_grads = loss_and_grads(collate([shared[i] for i in range(len(trees))]), items)
    assert tree_count == ref_count == items
    assert abs(tree_loss - ref_loss) < 1e-5
    for name, g in ref_grads.items():
        assert torch.allclose(tree_grads[name], g, atol=1e-6, rtol=1e-4), name


def test_shared_prefix_trees_respect_the_length_cap_and_keep_unkeyed_examples_alone(tiny_model_dir):
    from sovllm.models.chat import end_of_turn_id
    from sovllm.models.tokenizer import load_tokenizer
    from sovllm.train.data import encode, share_prefixes

    tok = load_tokenizer(tiny_model_dir)
    records = _shared_context_records(n_contexts=1, questions=4)
    records[3]["meta"] = {}  # no question recorded: never shared
    examples = [encode(r, tok, end_of_turn_id(tok)) for r in records]
    one = len(examples[0])
    trees = share_prefixes(examples, max_tokens=one + 2 * (one - len(examples[0].prompt_ids)) + 40)
    assert all(len(t) <= one + 2 * (one - len(examples[0].prompt_ids)) + 40 for t in trees)
    assert sorted(len(t.branches) for t in trees) == [1, 1, 2]
    assert [t.ids for t in trees if "c0q3" in t.ids] == [["c0q3"]]
    assert sorted(i for t in trees for i in t.ids) == sorted(e.id for e in examples)
