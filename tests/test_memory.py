"""The run's peak memory counts child processes and is reported in GB (10⁹ bytes)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest


def test_peak_memory_counts_a_child_process_in_gb():
    pytest.importorskip("psutil")
    from sovllm.pipeline.memory import PeakMemory

    # a child that holds 300 MB of touched pages for a second
    child = "b = bytearray(300_000_000)\nb[::4096] = b'x' * len(b[::4096])\nimport time; time.sleep(1.5)"
    with PeakMemory(interval=0.1) as memory:
        before = memory.sample()
        proc = subprocess.Popen([sys.executable, "-c", child])
        time.sleep(1.2)
        proc.wait(timeout=30)
    assert memory.samples > 3
    assert memory.peak_bytes - before >= 300_000_000
    assert memory.peak_gb == round(memory.peak_bytes / 1e9, 3)
