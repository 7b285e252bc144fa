"""The adapter directory contract: PEFT LoRA files that vLLM can serve unchanged.

`inspect_adapter(path)` reads `adapter_config.json`, the weights' tensor names and sovllm's
`manifest.json` (with the `base_id` the adapter was trained on) and returns what a server or a
trainer needs to decide: rank, target modules, and the list of features vLLM cannot serve (DoRA,
`modules_to_save`, trained biases, added or trainable tokens). Training refuses to write such an
adapter and serving refuses to load it, through this one function. The manifest may also hold the
adapter's refusal calibration (`RefusalCalibration`, written by `sovllm.train.calibrate`), which
sovllm's engine applies while decoding for that adapter.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sovllm.errors import AdapterError
from sovllm.models.grounding import Vocabulary
from sovllm.models.lora_check import MAX_CONFIG_BYTES, check_config, read_bounded
from sovllm.models.prompt import split_user_message

if TYPE_CHECKING:
    from sovllm.config import Config

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# the refusal calibration's df table makes a manifest grow with the training vocabulary: 60 MB of
# context text gave 5.6 MB; the bound only stops a file that would exhaust memory
MAX_MANIFEST_BYTES = 16 << 20
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass
class AdapterInfo:
    path: Path
    rank: int
    alpha: float
    target_modules: list[str]
    base_id: str | None  # None when the adapter has no sovllm manifest
    base_model_name_or_path: str | None
    unservable: list[str] = field(default_factory=list)
    refusal: RefusalCalibration | None = None


@dataclass
class RefusalCalibration:
    """A bias on the refusal sentence's first tokens, added while an answer so far is its beginning.

    Per request the bias is `bias - support_weight * support - line_weight * line support`, where
    support is the question's lexical support in its context and line support the same within the
    context's best line (`sovllm.models.grounding`); it applies to requests whose last user turn has
    the training prompt format (`sovllm.models.prompt`) and to no others."""

    token_ids: list[int]
    bias: float
    max_false_refusals: float = 0.0
    val: dict = field(default_factory=dict)  # how it was chosen: counts and rates on val before and after
    support_weight: float = 0.0
    vocabulary: Vocabulary | None = None  # document frequencies of the training contexts
    line_weight: float = 0.0

    def as_dict(self) -> dict:
        support = None
        if self.vocabulary is not None:
            support = {"weight": round(self.support_weight, 4), "line_weight": round(self.line_weight, 4),
                       "documents": self.vocabulary.documents, "df": self.vocabulary.df}
        return {"token_ids": self.token_ids, "bias": round(self.bias, 4), "max_false_refusals": self.max_false_refusals,
                "val": self.val, "support": support}

    @classmethod
    def from_dict(cls, data, where: str = "refusal_calibration") -> RefusalCalibration:
        hint = "retrain the adapter or remove refusal_calibration from its manifest"
        ids = data.get("token_ids") if isinstance(data, dict) else None
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and t >= 0 for t in ids):
            raise AdapterError(f"{where}: token_ids must be a non-empty list of token ids", hint=hint)
        try:
            bias = float(data["bias"])
        except (KeyError, TypeError, ValueError):
            raise AdapterError(f"{where}: bias must be a number", hint=hint) from None
        weight, line_weight, vocabulary = 0.0, 0.0, None
        support = data.get("support")
        if support is not None:
            def number(value) -> bool:
                return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
            df = support.get("df") if isinstance(support, dict) else None
            documents = support.get("documents") if isinstance(support, dict) else None
            raw_weight = support.get("weight") if isinstance(support, dict) else None
            raw_line = support.get("line_weight", 0.0) if isinstance(support, dict) else None  # absent in older manifests: none
            if not number(raw_weight) or not number(raw_line) \
                    or not isinstance(documents, int) or documents < 1 or not isinstance(df, dict) \
                    or not all(isinstance(k, str) and isinstance(v, int) and 0 <= v <= documents for k, v in df.items()):
                raise AdapterError(f"{where}: support must hold a weight >= 0, a line_weight >= 0, documents >= 1 "
                                   "and df (word -> number of training contexts that contain it)", hint=hint)
            weight, line_weight, vocabulary = float(raw_weight), float(raw_line), Vocabulary(documents, dict(df))
        return cls(list(ids), bias, float(data.get("max_false_refusals") or 0.0), dict(data.get("val") or {}),
                   weight, vocabulary, line_weight)

    def describe(self) -> str:
        """The per-request bias as a formula, for logs: "+8.83 - 14 x lexical support - 13 x line support"."""
        text = f"{self.bias:+.2f}"
        if self.vocabulary is not None:
            text += f" - {self.support_weight:g} x lexical support" if self.support_weight else ""
            text += f" - {self.line_weight:g} x line support" if self.line_weight else ""
        return text

    def bias_for(self, user_turn: str | None) -> float | None:
        """The bias for a request whose last user turn is `user_turn`; None outside the training format."""
        parts = split_user_message(user_turn)
        if parts is None:
            return None
        if self.vocabulary is None or not (self.support_weight or self.line_weight):
            return self.bias
        support, line = self.vocabulary.supports(*parts)
        return self.bias - self.support_weight * support - self.line_weight * line

    def apply(self, logits, generated: list[int], bias: float) -> None:
        """Add `bias` (in place) to the next refusal token while `generated` is the refusal's beginning."""
        n = len(generated)
        if n < len(self.token_ids) and generated == self.token_ids[:n] and self.token_ids[n] < logits.shape[-1]:
            logits[self.token_ids[n]] += bias


