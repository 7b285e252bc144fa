"""The real bundled SmolLM2: dequantised once, reloadable without gguf, tokenizer normalised."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sovllm.artifacts import sha256_file
from sovllm.models import registry
from sovllm.models.tokenizer import end_of_turn_ids, load_tokenizer

pytestmark = pytest.mark.integration

SAMPLES = [
    "The VPN must be used on every public network; tokens expire after 12 hours.",
    "Überstunden müssen innerhalb von drei Monaten ausgeglichen werden – Grüße, Jürgen.",
    "def rotate(keys: list[str]) -> dict[str, int]:\n    return {k: len(k) for k in keys}  # O(n)\n",
]


def test_prepared_directory_is_a_plain_fp32_checkpoint(bundled_model):
    path = bundled_model.path
    for name in ("model.safetensors", "config.json", "tokenizer.json", "generation_config.json", registry.INFO_FILE):
        assert (path / name).is_file(), name
    info = json.loads((path / registry.INFO_FILE).read_text())
    assert info["base_id"] == bundled_model.base_id == sha256_file(path / "model.safetensors")
    assert "Q4_1" in info["note"] and info["dtype"] == "float32"
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"


def test_second_prepare_is_a_no_op(bundled_model):
    weights = bundled_model.path / "model.safetensors"
    written = weights.stat().st_mtime_ns
    messages = []
    again = registry.prepare(bundled_model.name, log=messages.append)
    assert again.base_id == bundled_model.base_id
    assert messages == [] and weights.stat().st_mtime_ns == written  # nothing converted or rewritten


def test_reloads_without_gguf_and_predicts_text(bundled_model):
    # A child process where `import gguf` fails proves the checkpoint no longer needs it.
    code = f"""
import sys; sys.modules["gguf"] = None
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(bundled_model.path)!r}, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained({str(bundled_model.path)!r})
ids = tok("The capital of France is Paris. The capital of Germany is Berlin.", return_tensors="pt").input_ids
with torch.no_grad():
    loss = model(ids, labels=ids).loss.item()
print(sum(p.numel() for p in model.parameters()), next(model.parameters()).dtype, loss)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    params, dtype, loss = proc.stdout.split()[-3:]
    assert int(params) == 134_515_008 and dtype == "torch.float32"
    # Uniform guessing over 49,152 tokens would be ln(49152) = 10.8 nats; real weights do far better.
    assert float(loss) < 4.0


def test_tokenizer_is_normalised_and_round_trips(bundled_model):
    tok = load_tokenizer(bundled_model.path)
    assert len(tok) == 49152  # no tokens added
    for marker in ("<|im_start|>", "<|im_end|>"):
        assert len(tok(marker, add_special_tokens=False)["input_ids"]) == 1
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id != tok.eos_token_id
    assert tok.pad_token_id not in end_of_turn_ids(tok)
    for text in SAMPLES:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_gguf_chat_template_is_kept(bundled_model):
    from gguf import GGUFReader

    spec = registry.BUNDLED[bundled_model.name]
    reader = GGUFReader(str(registry.bundled_gguf(spec)))
    field = reader.fields["tokenizer.chat_template"]
    original = bytes(field.parts[field.data[0]]).decode("utf-8")
    tok = load_tokenizer(bundled_model.path)
    assert tok.chat_template == original
    # The template's default system prompt appears only when we give none.
    text = tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}], tokenize=False)
    assert "SmolLM" not in text
