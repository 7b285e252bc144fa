"""The stop check on the tiny model: the base's rate is measured once per weights, prompts and budget."""

from __future__ import annotations

import json

from sovllm.train.data import Example
from sovllm.train.stopcheck import check_stopping, stop_rate


def _peft_model(model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))


class Counting:
    """The model, counting how often generation runs with the adapter switched off."""

    def __init__(self, model):
        self.model, self.base_runs, self._off = model, 0, False

    def disable_adapter(self):
        outer, inner = self, self.model.disable_adapter()

        class Off:
            def __enter__(self):
                outer._off = True
                return inner.__enter__()

            def __exit__(self, *exc):
                outer._off = False
                return inner.__exit__(*exc)

        return Off()

    def generate(self, **kwargs):
        self.base_runs += self._off
        return self.model.generate(**kwargs)

    def eval(self):
        return self.model.eval()

    @property
    def device(self):
        return self.model.device


def test_the_base_rate_is_reused_only_for_the_same_base_prompts_and_budget(tmp_path, tiny_model_dir):
    model = Counting(_peft_model(tiny_model_dir))
    val = [Example(f"v{i}", [5 + i, 9, 11, 13 + i], [7, 8, 2]) for i in range(4)]
    cache = tmp_path / "stop-check-base.json"
    check = lambda examples, base_id="base-a": check_stopping(  # noqa: E731
        model, examples, eot_id=2, pad_id=0, min_rate=0.0, limit=8, base_id=base_id, cache=cache)
    first = check(val)
    assert model.base_runs == 1 and json.loads(cache.read_text())["base_rate"] == first.base_rate
    with model.model.disable_adapter():
        assert first.base_rate == stop_rate(model.model, val, eot_id=2, pad_id=0, max_new_tokens=first.max_new_tokens)
    assert check(val).base_rate == first.base_rate and model.base_runs == 1  # reused
    check(val, base_id="base-b")  # other weights
    assert model.base_runs == 2
    check(val[:3] + [Example("v9", [6, 6, 6], [7, 8, 2])])  # other prompts
    assert model.base_runs == 3
    check(val[:3] + [Example("v3", val[3].prompt_ids, [7, 8, 9, 10, 11, 12, 2])])  # another budget
    assert model.base_runs == 4
    cache.write_text("{not json")  # a damaged file is measured again, never trusted
    check(val)
    assert model.base_runs == 5
