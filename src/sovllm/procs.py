"""Child processes that do not outlive the process that needs them."""

from __future__ import annotations

import os
import signal


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Ask Linux to send `sig` to this process when its parent exits (PR_SET_PDEATHSIG); False where
    that is not available. Called in a child before exec (as `preexec_fn`) or by the child itself;
    a child whose parent is already gone by then gets `sig` at once."""
    parent = os.getppid()
    try:
        import ctypes

        if ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(sig)) != 0:  # 1 = PR_SET_PDEATHSIG
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # the parent died before the request was in place
        os.kill(os.getpid(), sig)
    return True
