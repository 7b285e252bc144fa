"""The run's peak memory counts child processes and is reported in GB (10⁹ bytes)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest


def test_peak_memory_counts_a_child_process_in_gb():
    pytest.importorskip("psutil")
    from sovllm.pipeline.memory import PeakMemory

    # a child that holds 300 MB of touched pages until its stdin closes
    child = ("import sys\nb = bytearray(300_000_000)\nb[::4096] = b'x' * len(b[::4096])\n"
             "print('ready', flush=True)\nsys.stdin.read()")
    with PeakMemory(interval=0.1) as memory:
        before = memory.sample()
        proc = subprocess.Popen([sys.executable, "-c", child], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline() == "ready\n"
            samples_when_ready = memory.samples
            deadline = time.monotonic() + 30  # wait for the sampler to see the child, not for a fixed time
            while memory.samples < max(samples_when_ready + 2, 4) and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            proc.stdin.close()
            proc.wait(timeout=30)
    assert memory.samples > 3
    assert memory.peak_bytes - before >= 300_000_000
    assert memory.peak_gb == round(memory.peak_bytes / 1e9, 3)
