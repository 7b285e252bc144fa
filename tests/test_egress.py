"""The sovereignty guard, tested with loopback stand-ins only: 127.0.0.2 plays a forbidden outside
host, 127.0.0.3 an allow-listed one. No test sends traffic beyond this machine even if the guard
were broken."""

from __future__ import annotations

import _socket
import json
import socket
import subprocess
import sys
import textwrap
import threading

import httpx
import pytest

from sovllm import egress
from sovllm.errors import EgressBlockedError


class Listener:
    """A TCP listener on `host` that hands each connection to `_take` (by default: record the first bytes
    sent); `close()` also takes the connections still queued (a connect that returned is in the queue)."""

    recv_timeout = 10.0  # recv returns at once when the peer sends or closes

    def __init__(self, host: str):
        self.sock = socket.create_server((host, 0))
        self.sock.settimeout(0.2)
        self.host, self.port = self.sock.getsockname()[:2]
        self.received: list = []
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

    def _take(self, conn) -> None:
        with conn:
            conn.settimeout(self.recv_timeout)
            try:
                self.received.append(conn.recv(100))
            except OSError:
                self.received.append(b"")

    def close(self) -> list:
        """Everything received, including connections still queued."""
        if self.sock.fileno() == -1:
            return self.received
        self._stop.set()
        self._thread.join(60)
        self.sock.setblocking(False)
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # BlockingIOError: the queue is empty
                break
            conn.setblocking(True)
            self._take(conn)
        self.sock.close()
        return self.received


@pytest.fixture
def outside():
    """A stand-in outside host on 127.0.0.2 (shared by the egress test modules)."""
    listener = Listener("127.0.0.2")
    yield listener
    listener.close()


@pytest.fixture
def allowed_host():
    listener = Listener("127.0.0.3")
    yield listener
    listener.close()


@pytest.fixture
def resolver_calls(monkeypatch):
    """Patch the real resolver under socket.getaddrinfo; record every host it is asked for."""
    calls = []

    def spy(host, port, *args, **kwargs):
        calls.append(host)
        if host in ("intranet.test",):  # the stand-in DNS answer for an allow-listed name
            return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.3", int(port or 0)))]
        raise socket.gaierror(socket.EAI_NONAME, "stand-in resolver: no such host")

    monkeypatch.setattr(_socket, "getaddrinfo", spy)
    return calls


def test_outside_listener_gets_nothing_and_caller_gets_sovllm_error(outside):
    start = egress.mark()  # events of earlier tests in this process are not this test's
    egress.install([])
    with pytest.raises(EgressBlockedError) as info:
        socket.create_connection((outside.host, outside.port), timeout=2)
    message = str(info.value)
    assert "127.0.0.2" in message and "egress.allow" in message
    assert not isinstance(info.value, ConnectionRefusedError)
    with pytest.raises(EgressBlockedError):  # a raw connect, bypassing create_connection's lookup
        socket.socket().connect((outside.host, outside.port))
    with pytest.raises(httpx.ConnectError, match="egress blocked.*127.0.0.2.*egress.allow"):
        httpx.get(f"http://127.0.0.2:{outside.port}/v1/models", timeout=2)
    assert outside.close() == []
    blocked = [e for e in egress.events()[start:] if not e["allowed"]]
    assert {(e["host"], e["port"]) for e in blocked} == {("127.0.0.2", outside.port)}


def test_udp_send_to_outside_host_is_blocked():
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.2", 0))
    receiver.settimeout(0.3)
    egress.install([])
    with pytest.raises(EgressBlockedError):
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", receiver.getsockname())
    with pytest.raises(TimeoutError):
        receiver.recv(10)
    receiver.close()


@pytest.mark.parametrize("address", ["127.0.0.2", "127.1.2.3", "::ffff:127.0.0.2", "10.0.0.1", "0.0.0.0"])
def test_rest_of_loopback_and_private_ranges_are_not_allowed(address):
    assert not egress.Policy([]).allows(address)


def test_only_exact_loopback_hosts_are_allowed_by_default():
    policy = egress.Policy([])
    assert policy.allows("127.0.0.1") and policy.allows("::1") and policy.allows("localhost")
    assert policy.allows("[::1]") and policy.allows("LOCALHOST.")


@pytest.mark.parametrize("host", ["127.0.0.1%x.evil.test", "[127.0.0.1]", "localhost%x.evil.test", "[localhost]",
                                  "127.0.0.1.evil.test", "::1.evil.test", "\u212aube.internal", "kube.internal..",
                                  "[::ffff:127.0.0.2]", "::ffff:127.0.0.2%lo"])
