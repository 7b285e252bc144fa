"""Greedy parity of the continuous-batching engine with plain `generate()`, alone and in a mixed batch.

16 prompts of different lengths × (base + 3 adapters of different ranks and targets) × 64 tokens.
Token IDs must equal `generate()` with the same adapter up to the first step where generate()'s
top-2 logit margin is below 1e-4 (a near-tie, where float rounding may pick either token); any
other divergence fails.
"""

from __future__ import annotations

import time

import pytest
import torch

from sovllm.models.tokenizer import load_tokenizer
from sovllm.serve.engine import Engine
from tests.serve.conftest import submit

# The shared fixture runs generate() 64 times for reference tokens: a minute of CPU before any test.
pytestmark = pytest.mark.integration

NEW_TOKENS = 64
TIE = 1e-4
TEXT = ("The incident runbook says: page the on-call engineer, then open a ticket within 15 minutes. "
        "Passwords must have at least 14 characters and are rotated every 180 days. Die Urlaubsanträge werden "
        "im Personalportal gestellt und vom Teamleiter genehmigt. Customers can return products within 30 days. ")


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tiny_adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(tiny_model_dir)
    ids = tokenizer(TEXT * 3, add_special_tokens=False)["input_ids"]
    lengths = [3, 5, 8, 12, 17, 23, 30, 38, 47, 57, 68, 80, 93, 107, 122, 138]
    prompts = [ids[i:i + n] for i, n in enumerate(lengths)]
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    reference = None
    for name, path in tiny_adapters.items():
        if reference is None:
            reference = PeftModel.from_pretrained(model, str(path), adapter_name=name)
        else:
            reference.load_adapter(str(path), adapter_name=name)
    reference.eval()
    expected = {}
    for adapter in [None, *tiny_adapters]:
        for p, prompt in enumerate(prompts):
            with torch.no_grad():
                out = reference.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                         output_scores=True, return_dict_in_generate=True,
                                         adapter_names=[adapter or "__base__"], pad_token_id=tokenizer.pad_token_id)
            tokens = out.sequences[0, len(prompt):].tolist()
            margins = [float(top[0] - top[1]) for top in (s[0].topk(2).values for s in out.scores)]
            expected[adapter, p] = (tokens, margins)
    engine = Engine(tiny_model_dir, tokenizer, max_num_seqs=24, max_model_len=512)
    engine.start()
    for name, path in tiny_adapters.items():
        engine.load_adapter(name, path)
    yield engine, prompts, expected, list(tiny_adapters)
    engine.shutdown()


def check(actual: list[int], tokens: list[int], margins: list[float]) -> tuple[bool, int]:
    """(matches up to the first near-tie, number of near-ties met before any divergence)."""
    ties = 0
    for t in range(max(len(actual), len(tokens))):
        if t < len(margins) and margins[t] < TIE:
            return True, ties + 1  # from here on either token is a correct greedy choice
        if t >= len(actual) or t >= len(tokens) or actual[t] != tokens[t]:
            return False, ties
    return True, ties


def test_adapters_really_change_the_output(setup):
    _, prompts, expected, adapters = setup
    models = [None, *adapters]
    for i, a in enumerate(models):
        for b in models[i + 1:]:
            differ = sum(expected[a, p][0] != expected[b, p][0] for p in range(len(prompts)))
            assert differ >= 12, f"{a} and {b} give the same greedy output on {16 - differ} of 16 prompts"


def test_alone_matches_generate(setup):
    engine, prompts, expected, adapters = setup
    failures, ties = [], 0
    for adapter in [None, *adapters]:
        for p, prompt in enumerate(prompts):
            got = submit(engine, prompt, adapter, max_tokens=NEW_TOKENS, temperature=0).wait().tokens()
            ok, t = check(got, *expected[adapter, p])
            ties += t
            if not ok:
                failures.append((adapter, p))
    print(f"near-ties met: {ties}")
    assert failures == [], f"diverged from generate() without a near-tie: {failures} (near-ties: {ties})"


def test_mixed_batch_matches_generate_while_sequences_join_and_leave(setup):
    engine, prompts, expected, adapters = setup
    jobs = []
    order = [(adapter, p) for p in range(len(prompts)) for adapter in [None, *adapters]]
    for wave in range(4):  # later waves join a batch that is already decoding
        start = engine.step
        for adapter, p in order[wave * 16:(wave + 1) * 16]:
            jobs.append((adapter, p, submit(engine, prompts[p], adapter, max_tokens=NEW_TOKENS, temperature=0)))
        deadline = time.monotonic() + 60
        while engine.step < start + 10 and time.monotonic() < deadline and engine.busy:
            time.sleep(0.01)
    failures, ties, joined, left = [], 0, set(), set()
    for adapter, p, collector in jobs:
        collector.wait()
        joined.add(collector.events[0]["step"])
        left.add(collector.events[-1]["step"])
        ok, t = check(collector.tokens(), *expected[adapter, p])
        ties += t
        if not ok:
            failures.append((adapter, p))
    assert len(joined) > 3 and len(left) > 3, (joined, left)
    print(f"near-ties met: {ties}; join steps {sorted(joined)}; leave steps {sorted(left)}")
    assert failures == [], f"diverged from generate() without a near-tie: {failures} (near-ties: {ties})"


def test_batched_decode_attention_matches_generate_over_a_cache_of_garbage(setup, tiny_model_dir, tiny_adapters,
                                                                          monkeypatch):
    """Decode steps attend over a range of slots at once; what lies beyond each slot's length must not leak.

    The cache starts as NaN everywhere (what uninitialised memory may hold): a masked position whose value
    is NaN would turn every output of its slot into NaN (0 × NaN), so this fails unless the engine keeps
    those values finite.
    """
    import sovllm.serve.attention as attention_module

    _, prompts, expected, adapters = setup
    batched = []
    original = attention_module._span_attention
    monkeypatch.setattr(attention_module, "_span_attention",
                        lambda batch, *a: batched.append(len(batch.slots)) or original(batch, *a))
    engine = Engine(tiny_model_dir, load_tokenizer(tiny_model_dir), max_num_seqs=24, max_model_len=512)
    engine.keys.fill_(float("nan"))
    engine.values.fill_(float("nan"))
    engine.start()
    try:
        for name, path in tiny_adapters.items():
            engine.load_adapter(name, path)
        order = [(adapter, p) for p in range(len(prompts)) for adapter in [None, *adapters]]
        jobs = [(adapter, p, submit(engine, prompts[p], adapter, max_tokens=NEW_TOKENS, temperature=0))
                for adapter, p in order[:24]]
        failures = []
        for adapter, p, collector in jobs:
            collector.wait()
            if not check(collector.tokens(), *expected[adapter, p])[0]:
                failures.append((adapter, p))
    finally:
        engine.shutdown()
    assert batched and max(batched) == 24, "decode steps never attended over a range of slots"
    assert failures == [], f"diverged from generate() without a near-tie: {failures}"
