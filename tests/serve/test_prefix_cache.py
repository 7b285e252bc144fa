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
        kwargs.setdefault("max_num_seqs", 8)
        engine = Engine(tiny_model_dir, prompts_and_reference[0], max_model_len=256, **kwargs)
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


def test_every_free_slot_caching_a_prompt_still_admits_new_requests(make_engine, tiny_model_dir):
    """Two slots, both holding a cached prompt that the next two requests share only in part."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(tiny_model_dir)
    ids = tokenizer(TEXT * 3, add_special_tokens=False)["input_ids"]
    heads = [ids[:40], ids[50:90]]
    first = [heads[0] + ids[100:106], heads[1] + ids[110:116]]
    second = [heads[0] + ids[120:127], heads[1] + ids[130:137]]
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()

    def reference(prompt):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 output_scores=True, return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
        return out.sequences[0, len(prompt):].tolist(), [float(t[0] - t[1]) for t in
                                                        (s[0].topk(2).values for s in out.scores)]

    engine = make_engine(max_num_seqs=2)
    for prompt in first:
        submit(engine, prompt, None, max_tokens=2, temperature=0).wait()
    jobs = [submit(engine, prompt, None, max_tokens=NEW_TOKENS, temperature=0) for prompt in second]
    for prompt, job in zip(second, jobs):
        assert check(job.wait().tokens(), *reference(prompt))[0]
        assert not any(e.get("error") for e in job.events)
    # the first reuses its head and evicts the least recently used other prompt, the second's head
    assert engine.stats["cached_prompt_tokens"] == 40


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


def test_random_bursts_of_shared_prefixes_never_fail_and_match_generate(make_engine, tiny_model_dir):
    """40 requests in bursts over 4 slots: three heads, random tails, n of 1 or 2, some sent twice."""
    import random

    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(tiny_model_dir)
    ids = tokenizer(TEXT * 4, add_special_tokens=False)["input_ids"]
    rng = random.Random(7)
    heads = [ids[:30], ids[40:100], ids[110:130]]
    prompts = []
    for _ in range(30):
        start = rng.randrange(140, 300)
        prompts.append(rng.choice(heads) + ids[start:start + rng.randint(1, 25)])
    prompts += rng.sample(prompts, 10)  # exact repeats
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    engine = make_engine(max_num_seqs=4)
    jobs = []
    for burst in range(0, len(prompts), 5):
        for prompt in prompts[burst:burst + 5]:
            jobs.append((prompt, submit(engine, prompt, None, max_tokens=8, temperature=0, n=rng.choice([1, 2]))))
        time.sleep(rng.random() * 0.05)
    for prompt, job in jobs:
        job.wait()
        assert not any(e.get("error") for e in job.events), [e["error"] for e in job.events if e.get("error")]
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
        margins = [float(t[0] - t[1]) for t in (s[0].topk(2).values for s in out.scores)]
        for index in range(job.remaining + len({e["index"] for e in job.events})):
            assert check(job.tokens(index), out.sequences[0, len(prompt):].tolist(), margins)[0]
    assert engine.stats["cached_prompt_tokens"] > 0
