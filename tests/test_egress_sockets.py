"""Socket kinds and address forms the guard cannot judge are refused, with loopback stand-ins only:
127.0.0.2 plays a forbidden outside host."""

from __future__ import annotations

import _socket
import os
import socket
import sys

import pytest

from sovllm import egress
from sovllm.egress import EgressUnguardableError
from sovllm.errors import EgressBlockedError
from tests.test_egress import outside  # noqa: F401 - the fixture


@pytest.mark.parametrize("host", [bytearray(b"127.0.0.2"), b"127.0.0.2", bytearray(b"::ffff:127.0.0.2")])
def test_bytes_like_hosts_are_checked(host, outside):
    egress.install([])
    family = socket.AF_INET6 if b":" in host else socket.AF_INET
    with pytest.raises(EgressBlockedError, match="127.0.0.2"):
        socket.socket(family).connect((host, outside.port))
    with pytest.raises(EgressBlockedError):
        socket.socket(family).connect_ex((host, outside.port))
    assert outside.close() == []


def test_bytearray_host_cannot_send_udp():
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.2", 0))
    receiver.settimeout(0.5)
    egress.install([])
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with pytest.raises(EgressBlockedError):
        sender.sendto(b"x", (bytearray(b"127.0.0.2"), receiver.getsockname()[1]))
    with pytest.raises(EgressBlockedError):
        sender.sendmsg([b"x"], [], 0, (bytearray(b"127.0.0.2"), receiver.getsockname()[1]))
    with pytest.raises(TimeoutError):  # nothing queued: the sends above were refused, not sent
        receiver.recv(10)
    receiver.close()


RAW_KINDS = {
    "inet-raw": (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW),
    "inet6-raw": (socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW),
    "inet-raw-icmp-nonblock": (socket.AF_INET, socket.SOCK_RAW | getattr(socket, "SOCK_NONBLOCK", 0),
                               socket.IPPROTO_ICMP),
}
if hasattr(socket, "AF_PACKET"):
    RAW_KINDS.update({"packet-raw": (socket.AF_PACKET, socket.SOCK_RAW, 0),
                      "packet-dgram": (socket.AF_PACKET, socket.SOCK_DGRAM, 0)})


@pytest.mark.parametrize("kind", RAW_KINDS.values(), ids=RAW_KINDS.keys())
def test_raw_ip_and_packet_sockets_are_refused(kind):
    egress.install([])
    with pytest.raises(EgressUnguardableError, match="egress blocked"):
        socket.socket(*kind)


def test_raw_socket_opened_before_the_guard_cannot_send_or_be_adopted():
    try:
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    except PermissionError:
        pytest.skip("opening a raw socket needs CAP_NET_RAW")
    egress.install([])
    with pytest.raises(EgressUnguardableError):
        raw.sendto(b"x", ("127.0.0.2", 0))
    with pytest.raises(EgressUnguardableError):
        raw.connect(("127.0.0.1", 0))
    fd = os.dup(raw.fileno())
    with pytest.raises(EgressUnguardableError):
        socket.socket(fileno=fd)  # the kind shows only once the descriptor is adopted
    with pytest.raises(EgressUnguardableError):
        socket.fromfd(raw.fileno(), socket.AF_INET, socket.SOCK_RAW)
    os.close(fd)
    raw.close()


def test_bare_c_sockets_are_refused_but_local_sockets_work(tmp_path):
    egress.install([])
    with pytest.raises(EgressUnguardableError, match="_socket.socket"):
        _socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # its methods resolve names before any check
    with pytest.raises(EgressUnguardableError):
        socket.socket(getattr(socket, "AF_VSOCK", 40), socket.SOCK_STREAM)  # leaves the machine to the host
    _socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close()
    a, b = socket.socketpair()
    a.sendall(b"local")
    assert b.recv(10) == b"local"
    a.close(), b.close()
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "s"))
    server.listen(1)
    client = socket.socket(socket.AF_UNIX)
    client.connect(str(tmp_path / "s"))
    client.close(), server.close()
    if hasattr(socket, "AF_NETLINK"):
        socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0).close()
    listener = socket.create_server(("0.0.0.0", 0))  # binding to any local address sends nothing
    listener.close()


@pytest.fixture
def fake_uvloop(tmp_path, monkeypatch):
    """An importable stand-in for uvloop (not installed here), removed from sys.modules afterwards."""
    package = tmp_path / "uvloop"
    package.mkdir()
    (package / "__init__.py").write_text("def new_event_loop():\n    raise RuntimeError('stand-in uvloop')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("uvloop", "uvicorn.loops.uvloop"):
        sys.modules.pop(name, None)
    yield
    for name in ("uvloop", "uvicorn.loops.uvloop"):
        sys.modules.pop(name, None)


def test_uvicorn_auto_loop_falls_back_to_asyncio_under_the_guard(fake_uvloop):
    import asyncio

    from uvicorn.loops.auto import auto_loop_factory

    assert auto_loop_factory().__module__ == "uvloop"  # control: without the guard it would pick uvloop
    for name in ("uvloop", "uvicorn.loops.uvloop"):
        sys.modules.pop(name, None)
    egress.install([])
    assert issubclass(auto_loop_factory(), asyncio.BaseEventLoop)
    assert "uvloop" not in sys.modules
    for name in ("uvloop", "aiodns", "pycares", "pycurl"):
        with pytest.raises(ImportError, match="egress guard"):
            __import__(name)
