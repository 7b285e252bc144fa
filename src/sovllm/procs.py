"""Child processes that do not outlive the process that needs them, and servers' listening sockets."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

PR_SET_PDEATHSIG = 1


def _prctl():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Ask Linux to send `sig` to this process when its parent exits (PR_SET_PDEATHSIG); False where
    that is not available. A process whose parent is already gone by then gets `sig` at once."""
    parent, prctl = os.getppid(), _prctl()
    if prctl is None or prctl(PR_SET_PDEATHSIG, int(sig)) != 0:
        return False
    if os.getppid() != parent:  # the parent died before the request was in place
        os.kill(os.getpid(), sig)
    return True


def dies_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A `preexec_fn` for `subprocess.Popen`: the child gets `sig` when the process that started it
    dies. libc's prctl is looked up here, in the parent, so the forked child only calls it (no
    import or dlopen between fork and exec, where another thread's lock could be held)."""
    prctl = _prctl()
    if prctl is None:
        return None

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(sig))

    return preexec


def listening_socket(host: str, port: int):
    """A TCP socket bound to (host, port) for uvicorn's `sockets=` (port 0: any free one), or a one-line error."""
    import socket

    from sovllm.errors import BackendError

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # accepted connections inherit it: without it a response's body waits behind its headers for the
    # client's delayed ACK (40 ms on Linux), and each streamed event behind the previous one
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise BackendError(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                           hint="choose another --port, or --port 0 for any free one") from None
    return sock
