"""What a served LoRA adapter may be: an allow-list of `adapter_config.json` fields, and checked weights.

vLLM serves plain LoRA: one rank and one alpha per adapter, `lora_A` / `lora_B` matrices on linear
modules of the base model, optionally rsLoRA scaling. PEFT's configuration can ask for much more,
and some of it changes the *base* model when the adapter is loaded (`init_lora_weights: "pissa"`,
`"olora"`, `"corda"`, `"eva"`, `"loftq"` rewrite base weights; `layer_replication` duplicates
layers). A server that loads such a file for one tenant would change the answers of every other.
So every field is checked against this allow-list: known fields only with the values listed,
unknown fields only when they are empty (`null`, `false`, `{}`, `[]`, `""`: they switch nothing
on). The weights are read once (the bytes that were checked are the bytes that are loaded), each
tensor must be a `lora_A`/`lora_B` matrix of a targeted linear module with that module's shape
and the adapter's rank, and every value must be finite.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Any

from sovllm.errors import AdapterError

MAX_RANK = 1024  # above any --max-lora-rank vLLM accepts; a bigger `r` is refused as absurd
MAX_CONFIG_BYTES = 1 << 20
MAX_HEADER_BYTES = 16 << 20  # the safetensors header (JSON); real adapters need a few KB
MODULE_RE = re.compile(r"^[A-Za-z0-9_.]{1,200}$")
TENSOR_RE = re.compile(r"^base_model\.model\.(?P<module>[A-Za-z0-9_.]+)\.lora_(?P<ab>[AB])\.weight$")
FLOAT_DTYPES = {"F32": 4, "F16": 2, "BF16": 2}
_EMPTY = (None, False, {}, [], "")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _targets(value) -> bool:
    if isinstance(value, str):
        return 0 < len(value) <= 1000
    return isinstance(value, list) and 0 < len(value) <= 64 and all(
        isinstance(v, str) and MODULE_RE.match(v) for v in value)


# field: (check, what is allowed) — the values vLLM serves and PEFT loads without side effects
ALLOWED: dict[str, tuple[Any, str]] = {
    "peft_type": (lambda v: v == "LORA", '"LORA"'),
    "task_type": (lambda v: v is None or (isinstance(v, str) and len(v) <= 64), "a task name or null"),
    "peft_version": (lambda v: v is None or (isinstance(v, str) and len(v) <= 64), "a version string"),
    "base_model_name_or_path": (lambda v: v is None or (isinstance(v, str) and len(v) <= 4096), "a string or null"),
    "revision": (lambda v: v is None or (isinstance(v, str) and len(v) <= 256), "a string or null"),
    "inference_mode": (lambda v: isinstance(v, bool), "true or false"),
    "r": (lambda v: _is_int(v) and 1 <= v <= MAX_RANK, f"an integer from 1 to {MAX_RANK}"),
    "target_modules": (_targets, "a non-empty list of module names (or one regular expression)"),
    "lora_alpha": (lambda v: _is_number(v) and 0 < v <= 1e6, "a positive number"),
    "lora_dropout": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "fan_in_fan_out": (lambda v: v is False, "false"),
    "bias": (lambda v: v == "none", '"none"'),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: v is False, "false (vLLM does not serve DoRA)"),
    "lora_bias": (lambda v: v is False, "false"),
    # initialisation only matters for new weights; these never touch the base model
    "init_lora_weights": (lambda v: v in (True, False, "gaussian"),
                          'true, false or "gaussian" (other initialisations rewrite the base model on load)'),
    "rank_pattern": (lambda v: v in ({}, None), "empty (vLLM applies one rank per adapter)"),
    "alpha_pattern": (lambda v: v in ({}, None), "empty (vLLM applies one alpha per adapter)"),
    "megatron_core": (lambda v: v in (None, "megatron.core"), '"megatron.core" (unused)'),
    "qalora_group_size": (lambda v: _is_int(v), "an integer (unused without use_qalora)"),
    "runtime_config": (lambda v: v is None or (isinstance(v, dict) and not any(v.values())),
                       "empty or all false"),
}


def check_config(config: Any, where: Path) -> dict:
    """The adapter config if every field is allowed; AdapterError naming the file and the field otherwise."""
    hint = "serve plain LoRA adapters (as sovllm train writes them); see docs/serve.md 'Adapters'"
    if not isinstance(config, dict):
        raise AdapterError(f"{where}: must hold a JSON object, found {type(config).__name__}", hint=hint)
    for key in ("r", "target_modules", "peft_type"):
        if key not in config:
            raise AdapterError(f"{where}: field {key!r} is missing", hint=hint)
    for key, value in config.items():
        rule = ALLOWED.get(key)
        if rule is None:
            if value in _EMPTY:
                continue  # a feature this server does not know, switched off
            raise AdapterError(f"{where}: field {key!r} is not supported by this server (value "
                               f"{_short(value)}); only plain LoRA is served", hint=hint)
        check, allowed = rule
        try:
            ok = bool(check(value))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise AdapterError(f"{where}: field {key!r} = {_short(value)} is not allowed; expected {allowed}",
                               hint=hint)
    return config


def _short(value) -> str:
    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= 60 else text[:57] + "..."


def read_header(data: bytes, where: Path) -> tuple[dict, int]:
    """The safetensors header of `data` and where the tensor bytes begin; AdapterError when malformed."""
    if len(data) < 8:
        raise AdapterError(f"{where}: not a safetensors file ({len(data)} bytes)")
    (size,) = struct.unpack("<Q", data[:8])
    if size > MAX_HEADER_BYTES or 8 + size > len(data):
        raise AdapterError(f"{where}: not a safetensors file (header of {size} bytes in a file of {len(data)})")
    try:
        header = json.loads(data[8:8 + size].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise AdapterError(f"{where}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{where}: not a safetensors file (its header is not an object)")
    return header, 8 + size


def _targeted(module: str, targets) -> bool:
    """PEFT's rule: a string is a regular expression over the full module name, a list names suffixes."""
    if isinstance(targets, str):
        try:
            return re.fullmatch(targets, module) is not None
        except re.error:
            return False
    return any(module == t or module.endswith("." + t) for t in targets)


