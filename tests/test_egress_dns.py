"""No DNS query for a name outside egress.allow, observed at a real resolver.

The test runs a harness (this file, run as a script) in a private network and mount namespace
(`unshare --net --mount`, with `--map-root-user` when not root): only a loopback interface exists
there, so nothing can leave the machine even if the guard were broken. The harness bind-mounts its
own /etc/resolv.conf (nameserver 127.0.0.1), /etc/hosts and /etc/nsswitch.conf (`hosts: files dns`,
so no lookup goes to nscd or systemd-resolved through a Unix socket), runs a stand-in DNS server on
127.0.0.1:53 that records every query, TCP listeners on 127.0.0.2 (an outside host) and 127.0.0.3
(an allowed one), and a guarded child that tries every socket API with a unique name each.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path

import pytest

SENTINEL = "sentinel.harness.test"
# Names the hosts file maps to the outside stand-in: each is judged as loopback by a guard that takes
# the part before % or inside [] for the address, and then reaches 127.0.0.2.
HOSTS_ENTRIES = ["127.0.0.1%x.leak.test", "[127.0.0.1]", "localhost%x.leak.test"]
# An IPv6 literal with a zone id is an address for the C resolver too (glibc never looks it up as a
# name, whatever the hosts file says), so it is judged as ::1 and fails there, not at 127.0.0.2.
ZONED_V6 = "::1%x.leak.test"

CHILD = textwrap.dedent("""
    import _socket, asyncio, json, socket, ssl, sys
    outside, allowed = int(sys.argv[1]), int(sys.argv[2])
    out = {}

    def attempt(label, fn):
        try:
            fn()
            out[label] = "ok"
        except Exception as exc:
            out[label] = type(exc).__name__

    # Control, before the guard: connect() with a name does reach this resolver.
    attempt("control-unguarded", lambda: socket.socket().connect(("control-unguarded.leak.test", outside)))
    from sovllm import egress
    egress.install(["127.0.0.3", "intranet.test"])

    class Sneaky(str):  # a str whose own methods claim it is localhost
        def __str__(self): return "localhost"
        def lower(self): return "localhost"
        def rstrip(self, *a): return "localhost"

    async def sock_connect(address):
        sock = socket.socket()
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, address)

    class Disguised(socket.socket):  # its Python property claims a Unix socket
        family = socket.AF_UNIX

    tcp = lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    udp = lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probes = {
        "connect": lambda: tcp().connect(("connect.leak.test", outside)),
        "connect_ex": lambda: tcp().connect_ex(("connect-ex.leak.test", outside)),
        "connect-v6": lambda: socket.socket(socket.AF_INET6).connect(("connect-v6.leak.test", outside)),
        "secret-in-label": lambda: tcp().connect(("secret-in-label.leak.test", outside)),
        "bytes-host": lambda: tcp().connect((b"bytes-host.leak.test", outside)),
        "bytearray-host": lambda: tcp().connect((bytearray(b"bytearray-host.leak.test"), outside)),
        "str-subclass-host": lambda: tcp().connect((Sneaky("str-subclass.leak.test"), outside)),
        "family-disguised": lambda: Disguised(socket.AF_INET, socket.SOCK_STREAM).connect(
            ("family-disguised.leak.test", outside)),
        "sendto": lambda: udp().sendto(b"x", ("sendto.leak.test", outside)),
        "sendto-flags": lambda: udp().sendto(b"x", 0, ("sendto-flags.leak.test", outside)),
        "sendmsg": lambda: udp().sendmsg([b"x"], [], 0, ("sendmsg.leak.test", outside)),
        "bind": lambda: tcp().bind(("bind.leak.test", 0)),
        "create_connection": lambda: socket.create_connection(("create-connection.leak.test", outside), 5),
        "create_connection-source": lambda: socket.create_connection(
            ("127.0.0.1", outside), 5, source_address=("source-address.leak.test", 0)),
        "getaddrinfo": lambda: socket.getaddrinfo("getaddrinfo.leak.test", 80),
        "_socket.getaddrinfo": lambda: _socket.getaddrinfo("raw-getaddrinfo.leak.test", 80),
        "gethostbyname": lambda: socket.gethostbyname("gethostbyname.leak.test"),
        "gethostbyname_ex": lambda: socket.gethostbyname_ex("gethostbyname-ex.leak.test"),
        "_socket.gethostbyname": lambda: _socket.gethostbyname("raw-gethostbyname.leak.test"),
        "gethostbyaddr": lambda: socket.gethostbyaddr("gethostbyaddr.leak.test"),
        "getfqdn-name": lambda: socket.gethostbyaddr(socket.getfqdn("getfqdn.leak.test")),
        "ssl-connect": lambda: ssl.create_default_context().wrap_socket(
            tcp(), server_hostname="ssl.leak.test").connect(("ssl-connect.leak.test", outside)),
        "asyncio": lambda: asyncio.run(asyncio.open_connection("asyncio.leak.test", outside)),
        "asyncio-sock_connect": lambda: asyncio.run(sock_connect(("sock-connect.leak.test", outside))),
    }
    for label, fn in probes.items():
        attempt(label, fn)
    for name in json.loads(sys.argv[3]):  # names the hosts file maps to the outside stand-in
        attempt("hosts:" + name, lambda: tcp().connect((name, outside)))
    zoned = sys.argv[4]
    attempt("zoned-v6", lambda: tcp().connect((zoned, outside)))
    # Control, under the guard: an allowed name is resolved by this resolver and reached.
    with socket.create_connection(("intranet.test", allowed), 5) as conn:
        conn.sendall(b"allowed")
    c = tcp(); c.connect(("intranet.test", allowed)); c.sendall(b"allowed-connect"); c.close()
    out["allowed"] = "sent"
    print(json.dumps(out))
