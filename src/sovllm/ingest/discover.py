"""Finding the documents in a documents folder, and refusing entries that are not documents.

Only regular files are read. A FIFO or device would block or never end (a symlink to /dev/zero
named `notes.md`), so such entries are skipped from their `lstat`, before anything opens them. A
symbolic link is followed only when it resolves to a regular file inside the documents folder:
a link out of the folder could pull any file the user can read (keys, other projects' data) into
chunks that are later sent to a model endpoint, which is a sovereignty decision the folder's
owner has not made. Links to folders are never followed (no loops). The walk is iterative, so
folder depth cannot exhaust Python's recursion limit, and a name that is not valid UTF-8 is
reported (with its bytes escaped) instead of breaking the JSON outputs.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from sovllm.errors import InputError
from sovllm.ingest import limits

SIDECAR = ".meta.yaml"
_KINDS = [(stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")]


def discover(folder: Path) -> list[Path]:
    """Document candidates below `folder`, sorted by relative path; hidden entries and sidecars excluded.

    Candidates include entries that `check_file` then refuses (links to folders, pipes, folders
    that could not be listed), so that every one of them is reported, not silently dropped.
    """
    if not folder.is_dir():
        raise InputError(f"{folder}: documents folder not found",
                         hint="put your files there or set project.documents in sovllm.yaml")
    found: list[Path] = []
    pending = [folder]
    while pending:
        directory = pending.pop()
        try:
            with os.scandir(directory) as it:
                entries = list(it)
        except OSError as exc:
            if directory == folder:
                raise InputError(f"{folder}: documents folder cannot be read ({exc.strerror or exc})",
                                 hint="check its permissions") from None
            found.append(directory)
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                is_dir = False
            if is_dir:
                pending.append(Path(entry.path))
            elif not entry.name.endswith(SIDECAR):
                found.append(Path(entry.path))
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def display_path(path: Path, folder: Path) -> str:
    """The path relative to `folder` (POSIX), with bytes that are not UTF-8 shown as \\xNN."""
    rel = path.relative_to(folder).as_posix()
    return os.fsencode(rel).decode("utf-8", "backslashreplace")


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a file")


def check_file(path: Path, folder: Path) -> str | None:
    """Why `path` (found by `discover`) is not read, or None when it is a regular file to load."""
    try:
        path.relative_to(folder).as_posix().encode("utf-8")
    except UnicodeEncodeError:
        return "file name is not valid UTF-8; rename it (chunk sources and ids are UTF-8 text)"
    try:
        info = os.lstat(path)
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if stat.S_ISLNK(info.st_mode):
        try:
            info = os.stat(path)
        except OSError as exc:
            return f"unreadable (broken symbolic link: {exc.strerror or exc})"
        if stat.S_ISDIR(info.st_mode):
            return "symbolic link to a folder (not followed)"
        root, target = os.path.realpath(folder), os.path.realpath(path)
        if os.path.commonpath([root, target]) != root:
            return "symbolic link to a file outside the documents folder (not followed)"
    if stat.S_ISDIR(info.st_mode):
        return "folder could not be read (check its permissions)"
    if not stat.S_ISREG(info.st_mode):
        return f"not a regular file: {_kind(info.st_mode)}"
    if info.st_size > limits.MAX_FILE_BYTES:
        return f"too large ({limits.mib(info.st_size)}; the limit is {limits.mib(limits.MAX_FILE_BYTES)} per file)"
    return None
