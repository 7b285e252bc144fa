"""Reading a text document safely: bounded, regular files only, and decoded with a clear reason when not.

Every text-based loader (Markdown, plain text, HTML) reads through `read_limited` and
`decode_text`, so a FIFO, a huge file or undecodable bytes become a `SkipDocument` with a reason
the ingest stage reports, never a hang or a crash.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from sovllm.ingest import limits
from sovllm.ingest.document import SkipDocument


def read_limited(path: Path) -> bytes:
    """The bytes of a regular file of at most `limits.MAX_TEXT_BYTES`; `SkipDocument` otherwise.

    Opened without blocking and checked with `fstat` on the open file, so a FIFO or device put
    in place after discovery is refused instead of read forever.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise SkipDocument(f"unreadable ({exc.strerror or exc})") from None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise SkipDocument("not a regular file")
        if info.st_size > limits.MAX_TEXT_BYTES:
            raise SkipDocument(f"too large for a text format ({limits.mib(info.st_size)}; "
                               f"the limit is {limits.mib(limits.MAX_TEXT_BYTES)})")
        try:
            data = fh.read(limits.MAX_TEXT_BYTES + 1)
        except OSError as exc:
            raise SkipDocument(f"unreadable ({exc.strerror or exc})") from None
    if len(data) > limits.MAX_TEXT_BYTES:  # grew after fstat
        raise SkipDocument(f"too large for a text format (over {limits.mib(limits.MAX_TEXT_BYTES)})")
    return data


def decode_text(data: bytes, declared: str | None = None) -> str:
    """Decode a text file's bytes: UTF-8 (BOM optional), UTF-16 with BOM, or a charset the file declares."""
    if not data.strip():
        raise SkipDocument("empty file")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as exc:
            raise SkipDocument(f"not valid UTF-16 despite its byte order mark (at offset {exc.start})") from None
    if b"\x00" in data[:8192]:
        raise SkipDocument("binary content (NUL bytes) in a text format")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        bad = data[exc.start]
        reason = f"not valid UTF-8 (byte 0x{bad:02x} at offset {exc.start})"
    if declared:
        try:
            return data.decode(declared)
        except (LookupError, UnicodeError, ValueError):
            # an unknown label, a codec that always fails ("undefined") or wrong bytes for it
            reason += f" nor in its declared charset '{declared[:40]}'"
    raise SkipDocument(f"{reason}; re-save it as UTF-8")


def read_text(path: Path, declared: str | None = None) -> str:
    """Read and decode a text file (see `read_limited` and `decode_text`)."""
    return decode_text(read_limited(path), declared)
