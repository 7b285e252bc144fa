"""Training on CUDA: bf16 LoRA, QLoRA and two-GPU data parallel through the real train stage.

Skipped where torch sees no GPU (the development machines); run them on a GPU node with
`pytest -m gpu tests/train/test_gpu.py`. docs/train.md says which of them have run where.
"""

from __future__ import annotations

import json

import pytest

from sovllm.config import load_config
from sovllm.train import stage
from tests.train.conftest import TRAIN_FAST, curated_project

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.integration,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _train(root, *settings):
    cfg = load_config(root, (*TRAIN_FAST, "train.max_steps=4", "train.batch_size=2", "train.device=cuda", *settings))
    return stage.run(root, cfg, log=lambda _: None)


@pytest.mark.skipif(torch.cuda.is_available() and not torch.cuda.is_bf16_supported(), reason="this GPU has no bf16")
def test_bf16_lora_on_one_gpu_gives_a_servable_adapter(train_project):
    result = _train(train_project, "train.precision=bf16")
    training = result.manifest.extra["training"]
    assert (training["device"], training["precision"], training["qlora"]) == ("cuda", "bf16", False)
    manifest = json.loads((train_project / "out" / "train" / "adapter" / "manifest.json").read_text())
    assert manifest["metrics"]["steps"] == 4 and manifest["refusal_calibration"] is not None


def test_qlora_on_one_gpu(train_project):
    pytest.importorskip("bitsandbytes")
    result = _train(train_project, "train.qlora=true")
    assert result.manifest.extra["training"]["base_weights"] == "4-bit NF4 (QLoRA)"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_train_the_adapter_one_gpu_trains(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    one, two = (curated_project(tmp_path / name, tiny_model_dir) for name in ("one", "two"))
    _train(one, "train.grad_accum=2", "train.precision=fp32")
    _train(two, "train.grad_accum=1", "train.precision=fp32", "train.num_processes=2")
    a, b = (load_file(str(root / "out" / "train" / "adapter" / "adapter_model.safetensors")) for root in (one, two))
    scale = max(float(t.abs().max()) for t in a.values())
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-4 * max(scale, 1.0)
