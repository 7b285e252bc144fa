"""API keys: kept only as sha256 digests, read from the config, files or environment variables.

Keys are long random strings, so a plain sha256 is the right digest (a slow password hash protects
guessable secrets, at a cost on every request). A key file is re-read when it changes, which is how a
key is rotated without a restart: add the new key, move the clients, remove the old one.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from sovllm.config import KeySource
from sovllm.errors import ConfigError

KEY_PREFIX = "sk-sovllm-"


def digest(key: str) -> str:
    """The sha256 hex digest a key is stored and compared as."""
    return hashlib.sha256(key.strip().encode("utf-8")).hexdigest()


def new_key() -> str:
    """A fresh random key (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def bearer(header: str | None) -> str | None:
    """The key in an `Authorization: Bearer <key>` header (None when missing or malformed)."""
    if not header or header[:7].lower() != "bearer ":
        return None
    return header[7:].strip() or None


@dataclass
class KeyRing:
    """Digest → owner for every configured key; `refresh()` re-reads files that changed."""

    sources: list[tuple[str, KeySource]]  # (owner, source)
    root: Path
    owners: dict[str, str] = field(default_factory=dict)
    _stamps: dict[Path, float] = field(default_factory=dict)
    _from_files: dict[Path, dict[str, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._static: dict[str, str] = {}
        for owner, source in self.sources:
            if source.sha256:
                self._add(self._static, source.sha256, owner, "sha256")
            elif source.env:
                lines = [line for line in os.environ.get(source.env, "").splitlines() if line.strip()]
                if not lines:
                    raise ConfigError(f"gateway key of '{owner}': environment variable {source.env} is empty or "
                                      "unset", hint="export it, or give the key's sha256 in the config")
                for line in lines:
                    self._add(self._static, digest(line), owner, f"env {source.env}")
        self.refresh(strict=True)

    def _add(self, table: dict[str, str], key_digest: str, owner: str, where: str) -> None:
        other = table.get(key_digest) or self._static.get(key_digest)
        if other is not None and other != owner:
            raise ConfigError(f"gateway key from {where}: the same key belongs to '{other}' and '{owner}'",
                              hint="every tenant needs its own keys")
        table[key_digest] = owner

    def _path(self, source: KeySource) -> Path:
        path = Path(source.file)
        return path if path.is_absolute() else self.root / path

    def refresh(self, strict: bool = False) -> bool:
        """Re-read key files whose modification time changed; True when the key set changed.

        At start (`strict`) an unreadable or empty file is an error; later it keeps the last good keys,
        so a Secret being rewritten never locks everyone out."""
        changed = False
        for owner, source in self.sources:
            if not source.file:
                continue
            path = self._path(source)
            try:
                stamp = path.stat().st_mtime_ns
                if self._stamps.get(path) == stamp and not strict:
                    continue
                lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            except (OSError, UnicodeDecodeError) as exc:
                if strict:
                    raise ConfigError(f"{path}: cannot read the keys of '{owner}' ({exc})") from None
                continue
            if not lines:
                if strict:
                    raise ConfigError(f"{path}: holds no key for '{owner}'", hint="write one key per line")
                continue
            table: dict[str, str] = {}
            for line in lines:
                self._add(table, digest(line), owner, str(path))
            self._stamps[path] = stamp
            changed |= self._from_files.get(path) != table
            self._from_files[path] = table
        owners = dict(self._static)
        for table in self._from_files.values():
            owners.update(table)
        self.owners = owners
        return changed

    def owner(self, key: str | None) -> str | None:
        """Who a presented key belongs to (None: unknown). A dict lookup on the digest: no timing leak
        about the key itself, since the digest of a guess says nothing about the real key."""
        return self.owners.get(digest(key)) if key else None
