"""LoRA presets and the adapter options vLLM can serve.

Presets: `minimal` (q, v; r 4), `standard` (q, k, v, o; r 8), `all-linear` (r 16), `high-capacity`
(r 32); `r`, `alpha` (default 2 × r), dropout, target modules and rsLoRA override them. DoRA,
`modules_to_save` and trained biases make an adapter vLLM cannot load, so they are refused unless
`--allow-non-vllm-adapter`. Device, precision and QLoRA are checked in `train.hardware`.
"""

from __future__ import annotations

from sovllm.config import LORA_PRESETS, TrainSection
from sovllm.errors import ConfigError


def resolved(section: TrainSection) -> dict:
    """The effective LoRA settings: preset values overridden by explicit ones."""
    preset = LORA_PRESETS[section.preset]
    r = section.r or preset["r"]
    return {"preset": section.preset, "r": r, "lora_alpha": section.alpha or 2.0 * r,
            "lora_dropout": section.dropout, "target_modules": section.target_modules or preset["target_modules"],
            "use_rslora": section.use_rslora, "use_dora": section.use_dora,
            "modules_to_save": section.modules_to_save, "bias": section.bias}


def check_options(section: TrainSection, *, allow_non_vllm: bool = False) -> None:
    """Refuse options that would produce an adapter vLLM cannot serve."""
    blocked = []
    if section.use_dora:
        blocked.append("DoRA (train.use_dora)")
    if section.modules_to_save:
        blocked.append(f"modules_to_save {section.modules_to_save}")
    if section.bias != "none":
        blocked.append(f"trained biases (train.bias: {section.bias})")
    if blocked and not (allow_non_vllm or section.allow_non_vllm_adapter):
        raise ConfigError(f"vLLM cannot serve this adapter: {', '.join(blocked)}",
                          hint="remove these options, or pass --allow-non-vllm-adapter if you serve it elsewhere")


def lora_config(section: TrainSection):
    """A peft LoraConfig for causal-LM training."""
    from peft import LoraConfig

    settings = resolved(section)
    settings.pop("preset")
    return LoraConfig(task_type="CAUSAL_LM", **settings)
