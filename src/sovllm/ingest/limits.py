"""Input limits of the ingest stage, and the per-file time budget.

A documents folder is untrusted input: one file must not be able to stop, hang or exhaust the
stage. Work in the loaders and the chunker is linear in a file's size; these limits bound the
size itself and, as a backstop for third-party parsers, the time spent on one file. A file over
a limit is skipped with the limit in its reason. The values are module attributes read at call
time, so tests (and embedding applications) can lower them.
"""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from typing import Iterator

MIB = 1 << 20
MAX_FILE_BYTES = 256 * MIB  # any file, checked (with stat) before it is opened
MAX_TEXT_BYTES = 16 * MIB  # text formats (Markdown, text, HTML), which are decoded as a whole
MAX_TEXT_CHARS = 16_000_000  # text extracted from one document (≈ 4 M tokens)
MAX_UNPACKED_BYTES = 512 * MIB  # the parts of a DOCX (a zip file) once unpacked
MAX_ZIP_MEMBERS = 10_000
MAX_XML_PART_BYTES = 64 * MIB  # one XML part of a DOCX (parsed into memory as a tree)
MAX_METADATA_CHARS = 64 * 1024  # a document's metadata (as JSON): it is copied into every chunk
MAX_YAML_DEPTH = 32  # nesting of front matter and sidecar YAML
TIME_BUDGET_S = 300.0  # loading and chunking one file


def mib(n_bytes: int) -> str:
    return f"{n_bytes / MIB:.1f} MiB"


class TimeBudgetExceeded(BaseException):
    """Raised inside the work on one file when its time budget runs out.

    A BaseException (like KeyboardInterrupt), so that a loader's `except Exception` cannot turn
    it into a misleading "corrupt file" reason.
    """


@contextmanager
def time_budget(seconds: float | None) -> Iterator[None]:
    """Raise `TimeBudgetExceeded` in the body once `seconds` have passed (SIGALRM; main thread only).

    Regular expressions and pure-Python parsers are interrupted; a C extension is interrupted
    when it returns. Without SIGALRM, off the main thread, or when an earlier alarm is already
    due sooner, the body runs without a budget (the loaders are linear-time regardless).
    """
    if not seconds or seconds <= 0 or not hasattr(signal, "setitimer") \
            or threading.current_thread() is not threading.main_thread():
        yield
        return
    pending, interval = signal.getitimer(signal.ITIMER_REAL)
    if pending and pending <= seconds:
        yield
        return

    def on_alarm(signum, frame):
        raise TimeBudgetExceeded(f"took longer than {seconds:g} s to load and chunk (the per-file time budget)")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    started = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if pending:  # give back someone else's alarm, less the time we used
            signal.setitimer(signal.ITIMER_REAL, max(pending - (time.monotonic() - started), 1e-3), interval)
