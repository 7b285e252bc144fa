"""Automatic prefix caching: shared prompt prefixes are computed once, outputs stay those of `generate()`.

Prompts share a 70-token prefix and differ after it. Greedy tokens must equal `generate()` with the
same adapter (up to a near-tie, as in the parity test), and the engine's cached-token count must be
exactly what reuse allows: the shared prefix for every prompt after the first of its adapter, nothing
across adapters, nothing with caching off, nothing after the adapter was reloaded.
"""

from __future__ import annotations

import time

import pytest
import torch

from sovllm.models.tokenizer import load_tokenizer
from sovllm.serve.engine import Engine, common_prefix
from tests.serve.conftest import submit
from tests.serve.test_engine_parity import TEXT, check

NEW_TOKENS = 24
SHARED = 70


@pytest.fixture(scope="module")
def prompts_and_reference(tiny_model_dir, tiny_adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(tiny_model_dir)
    ids = tokenizer(TEXT * 3, add_special_tokens=False)["input_ids"]
    prefix = ids[:SHARED]
    prompts = [prefix + ids[100 + 9 * k:100 + 9 * k + 5 + k] for k in range(6)]  # suffixes of 5..10 tokens
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    reference = PeftModel.from_pretrained(model, str(tiny_adapters["r4"]), adapter_name="r4")
    reference.eval()
    expected = {}
    for adapter in (None, "r4"):
        for p, prompt in enumerate(prompts):
            with torch.no_grad():
                out = reference.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                         output_scores=True, return_dict_in_generate=True,
                                         adapter_names=[adapter or "__base__"], pad_token_id=tokenizer.pad_token_id)
            margins = [float(top[0] - top[1]) for top in (s[0].topk(2).values for s in out.scores)]
            expected[adapter, p] = (out.sequences[0, len(prompt):].tolist(), margins)
    return tokenizer, prompts, expected


@pytest.fixture
def make_engine(tiny_model_dir, tiny_adapters, prompts_and_reference):
    """A factory of started engines (8 slots, adapter r4 loaded), all shut down after the test."""
    started = []

    def make(**kwargs) -> Engine:
        engine = Engine(tiny_model_dir, prompts_and_reference[0], max_num_seqs=8, max_model_len=256, **kwargs)
        engine.start()
        engine.load_adapter("r4", tiny_adapters["r4"])
        started.append(engine)
        return engine

    yield make
    for engine in started:
        engine.shutdown()


def run(engine, prompts, expected, adapter, *, together: bool) -> list[tuple[int, bool]]:
    if together:
        jobs = [submit(engine, p, adapter, max_tokens=NEW_TOKENS, temperature=0) for p in prompts]
    else:
        jobs = [submit(engine, p, adapter, max_tokens=NEW_TOKENS, temperature=0).wait() for p in prompts]
    return [(i, check(job.wait().tokens(), *expected[adapter, i])[0]) for i, job in enumerate(jobs)]


def test_common_prefix():
    assert common_prefix([1, 2, 3, 4], [1, 2, 3, 5]) == 3
    assert common_prefix([1, 2, 3], [1, 2, 3, 4]) == 3
    assert common_prefix([9, 2], [1, 2]) == 0
    assert common_prefix([], [1]) == 0
    long = list(range(1000))
    assert common_prefix(long, long[:777] + [-1] + long[778:]) == 777


def test_shared_prefix_is_reused_and_outputs_match_generate(make_engine, prompts_and_reference):
    tokenizer, prompts, expected = prompts_and_reference
    engine = make_engine()
    for adapter in (None, "r4"):  # one after another: each later prompt finds the prefix in a free slot
        before = engine.stats["cached_prompt_tokens"]
        results = run(engine, prompts, expected, adapter, together=False)
        assert all(ok for _, ok in results), results
        # nothing crosses adapters: r4's first prompt computes the prefix again
        assert engine.stats["cached_prompt_tokens"] - before == SHARED * (len(prompts) - 1)
        # an earlier prompt again: it is still cached whole (all but its last token are reused)
        before = engine.stats["cached_prompt_tokens"]
        assert check(submit(engine, prompts[2], adapter, max_tokens=NEW_TOKENS, temperature=0).wait().tokens(),
                     *expected[adapter, 2])[0]
        assert engine.stats["cached_prompt_tokens"] - before == len(prompts[2]) - 1


def test_requests_arriving_together_compute_the_prefix_once(make_engine, prompts_and_reference):
    tokenizer, prompts, expected = prompts_and_reference
    engine = make_engine()
    results = run(engine, prompts, expected, "r4", together=True)
    assert all(ok for _, ok in results), results
    assert engine.stats["cached_prompt_tokens"] == SHARED * (len(prompts) - 1)


def test_prefix_copied_from_a_running_sequence(make_engine, prompts_and_reference):
    tokenizer, prompts, expected = prompts_and_reference
    engine = make_engine()
    first = submit(engine, prompts[0], None, max_tokens=NEW_TOKENS, temperature=0)
    deadline = time.monotonic() + 30
    while engine.step < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert not first.done.is_set()
    second = submit(engine, prompts[1], None, max_tokens=NEW_TOKENS, temperature=0, n=2)
    assert check(first.wait().tokens(), *expected[None, 0])[0]
    second.wait()
    assert check(second.tokens(0), *expected[None, 1])[0] and second.tokens(0) == second.tokens(1)
    assert engine.stats["cached_prompt_tokens"] == SHARED


def test_reloading_an_adapter_forgets_its_cached_prompts(make_engine, prompts_and_reference, tiny_adapters):
    tokenizer, prompts, expected = prompts_and_reference
    engine = make_engine()
    submit(engine, prompts[0], "r4", max_tokens=2, temperature=0).wait()
    submit(engine, prompts[0], None, max_tokens=2, temperature=0).wait()
    engine.unload_adapter("r4")
    engine.load_adapter("r4", tiny_adapters["r8"])  # same name, other weights
    before = engine.stats["cached_prompt_tokens"]
    submit(engine, prompts[1], "r4", max_tokens=2, temperature=0).wait()
    assert engine.stats["cached_prompt_tokens"] == before
    submit(engine, prompts[1], None, max_tokens=2, temperature=0).wait()  # the base's prompts stay
    assert engine.stats["cached_prompt_tokens"] == before + SHARED


def test_caching_off_recomputes_everything(make_engine, prompts_and_reference):
    tokenizer, prompts, expected = prompts_and_reference
    engine = make_engine(prefix_caching=False)
    results = run(engine, prompts[:3], expected, None, together=False)
    assert all(ok for _, ok in results), results
    assert engine.stats["cached_prompt_tokens"] == 0