def load_weights(path: Path, *, config: dict, shapes: dict[str, tuple[int, int]], max_bytes: int = 1 << 30):
    """Read and check an adapter's safetensors once; return its state dict (tensors) for loading.

    `shapes` maps the base model's linear modules (`model.layers.0.self_attn.q_proj`) to
    (in_features, out_features). Every tensor must be `lora_A` [r, in] or `lora_B` [out, r] of a
    module in `shapes` that `target_modules` selects, both present, float, finite.
    """
    import torch
    from safetensors.torch import load as load_bytes

    size = path.stat().st_size
    if size > max_bytes:
        raise AdapterError(f"{path}: {size:,} bytes is more than an adapter of this base model can hold")
    data = path.read_bytes()
    header, _ = read_header(data, path)
    rank, targets = config["r"], config["target_modules"]
    seen: dict[str, set] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        match = TENSOR_RE.match(name)
        if match is None:
            raise AdapterError(f"{path}: tensor {name!r} is not a LoRA A/B matrix of a linear module",
                               hint="serve plain LoRA adapters")
        module, ab = match["module"], match["ab"]
        if module not in shapes:
            raise AdapterError(f"{path}: tensor {name!r} names module {module!r}, which the base model lacks "
                               "(an adapter for another base?)")
        if not _targeted(module, targets):
            raise AdapterError(f"{path}: tensor {name!r} is for a module that target_modules does not select")
        fan_in, fan_out = shapes[module]
        expected = [rank, fan_in] if ab == "A" else [fan_out, rank]
        if not isinstance(info, dict) or info.get("dtype") not in FLOAT_DTYPES or info.get("shape") != expected:
            found = (info.get("dtype"), info.get("shape")) if isinstance(info, dict) else info
            raise AdapterError(f"{path}: tensor {name!r} is {found}; expected a float tensor of shape {expected} "
                               f"(rank {rank} from adapter_config.json)")
        seen.setdefault(module, set()).add(ab)
    if not seen:
        raise AdapterError(f"{path}: holds no LoRA tensors")
    lonely = sorted(m for m, parts in seen.items() if parts != {"A", "B"})
    if lonely:
        raise AdapterError(f"{path}: module {lonely[0]!r} has only one of lora_A / lora_B")
    try:
        tensors = load_bytes(data)
    except Exception as exc:  # noqa: BLE001 - safetensors reports corrupt offsets in its own error types
        raise AdapterError(f"{path}: unreadable tensors ({type(exc).__name__}: {exc})") from None
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise AdapterError(f"{path}: tensor {name!r} holds NaN or infinite values")
    return {name: tensor.float() for name, tensor in tensors.items()}


def read_bounded(file: Path, limit: int, hint: str | None = None) -> bytes:
    """The bytes of `file`; AdapterError naming it when it holds more than `limit` (never reads past that)."""
    try:
        with open(file, "rb") as handle:
            raw = handle.read(limit + 1)
    except OSError as exc:
        raise AdapterError(f"{file}: unreadable ({exc.strerror or exc})") from None
    if len(raw) > limit:
        raise AdapterError(f"{file}: larger than {limit:,} bytes", hint=hint)
    return raw


def read_adapter(path: Path, shapes: dict[str, tuple[int, int]]) -> tuple[dict, dict]:
    """An adapter directory's checked config and weights (see `check_config`, `load_weights`)."""
    config_file = path / "adapter_config.json"
    raw = read_bounded(config_file, MAX_CONFIG_BYTES)
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise AdapterError(f"{config_file}: not valid JSON ({exc})") from None
    check_config(config, config_file)
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise AdapterError(f"{path}: no adapter_model.safetensors (pickled .bin weights are not served)")
    return config, load_weights(weights, config=config, shapes=shapes)


def lora_config(config: dict):
    """PEFT's LoraConfig for a checked config, set up to load weights and never initialise anything."""
    import dataclasses

    from peft import LoraConfig

    known = {f.name for f in dataclasses.fields(LoraConfig)} - {"peft_type", "runtime_config", "auto_mapping",
                                                                 "peft_version"}
    values = {k: v for k, v in config.items() if k in known and v not in (None, {})}
    values.update(init_lora_weights=False, inference_mode=True)
    return LoraConfig(**values)