def test_names_that_contain_an_allowed_address_are_names(host, resolver_calls):
    """Zone ids belong to IPv6 literals only, brackets to URLs: anything else is a name, compared exactly."""
    assert not egress.Policy(["kube.internal"]).allows(host)
    egress.install(["kube.internal"])
    with pytest.raises(EgressBlockedError):
        socket.getaddrinfo(host, 80)
    assert resolver_calls == []


def test_zone_ids_are_read_on_ipv6_literals_only():
    policy = egress.Policy(["fe80::/10"])
    assert policy.allows("::1%lo") and policy.allows("fe80::1%eth0") and policy.allows("[fe80::1%eth0]")
    assert policy.allows("[::1]") and not policy.allows("[127.0.0.1]") and not policy.allows("127.0.0.1%lo")
    assert not egress.Policy([]).allows("fe80::1%eth0")


def test_unlisted_name_triggers_no_dns_lookup(resolver_calls):
    egress.install([])
    with pytest.raises(EgressBlockedError, match="name lookup to huggingface.co"):
        socket.create_connection(("huggingface.co", 443), timeout=2)
    with pytest.raises(EgressBlockedError):
        socket.gethostbyname("api.openai.com")
    with pytest.raises(httpx.ConnectError, match="egress blocked"):
        httpx.get("https://huggingface.co/api/models", timeout=2)
    assert resolver_calls == []
    # Control: an allow-listed name does reach the (patched) resolver, so the spy is in the path.
    egress.install(["intranet.test"])
    socket.getaddrinfo("intranet.test", 80)
    assert resolver_calls == ["intranet.test"]


def test_allow_listed_host_is_reached_and_recorded(allowed_host):
    egress.install(["127.0.0.3"])
    with socket.create_connection((allowed_host.host, allowed_host.port), timeout=2) as conn:
        conn.sendall(b"hello")
    assert allowed_host.close() == [b"hello"]
    assert {"kind": "connection", "host": "127.0.0.3", "port": allowed_host.port, "allowed": True}.items() <= \
        egress.events()[-1].items()


def test_allow_listed_name_allows_the_addresses_it_resolves_to(allowed_host, resolver_calls):
    egress.install(["intranet.test"])
    with socket.create_connection(("intranet.test", allowed_host.port), timeout=2) as conn:
        conn.sendall(b"by-name")
    assert allowed_host.close() == [b"by-name"]


def test_cidr_and_wildcard_entries():
    policy = egress.Policy(["127.0.0.0/30", "*.corp.example", "vllm.internal"])
    assert policy.allows("127.0.0.2") and not policy.allows("127.0.0.5")
    assert policy.allows("gpu1.corp.example") and not policy.allows("corp.example.evil.com")
    assert policy.allows("VLLM.internal") and not policy.allows("vllm.internal.evil.com")


@pytest.mark.parametrize("entry", ["https://vllm.internal", "not a host!", "", "10.0.0.0/99"])
def test_invalid_allow_entries_are_rejected(entry):
    with pytest.raises(ValueError):
        egress.Policy([entry])


def test_install_sets_offline_and_telemetry_opt_outs(monkeypatch):
    egress.install(["127.0.0.3"])
    import os

    for key, value in egress.PRIVACY_ENV.items():
        assert os.environ[key] == value
    assert json.loads(os.environ[egress.ENV_ALLOW]) == ["127.0.0.3"]


CHILD = textwrap.dedent("""
    import _socket, json, os, socket, sys
    out = {"allow": os.environ.get("SOVLLM_EGRESS_ALLOW"), "hf_offline": os.environ.get("HF_HUB_OFFLINE")}
    try:
        socket.create_connection(("127.0.0.2", int(sys.argv[1])), timeout=2)
        out["outside"] = "connected"
    except Exception as exc:
        out["outside"] = f"{type(exc).__name__}: {exc}"
    calls, real = [], _socket.getaddrinfo
    _socket.getaddrinfo = lambda *a, **k: calls.append(a[0])
    try:
        socket.create_connection(("huggingface.co", 443), timeout=2)
    except Exception as exc:
        out["name"] = type(exc).__name__
    _socket.getaddrinfo = real
    out["resolver_calls"] = calls
    with socket.create_connection(("127.0.0.3", int(sys.argv[2])), timeout=2) as conn:
        conn.sendall(b"child")
    out["allowed"] = "sent"
    print(json.dumps(out))
""")