BASE_LABEL = "__base__"  # the base model, in per-adapter metrics
OTHER_LABEL = "__other__"  # a metric label for client-sent names that are invalid or beyond the bound


def bounded_label(name: object, seen: set[str], limit: int = 64) -> str:
    """A client-sent adapter name as a metric label value: only a valid adapter name, and at most
    `limit` distinct ones (remembered in `seen`); anything else is `__other__`, so clients cannot
    grow /metrics without bound or break its encoding."""
    if isinstance(name, str) and NAME_RE.match(name) and name != OTHER_LABEL:
        if name in seen or len(seen) < limit:
            seen.add(name)
            return name
    return OTHER_LABEL


MANIFEST_ONLY = ("manifest.json", "README.md")  # written from the manifest, so not hashed in it


def file_hashes(folder: str | Path) -> dict[str, str]:
    """sha256 of each file of an adapter folder (relative path → hex), except manifest.json and the
    README card written from it: what `sovllm train` records in the manifest's `files`."""
    from sovllm.artifacts import sha256_file

    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).as_posix() not in MANIFEST_ONLY}


def verify_files(folder: str | Path) -> int:
    """Check an adapter folder against its manifest's `files`: every listed file present with its
    sha256, no other file. Returns the number of files checked; AdapterError names the first problem."""
    folder = Path(folder)
    manifest = folder / "manifest.json"
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{manifest}: no readable adapter manifest ({type(exc).__name__})",
                           hint="copy the whole adapter folder sovllm train wrote") from None
    listed = data.get("files") if isinstance(data, dict) else None
    if not isinstance(listed, dict) or not listed:
        raise AdapterError(f"{manifest}: lists no file hashes (written before sovllm recorded them)",
                           hint="retrain the adapter with this sovllm ('sovllm train') to get a verifiable manifest")
    found = file_hashes(folder)
    for name, digest in sorted(listed.items()):
        if name not in found:
            raise AdapterError(f"{folder / name}: missing (the manifest lists it)", hint="copy the adapter again")
        if found[name] != digest:
            raise AdapterError(f"{folder / name}: sha256 {found[name][:16]}… differs from the manifest's {str(digest)[:16]}…",
                               hint="the copy is corrupt or was changed; copy the adapter again from its source")
    extra = sorted(set(found) - set(listed))
    if extra:
        raise AdapterError(f"{folder}: files the manifest does not list: {', '.join(extra[:5])}",
                           hint="remove them, or copy the adapter again from its source")
    return len(listed)


