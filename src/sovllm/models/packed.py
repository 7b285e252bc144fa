"""Faster fp32 linear layers on CPU for inference: oneDNN with weights packed once.

PyTorch's CPU `F.linear` calls MKL's sgemm. On the AMD EPYC cores this project runs on, oneDNN
with a weight reordered once into its blocked layout is much faster for the shapes of a small
model — most of all for the few-row products of decoding (measured on SmolLM2-135M, 2 threads:
one forward of 32 decode rows 160 → 103 ms, a 512-token prefill 1.43 → 0.77 s; docs/serve.md).

`pack_linears(model)` turns every fp32 CPU `nn.Linear` of a model into a `PackedLinear`: still an
`nn.Linear` (PEFT wraps it as the base layer of a LoRA layer as usual, its `weight` is the same
parameter), whose forward uses the packed copy when no gradient is needed and `F.linear`
otherwise. A weight changed in place is packed again before its next use. The packed copies cost
memory once more than the weights (~0.5 GB for the 135M model). Where oneDNN is missing or
its result does not match `F.linear` on a probe, the model stays as it is. `SOVLLM_PACKED_LINEAR=0`
switches it off.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

log = logging.getLogger("sovllm.packed")
ENV = "SOVLLM_PACKED_LINEAR"


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int):
    rows = x.reshape(-1, x.shape[-1])
    if not rows.is_contiguous():
        rows = rows.contiguous()
    y = torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "")
    return y.reshape(*x.shape[:-1], out_features)


class _FrozenPackedLinear(torch.autograd.Function):
    """y = x Wᵀ + b with a frozen W (LoRA's base layers): forward packed, backward only dx = dy W."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return _packed_linear(x, layer.packed_weight(), layer.bias, layer.out_features)

    @staticmethod
    def backward(ctx, grad):
        layer = ctx.layer
        return _packed_linear(grad, layer.packed_weight(transposed=True), None, layer.in_features), None


class PackedLinear(torch.nn.Linear):
    """An `nn.Linear` whose forward runs oneDNN on a once-packed weight, unless the weight itself trains."""

    _packed: dict | None = None

    def packed_weight(self, transposed: bool = False) -> torch.Tensor:
        w = self.weight
        stamp = (w._version, w.data_ptr())
        if self._packed is None or self._packed["stamp"] != stamp:
            self._packed = {"stamp": stamp}
        if transposed not in self._packed:
            with torch.no_grad():
                self._packed[transposed] = _pack(w.t().contiguous() if transposed else w)
        return self._packed[transposed]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.dtype != w.dtype or x.device.type != "cpu" or x.numel() == 0:
            return F.linear(x, w, self.bias)
        if not torch.is_grad_enabled() or not (x.requires_grad or w.requires_grad):
            return _packed_linear(x, self.packed_weight(), self.bias, self.out_features)
        if w.requires_grad or (self.bias is not None and self.bias.requires_grad):
            return F.linear(x, w, self.bias)
        return _FrozenPackedLinear.apply(x, self)


def available() -> bool:
    """oneDNN's packed linear is there and agrees with F.linear on a probe."""
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        gen = torch.Generator().manual_seed(0)
        w, x = torch.randn(48, 40, generator=gen), torch.randn(5, 40, generator=gen)
        b = torch.randn(48, generator=gen)
        return bool(torch.allclose(_packed_linear(x, _pack(w), b, 48), F.linear(x, w, b), atol=1e-4, rtol=1e-4))
    except Exception:  # noqa: BLE001 - any failure means: use the plain layers
        return False


def pack_linears(model: torch.nn.Module) -> int:
    """Make every fp32 CPU nn.Linear of `model` a PackedLinear in place; returns how many."""
    if not available():
        return 0
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and module.weight.dtype == torch.float32 \
                and module.weight.device.type == "cpu":
            module.__class__ = PackedLinear
            count += 1
    log.info("packed %d linear layers for oneDNN", count)
    return count