def test_child_processes_are_guarded_too(outside, allowed_host, tmp_path, monkeypatch):
    log = tmp_path / "egress.jsonl"
    monkeypatch.setenv(egress.ENV_LOG, str(log))
    egress.install(["127.0.0.3"])
    proc = subprocess.run([sys.executable, "-c", CHILD, str(outside.port), str(allowed_host.port)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["outside"].startswith("EgressBlockedError: egress blocked")
    assert "egress.allow" in out["outside"]
    assert out["name"] == "EgressBlockedError" and out["resolver_calls"] == []
    assert out["allowed"] == "sent" and out["hf_offline"] == "1"
    assert outside.close() == []
    assert allowed_host.close() == [b"child"]
    child_events = [e for e in egress.read_log(log) if e["pid"] != __import__("os").getpid()]
    assert any(e["host"] == "127.0.0.2" and not e["allowed"] for e in child_events)
    assert any(e["host"] == "127.0.0.3" and e["allowed"] for e in child_events)


def test_sovllm_cli_process_refuses_outside_host(outside, allowed_host, tmp_path):
    project = tmp_path / "proj"
    project.mkdir()
    (project / "sovllm.yaml").write_text("egress:\n  allow: [127.0.0.3]\n")
    cli = [sys.executable, "-m", "sovllm", "egress", "check", "--project", str(project), "--connect"]
    blocked = subprocess.run([*cli, f"127.0.0.2:{outside.port}"], capture_output=True, text=True, timeout=60)
    assert blocked.returncode == 3
    assert blocked.stderr.startswith("error: egress blocked") and "egress.allow" in blocked.stderr
    assert len(blocked.stderr.strip().splitlines()) == 1
    reached = subprocess.run([*cli, f"127.0.0.3:{allowed_host.port}"], capture_output=True, text=True, timeout=60)
    assert reached.returncode == 0, reached.stderr
    assert outside.close() == []
    assert len(allowed_host.close()) == 1


def test_async_and_openai_clients_get_the_egress_error(outside):
    import asyncio

    import openai

    egress.install([])

    async def fetch():
        async with httpx.AsyncClient() as client:
            await client.get(f"http://127.0.0.2:{outside.port}/v1/models", timeout=2)

    # anyio reports "All connection attempts failed"; the egress error is kept as the cause.
    with pytest.raises(httpx.ConnectError) as info:
        asyncio.run(fetch())
    assert "127.0.0.2" in str(egress.explain(info.value)) and "egress.allow" in str(egress.explain(info.value))
    client = openai.OpenAI(base_url=f"http://127.0.0.2:{outside.port}/v1", api_key="k", max_retries=0)
    with pytest.raises(openai.APIConnectionError) as info:
        client.models.list()
    assert egress.explain(info.value).host == "127.0.0.2"
    assert egress.explain(RuntimeError("unrelated")) is None
    assert outside.close() == []


TORN = '{"time": 1.0, "pid": 1, "kind": "connect", "host": "10.0.'  # a child killed in the middle of a write


def test_a_torn_egress_record_is_skipped_with_a_warning_and_no_complete_record_is_lost(tmp_path, monkeypatch,
                                                                                       caplog):
    """read_log raised on a fragment; and a record appended right after one used to share its line."""
    from sovllm import egress_log

    log = tmp_path / "egress.jsonl"
    monkeypatch.setenv(egress.ENV_LOG, str(log))
    egress.mark()
    egress_log.record("connect", "127.0.0.1", 8000, True)
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(TORN)
    with caplog.at_level("WARNING", logger="sovllm.egress"):
        assert [e["host"] for e in egress.read_log(log)] == ["127.0.0.1"]
    assert f"{log}: skipped 1 incomplete egress record" in caplog.text
    egress_log.record("connect", "127.0.0.2", 8001, False)  # the next writer appends after the fragment
    assert [(e["host"], e["allowed"]) for e in egress.read_log(log)] == [("127.0.0.1", True), ("127.0.0.2", False)]


def test_a_stage_whose_child_left_a_torn_egress_record_still_writes_its_manifest(tmp_path):
    from sovllm.artifacts import run_stage

    def work(ctx):
        with open(__import__("os").environ[egress.ENV_LOG], "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"time": 1.0, "pid": 1, "kind": "connect", "host": "127.0.0.2", "port": 9,
                                 "allowed": False}) + "\n" + TORN)

    manifest = run_stage("demo", tmp_path / "stage", work).manifest
    assert manifest.status == "ok" and manifest.endpoints == {"contacted": [], "blocked": ["127.0.0.2:9"]}
    assert (tmp_path / "stage" / "manifest.json").is_file()
