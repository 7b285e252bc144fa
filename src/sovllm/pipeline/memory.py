"""Peak memory of a run: the summed RSS of this process and all its children, sampled every 0.5 s.

The embedded server runs as a child process and training runs inside the run's own process, so
the process tree is what a user's machine must hold. psutil (in the train extra) reads it; without
psutil nothing is sampled. `release_memory` hands the heap that training freed back to the
operating system, so the restarted server of the eval stage does not sit on top of it.
"""

from __future__ import annotations

import ctypes
import gc
import sys
import threading


def release_memory() -> None:
    """Collect garbage and return freed heap pages to the OS (glibc's malloc keeps them otherwise)."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass


class PeakMemory:
    """A context manager that samples the process tree's summed RSS in a daemon thread."""

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self.peak_bytes = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> int:
        import psutil

        me = psutil.Process()
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return total

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak_bytes = max(self.peak_bytes, self.sample())
                self.samples += 1
            except Exception:  # noqa: BLE001 - sampling must never break a run
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        try:
            import psutil  # noqa: F401
        except ImportError:
            return self
        self._thread = threading.Thread(target=self._loop, name="sovllm-peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    @property
    def peak_gb(self) -> float | None:
        """Peak in GB (10⁹ bytes, the unit the figures are printed and documented in)."""
        return round(self.peak_bytes / 1e9, 3) if self.samples else None
