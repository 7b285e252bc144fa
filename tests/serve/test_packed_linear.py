"""oneDNN packed linear layers: same outputs as nn.Linear, PEFT still wraps them, gradients still flow."""

import pytest

torch = pytest.importorskip("torch")

from sovllm.models import packed  # noqa: E402

pytestmark = pytest.mark.skipif(not packed.available(), reason="oneDNN packed linear not available in this torch")


@pytest.fixture
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    def load():
        return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()

    return load


def test_packed_model_gives_the_same_logits_and_counts_every_linear(tiny):
    plain, model = tiny(), tiny()
    linears = sum(type(m) is torch.nn.Linear for m in model.modules())
    assert packed.pack_linears(model) == linears > 0
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    ids = torch.randint(5, 200, (3, 17))
    with torch.inference_mode():
        a, b = plain(input_ids=ids).logits, model(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_a_weight_changed_in_place_is_packed_again():
    layer = torch.nn.Linear(12, 7)
    model = torch.nn.Sequential(layer)
    packed.pack_linears(model)
    x = torch.randn(4, 12)
    with torch.no_grad():
        first = layer(x)
        layer.weight.mul_(2.0)
        second = layer(x)
    assert torch.allclose(second, torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-5)
    assert not torch.allclose(first, second)


def test_gradients_flow_through_a_packed_layer():
    layer = torch.nn.Linear(6, 3)
    reference = torch.nn.Linear(6, 3)
    reference.load_state_dict(layer.state_dict())
    packed.pack_linears(torch.nn.Sequential(layer))
    x = torch.randn(5, 6, requires_grad=True)
    layer(x).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    reference(x2).sum().backward()
    assert torch.allclose(x.grad, x2.grad) and torch.allclose(layer.weight.grad, reference.weight.grad)


def test_peft_wraps_packed_layers_and_the_adapter_output_is_unchanged(tiny, tiny_adapters):
    from peft import PeftModel

    path = next(iter(tiny_adapters.values()))
    plain = PeftModel.from_pretrained(tiny(), str(path)).eval()
    base = tiny()
    packed.pack_linears(base)
    model = PeftModel.from_pretrained(base, str(path)).eval()
    ids = torch.randint(5, 200, (2, 11))
    with torch.inference_mode():
        assert torch.allclose(plain(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(packed.ENV, "0")
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    assert packed.pack_linears(model) == 0 and type(model[0]) is torch.nn.Linear


def test_a_frozen_packed_layer_trains_what_is_upstream_of_it():
    """LoRA's case: the base weight is frozen, the input needs its gradient (oneDNN both ways)."""
    layer, reference = torch.nn.Linear(10, 4), torch.nn.Linear(10, 4)
    reference.load_state_dict(layer.state_dict())
    for p in (*layer.parameters(), *reference.parameters()):
        p.requires_grad_(False)
    packed.pack_linears(torch.nn.Sequential(layer))
    x = torch.randn(3, 7, 10, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    (layer(x) ** 2).sum().backward()
    (reference(x2) ** 2).sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-5, rtol=1e-4)
