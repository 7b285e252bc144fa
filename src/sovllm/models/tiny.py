"""Tiny models built in code, for fast unit tests (no files shipped, nothing downloaded).

`build_tiny_tokenizer` trains a small byte-level BPE tokenizer with ChatML-style special tokens
and, on purpose, the same trap as the bundled SmolLM2: pad = eos = `<|im_end|>`. `build_tiny_model_dir`
writes a 2-layer Llama with random weights and that tokenizer as a normal Hugging Face directory.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<reserved_0>"]

_CHATML = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
# Same layout, but like several real templates it refuses a system message.
_NO_SYSTEM = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ raise_exception('System role not supported') }}{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

_CORPUS = [
    "The incident runbook says: page the on-call engineer, then open a ticket within 15 minutes.",
    "Passwords must have at least 14 characters and are rotated every 180 days.",
    "Die Urlaubsanträge werden im Personalportal gestellt und vom Teamleiter genehmigt.",
    "Für Überstunden gilt: höchstens zehn Stunden pro Woche, Ausgleich innerhalb von drei Monaten.",
    "def rotate(keys: list[str]) -> dict:\n    return {k: k[::-1] for k in keys}\n",
    "Question: What is the refund window? Answer: Customers can return products within 30 days.",
]


def build_tiny_tokenizer(*, system_role: bool = True, vocab_size: int = 400):
    """A small byte-level BPE tokenizer with ChatML special tokens and pad = eos = `<|im_end|>`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
        additional_special_tokens=["<reserved_0>"],
    )
    tokenizer.chat_template = _CHATML if system_role else _NO_SYSTEM
    return tokenizer


def build_tiny_model_dir(path: str | Path, *, system_role: bool = True, seed: int = 0,
                         init_std: float = 0.3) -> Path:
    """Write a 2-layer Llama (random weights, fp32) plus the tiny tokenizer to `path`.

    The weights are drawn wider than a real initialisation (`init_std`), so that greedy outputs
    depend on the context and vary from step to step, as a trained model's do.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tokenizer = build_tiny_tokenizer(system_role=system_role)
    ids = tokenizer.convert_tokens_to_ids
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=ids("<|im_start|>"),
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|im_end|>"),
        tie_word_embeddings=True,
        initializer_range=init_std,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def make_random_adapter(base_dir: str | Path, out_dir: str | Path, *, rank: int = 4, seed: int = 0,
                        target_modules: tuple[str, ...] = ("q_proj", "v_proj"), scale: float = 0.5,
                        base_id: str | None = None) -> Path:
    """A LoRA adapter with random, non-zero weights (PEFT format + sovllm manifest), for tests and benchmarks.

    PEFT initialises B to zero, which would make the adapter a no-op; here both A and B are random
    and B is multiplied by `scale`, so each seed gives a distinct, visible change of the outputs.
    """
    import json

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from sovllm.models.adapter import file_hashes
    from sovllm.models.registry import weights_sha256

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(target_modules), lora_dropout=0.0,
                        bias="none", init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(scale)
    out_dir = Path(out_dir)
    peft_model.save_pretrained(str(out_dir))
    manifest = {"stage": "adapter", "base_id": base_id or weights_sha256(base_dir), "seed": seed, "rank": rank,
                "note": "random LoRA weights for tests and benchmarks", "files": file_hashes(out_dir)}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return out_dir