""")


def _qname(data: bytes) -> tuple[str, int, int]:
    """(name, qtype, end of the question) of a DNS query."""
    i, labels = 12, []
    while data[i]:
        labels.append(data[i + 1:i + 1 + data[i]].decode("latin-1"))
        i += 1 + data[i]
    return ".".join(labels), struct.unpack(">H", data[i + 1:i + 3])[0], i + 5


class StandInResolver:
    """A UDP DNS server on 127.0.0.1:53 that records every query; A records only for `answers`."""

    def __init__(self, answers: dict[str, str]):
        self.answers = answers
        self.queries: list[tuple[str, int]] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 53))
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            data, peer = self.sock.recvfrom(4096)
            name, qtype, end = _qname(data)
            question = data[12:end]
            if name == SENTINEL:
                self.sock.sendto(data[:2] + b"\x81\x83" + data[4:6] + bytes(6) + question, peer)
                return
            self.queries.append((name, qtype))
            if name in self.answers:
                answer = b""
                if qtype == 1:
                    answer = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + socket.inet_aton(self.answers[name])
                header = data[:2] + b"\x81\x80" + data[4:6] + struct.pack(">HHH", 1 if answer else 0, 0, 0)
                self.sock.sendto(header + question + answer, peer)
            else:  # NXDOMAIN
                self.sock.sendto(data[:2] + b"\x81\x83" + data[4:6] + bytes(6) + question, peer)

    def flush(self) -> list[tuple[str, int]]:
        """All queries received so far: the sentinel is answered only after every earlier datagram."""
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.settimeout(30)
        name = b"".join(bytes([len(p)]) + p.encode() for p in SENTINEL.split(".")) + b"\x00"
        probe.sendto(b"\x12\x34\x01\x00\x00\x01" + bytes(6) + name + b"\x00\x01\x00\x01", ("127.0.0.1", 53))
        probe.recv(512)
        self.thread.join(30)
        return self.queries


class Listener:
    """A TCP listener that records what each connection sends; `close()` also takes the queued ones."""

    def __init__(self, host: str):
        self.sock = socket.create_server((host, 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:  # TimeoutError: look at the stop flag again
                continue
            self._take(conn)

    def _take(self, conn):
        with conn:
            conn.settimeout(30)  # returns at once when the peer sends or closes
            try:
                self.received.append(conn.recv(100))
            except OSError:
                self.received.append(b"")

    def close(self) -> list[str]:
        self._stop.set()
        self._thread.join(60)
        self.sock.setblocking(False)
        while True:  # a connect() that returned in the child is in the queue by now
            try:
                conn, _ = self.sock.accept()
            except OSError:
                break
            conn.setblocking(True)
            self._take(conn)
        self.sock.close()
        return [r.decode("latin-1") for r in self.received]


def _loopback_up() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    flags = struct.unpack("16sH", fcntl.ioctl(sock, 0x8913, struct.pack("16sH22x", b"lo", 0))[:18])[1]  # SIOCGIFFLAGS
    fcntl.ioctl(sock, 0x8914, struct.pack("16sH22x", b"lo", flags | 1))  # SIOCSIFFLAGS |= IFF_UP
    sock.close()


def _bind_mount(source: Path, target: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(str(source).encode(), target.encode(), None, 4096, None) != 0:  # MS_BIND
        raise OSError(ctypes.get_errno(), f"bind-mounting {source} on {target}")


def harness() -> None:
    """Inside the namespaces: set up resolver, hosts and listeners, run the guarded child, print JSON."""
    _loopback_up()
    work = Path(tempfile.mkdtemp(prefix="sovllm-dns-"))
    (work / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:30 attempts:1\n")
    (work / "hosts").write_text("127.0.0.1 localhost\n::1 localhost\n"
                                + "".join(f"127.0.0.2 {name}\n" for name in [*HOSTS_ENTRIES, ZONED_V6]))
    nsswitch = Path("/etc/nsswitch.conf")
    lines = nsswitch.read_text().splitlines() if nsswitch.exists() else []
    (work / "nsswitch.conf").write_text("\n".join([*(l for l in lines if not l.startswith("hosts:")),
                                                   "hosts: files dns", ""]))
    for name in ("resolv.conf", "hosts", "nsswitch.conf"):
        if Path("/etc", name).exists():  # without resolv.conf glibc asks 127.0.0.1; without nsswitch, dns+files
            _bind_mount(work / name, f"/etc/{name}")
    for nscd in ("/run/nscd", "/var/run/nscd"):
        if Path(nscd).is_dir():
            _bind_mount(work, nscd)  # no socket there: lookups cannot go to a cache daemon outside
    resolver = StandInResolver({"intranet.test": "127.0.0.3"})
    outside, allowed = Listener("127.0.0.2"), Listener("127.0.0.3")
    env = {k: v for k, v in os.environ.items()
           if k not in ("SOVLLM_EGRESS_ALLOW", "LOCALDOMAIN", "RES_OPTIONS", "HOSTALIASES")}
    try:
        argv = [str(outside.port), str(allowed.port), json.dumps(HOSTS_ENTRIES), ZONED_V6]
        child = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, timeout=240, env=env)
        print(json.dumps({"returncode": child.returncode, "stdout": child.stdout, "stderr": child.stderr[-3000:],
                          "queries": resolver.flush(), "outside": outside.close(), "allowed": allowed.close()}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def sandbox():
    """The command prefix that runs a program in private network + mount namespaces."""
    from tests.conftest import require

    unshare = shutil.which("unshare")
    candidates = [[unshare, "--mount", "--net"], [unshare, "--mount", "--net", "--map-root-user"]] if unshare else []
    works = [c for c in candidates if subprocess.run([*c, "true"], capture_output=True, timeout=60).returncode == 0]
    require(bool(works), "unshare --mount --net (Linux namespaces: root, or unprivileged user namespaces)")
    return works[0]


@pytest.fixture(scope="module")
def observed(sandbox):
    env = {k: v for k, v in os.environ.items() if k not in ("SOVLLM_EGRESS_ALLOW", "SOVLLM_EGRESS_PROXY_URL")}
    proc = subprocess.run([*sandbox, sys.executable, __file__], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["returncode"] == 0, result["stderr"]
    result["child"] = json.loads(result["stdout"])
    return result


def test_the_stand_in_resolver_sees_real_queries(observed):
    names = {name for name, _ in observed["queries"]}
    assert "control-unguarded.leak.test" in names, "connect() with a name did not reach the stand-in resolver"
    assert "intranet.test" in names and observed["child"]["allowed"] == "sent"
    assert observed["allowed"] == ["allowed", "allowed-connect"]


def test_no_query_leaves_for_a_name_outside_the_allow_list(observed):
    names = {name for name, _ in observed["queries"]}
    assert names - {"control-unguarded.leak.test", "intranet.test"} == set(), observed["child"]


def test_every_socket_api_refuses_the_name_itself(observed):
    results = {k: v for k, v in observed["child"].items() if k not in ("control-unguarded", "allowed", "zoned-v6")}
    refused = {"EgressBlockedError", "EgressUnguardableError"}
    assert {k: v for k, v in results.items() if v not in refused} == {}
    assert len(results) >= 20 + len(HOSTS_ENTRIES)


def test_names_that_look_like_loopback_do_not_reach_the_outside_host(observed):
    for name in HOSTS_ENTRIES:
        assert observed["child"]["hosts:" + name] == "EgressBlockedError", name
    assert observed["child"]["zoned-v6"] not in ("ok", "EgressBlockedError")  # allowed as ::1; fails in C
    assert observed["outside"] == []


if __name__ == "__main__":
    harness()
