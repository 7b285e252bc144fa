"""Copy a base model and adapters from an S3-compatible object store onto local disk, verified.

This is what the serving Deployment's init container runs (`sovllm models fetch`, rendered by
`sovllm render k8s`): nothing is downloaded from a model hub, and nothing reaches the serving
container unless its sha256 matches what training recorded:

- an adapter archive (`.tgz`, one top-level folder: the adapter itself, or the train stage's
  output folder with the adapter in `adapter/`) must match its manifest's `files` hashes
  (`sovllm.models.adapter.verify_files`);
- the base model archive (one top-level folder: a Hugging Face model directory) must have the
  weights hash (`base_id`) every adapter's manifest names, or `--base-id` when given.

Archives are unpacked into a staging folder beside the target and renamed into place, so a pod
killed mid-copy never leaves a half-written model; a target that is already present and verifies
is kept (a restarted pod on its persistent volume does not download again). Credentials come from
`AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (the rendered Deployment reads them from a Secret).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from sovllm.errors import AdapterError, ModelError
from sovllm.models.adapter import validate_name, verify_files
from sovllm.models.registry import weights_sha256
from sovllm.objectstore import Store, unpack


def _adapter_folder(unpacked: Path) -> Path:
    if (unpacked / "adapter_config.json").is_file():
        return unpacked
    if (unpacked / "adapter" / "adapter_config.json").is_file():  # the train stage's output folder
        return unpacked / "adapter"
    raise AdapterError(f"{unpacked.name}: no adapter_config.json at the top or in adapter/",
                       hint="the archive must hold an adapter folder, or the folder 'sovllm train' wrote")


def _base_id_of(adapter: Path) -> str | None:
    try:
        return json.loads((adapter / "manifest.json").read_text(encoding="utf-8")).get("base_id")
    except (OSError, ValueError, AttributeError):
        return None


def _place(staged: Path, target: Path) -> None:
    aside = target.with_name(f".{target.name}.old")
    shutil.rmtree(aside, ignore_errors=True)
    if target.exists():
        os.replace(target, aside)
    os.replace(staged, target)
    shutil.rmtree(aside, ignore_errors=True)


def fetch(store: Store, *, base_key: str, adapters: dict[str, str], to: Path, base_id: str | None = None,
          log: Callable[[str], None] = print) -> dict:
    """Download and verify the base model into `to/base` and each adapter into `to/adapters/<name>`.
    Returns what was placed: {"base": {...}, "adapters": {name: {...}}}."""
    to = Path(to)
    (to / "adapters").mkdir(parents=True, exist_ok=True)
    done: dict = {"base": {}, "adapters": {}}
    expected = {base_id} if base_id else set()
    for name, key in adapters.items():
        validate_name(name)
        target = to / "adapters" / name
        if target.is_dir():
            try:
                files = verify_files(target)
                log(f"adapter {name}: already present and verified ({files} files)")
                done["adapters"][name] = {"key": key, "files": files, "downloaded": False}
                expected.add(_base_id_of(target))
                continue
            except AdapterError as exc:
                log(f"adapter {name}: present copy does not verify ({exc}); downloading again")
        with tempfile.TemporaryDirectory(dir=to, prefix=f".{name}.") as tmp:
            archive = Path(tmp) / "archive.tgz"
            store.download(key, archive)
            adapter = _adapter_folder(unpack(archive, Path(tmp) / "unpacked"))
            files = verify_files(adapter)
            expected.add(_base_id_of(adapter))
            _place(adapter, target)
        log(f"adapter {name}: s3://{store.bucket}/{key} → {target}, {files} files verified")
        done["adapters"][name] = {"key": key, "files": files, "downloaded": True}
    expected.discard(None)
    if len(expected) > 1:
        raise AdapterError(f"the adapters were trained on different base models (base_id {', '.join(sorted(e[:16] for e in expected))})",
                           hint="serve adapters of one base model per deployment")
    want = next(iter(expected), None)
    target = to / "base"
    if target.is_dir() and want and _weights(target) == want:
        log(f"base model: already present and verified (base_id {want[:16]}…)")
        done["base"] = {"key": base_key, "base_id": want, "downloaded": False}
        return done
    with tempfile.TemporaryDirectory(dir=to, prefix=".base.") as tmp:
        archive = Path(tmp) / "archive.tgz"
        store.download(base_key, archive)
        base = unpack(archive, Path(tmp) / "unpacked")
        got = _weights(base)
        if got is None:
            raise ModelError(f"s3://{store.bucket}/{base_key}: no weight files (*.safetensors or *.bin) in the archive",
                             hint="archive the prepared model folder ('sovllm models list' shows where it is)")
        if want and got != want:
            raise ModelError(f"s3://{store.bucket}/{base_key}: weights hash {got[:16]}… is not the adapters' base "
                             f"model ({want[:16]}…)", hint="upload the base model the adapters were trained on")
        _place(base, target)
    log(f"base model: s3://{store.bucket}/{base_key} → {target}, base_id {got[:16]}…"
        + (" verified" if want else " (no adapter or --base-id to check it against)"))
    done["base"] = {"key": base_key, "base_id": got, "downloaded": True}
    return done


def _weights(folder: Path) -> str | None:
    try:
        return weights_sha256(folder)
    except ModelError:
        return None
