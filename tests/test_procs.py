"""A child started with `dies_with_parent` (or calling `die_with_parent`) does not outlive its parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

PARENT = """
import subprocess, sys, time
from sovllm.procs import dies_with_parent
mode = sys.argv[1]
if mode == "preexec":
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], preexec_fn=dies_with_parent(9))
else:
    child = subprocess.Popen([sys.executable, "-c", "from sovllm.procs import die_with_parent; "
                              "assert die_with_parent(9); print('ready', flush=True); import time; time.sleep(60)"],
                             stdout=subprocess.PIPE, text=True)
    child.stdout.readline()
print(child.pid, flush=True)
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" not in f.read().lower()
    except OSError:
        return False


@pytest.mark.parametrize("mode", ["preexec", "self"])
def test_the_child_dies_when_its_parent_is_killed(mode):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, mode], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert _alive(child)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)