def validate_name(name: str) -> str:
    """Adapter names: 1–64 characters of letters, digits, '.', '_', '-', starting alphanumeric."""
    if not NAME_RE.match(name or ""):
        raise AdapterError(f"invalid adapter name {name!r}",
                           hint="use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return name


def adapter_name(cfg: Config) -> str:
    """The name a project's adapter is trained, served and evaluated under (`train.adapter_name`, by
    default the project name); AdapterError when it is not a valid adapter name."""
    return validate_name(cfg.train.adapter_name or cfg.project.name)


def _tensor_names(weights: Path) -> list[str]:
    if weights.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as fh:
            return list(fh.keys())
    return []  # pickled .bin weights are not opened here (arbitrary code); config checks still apply


def inspect_adapter(path: str | Path) -> AdapterInfo:
    """Read an adapter directory; AdapterError when it is not a PEFT LoRA adapter at all."""
    path = Path(path)
    config_file = path / ADAPTER_CONFIG
    if not config_file.is_file():
        raise AdapterError(f"{path}: no {ADAPTER_CONFIG}; not a PEFT adapter directory")
    raw = read_bounded(config_file, MAX_CONFIG_BYTES)
    try:
        config = json.loads(raw.decode("utf-8"))
    except ValueError as exc:  # UnicodeDecodeError is one
        raise AdapterError(f"{config_file}: unreadable ({exc})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{config_file}: must hold a JSON object, found {type(config).__name__}")
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise AdapterError(f"{path}: peft_type is {config.get('peft_type')!r}; only LoRA adapters are served")
    weights = next((path / w for w in ADAPTER_WEIGHTS if (path / w).is_file()), None)
    if weights is None:
        raise AdapterError(f"{path}: no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")

    unservable = []
    if config.get("use_dora"):
        unservable.append("DoRA (use_dora: true)")
    if config.get("modules_to_save"):
        unservable.append(f"modules_to_save {config['modules_to_save']}")
    if config.get("bias", "none") != "none":
        unservable.append(f"trained biases (bias: {config['bias']})")
    if config.get("trainable_token_indices"):
        unservable.append("trainable token embeddings (trainable_token_indices)")
    try:
        names = _tensor_names(weights)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types on corrupt files
        raise AdapterError(f"{weights}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    if any(re.search(r"(embed_tokens|lm_head|wte|embed_out)\.(weight|base_layer)", n) for n in names):
        unservable.append("full embedding or output weights (added tokens)")
    if any(n.endswith(".bias") and "lora_" in n for n in names):
        unservable.append("LoRA bias tensors (lora_bias)")
    if (path / "added_tokens.json").is_file():
        unservable.append("added tokens (added_tokens.json)")
    if not unservable:
        check_config(config, config_file)  # every other field: the allow-list of plain LoRA

    base_id, refusal = None, None
    manifest = path / "manifest.json"
    if manifest.is_file():
        raw = read_bounded(manifest, MAX_MANIFEST_BYTES, hint="restore the manifest sovllm train wrote, or remove it")
        try:
            data = json.loads(raw.decode("utf-8"))
        except ValueError:
            raise AdapterError(f"{manifest}: unreadable manifest") from None
        if not isinstance(data, dict):
            raise AdapterError(f"{manifest}: must hold a JSON object, found {type(data).__name__}",
                               hint="restore the manifest sovllm train wrote, or remove it")
        if data.get("model") is not None and not isinstance(data["model"], dict):
            raise AdapterError(f"{manifest}: field 'model' must be an object")
        base_id = data.get("base_id") or (data.get("model") or {}).get("base_id")
        if base_id is not None and not isinstance(base_id, str):
            raise AdapterError(f"{manifest}: field 'base_id' must be a string")
        if data.get("refusal_calibration") is not None:
            refusal = RefusalCalibration.from_dict(data["refusal_calibration"], f"{manifest}: refusal_calibration")
    targets = config.get("target_modules") or []
    rank, alpha = config.get("r", 0), config.get("lora_alpha", config.get("r", 1))
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterError(f"{config_file}: field 'r' must be a positive integer, found {str(rank)[:40]!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise AdapterError(f"{config_file}: field 'lora_alpha' must be a number, found {str(alpha)[:40]!r}")
    return AdapterInfo(
        path=path,
        rank=rank,
        alpha=float(alpha),
        target_modules=[targets] if isinstance(targets, str) else list(targets),
        base_id=base_id,
        base_model_name_or_path=config.get("base_model_name_or_path"),
        unservable=unservable,
        refusal=refusal,
    )


def check_servable(info: AdapterInfo, *, base_id: str, max_rank: int) -> None:
    """Refuse an adapter for another base, above the rank limit, or with features vLLM cannot serve."""
    if info.unservable:
        raise AdapterError(f"{info.path}: vLLM cannot serve this adapter: {', '.join(info.unservable)}",
                           hint="retrain it without these options")
    if info.base_id is not None and info.base_id != base_id:
        raise AdapterError(f"{info.path}: trained on base_id {info.base_id[:12]}…, but this server runs {base_id[:12]}…",
                           hint="serve it with the base model it was trained on")
    if info.rank > max_rank:
        raise AdapterError(f"{info.path}: LoRA rank {info.rank} exceeds --max-lora-rank {max_rank}",
                           hint=f"start the server with --max-lora-rank {info.rank} or higher")
