"""Proxies cannot carry sovllm's requests past the guard, with loopback stand-ins only: a proxy on
127.0.0.3 (allow-listed) and a forbidden outside host on 127.0.0.2. Host names are never resolved
here: the resolver under the guard is replaced by one that refuses every name."""

from __future__ import annotations

import _socket
import asyncio
import ipaddress
import os
import socket
import subprocess
import sys
import threading

import httpx
import pytest

from sovllm import egress
from sovllm.endpoint import ChatClient, Endpoint
from sovllm.errors import BackendError, EgressBlockedError
from tests.test_egress import Listener, outside  # noqa: F401 - the fixture


class StandInProxy(Listener):
    """An HTTP proxy stand-in on 127.0.0.3: records each request line, answers `reply`, closes."""

    recv_timeout = 30.0

    def __init__(self, reply: bytes = b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
                                      b"Content-Length: 36\r\nConnection: close\r\n\r\n"
                                      b'{"error": {"message": "stand-in"}} \n'):
        self.reply = reply  # before the listener's thread starts
        super().__init__("127.0.0.3")
        self.url = f"http://127.0.0.3:{self.port}"

    @property
    def requests(self) -> list[str]:
        return self.received

    def _take(self, conn) -> None:
        with conn:
            conn.settimeout(self.recv_timeout)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            while len(body) < length:  # read it all, so closing sends FIN rather than RST
                chunk = conn.recv(65536)
                if not chunk:
                    break
                body += chunk
            self.received.append(head.split(b"\r\n", 1)[0].decode("latin-1"))
            conn.sendall(self.reply)


@pytest.fixture
def proxy():
    stand_in = StandInProxy()
    yield stand_in
    stand_in.close()


@pytest.fixture
def no_name_resolution(monkeypatch):
    """The real resolver answers IP literals only; every name asked for is recorded and refused."""
    names, real = [], _socket.getaddrinfo

    def resolver(host, *args, **kwargs):
        text = host.decode() if isinstance(host, bytes) else host
        try:
            ipaddress.ip_address(text or "0.0.0.0")
        except ValueError:
            names.append(text)
            raise socket.gaierror(socket.EAI_NONAME, "stand-in resolver: names are not resolved in this test")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(_socket, "getaddrinfo", resolver)
    for key in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(key, raising=False)
    return names


def ask(base_url: str):
    async def run():
        client = ChatClient(Endpoint(base_url, "m"), max_retries=0, timeout=60)
        try:
            return await client.complete([{"role": "user", "content": "hi"}], max_tokens=1)
        finally:
            await client.close()

    return asyncio.run(run())


def test_chat_client_ignores_proxy_variables(proxy, outside, no_name_resolution, monkeypatch):
    egress.install(["127.0.0.3"])
    monkeypatch.setenv("HTTP_PROXY", proxy.url)  # set after install: only the client itself can ignore it
    monkeypatch.setenv("ALL_PROXY", proxy.url)
    with pytest.raises(EgressBlockedError, match="127.0.0.2"):
        ask(f"http://127.0.0.2:{outside.port}/v1")
    assert proxy.close() == [] and outside.close() == []


def test_install_removes_proxy_variables_for_every_client_and_child(proxy, outside, no_name_resolution, monkeypatch):
    for key in ("HTTPS_PROXY", "http_proxy", "ALL_PROXY", "grpc_proxy"):
        monkeypatch.setenv(key, proxy.url)
    monkeypatch.setenv("NO_PROXY", "localhost")
    egress.install(["127.0.0.3"])
    assert not [k for k in os.environ if k.lower().endswith("_proxy") and k != "NO_PROXY"]
    assert os.environ["NO_PROXY"] == "localhost"
    with pytest.raises(httpx.ConnectError, match="egress blocked"):  # a third-party client, trust_env on
        httpx.get(f"http://127.0.0.2:{outside.port}/v1/models", timeout=30)
    child = subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('HTTPS_PROXY'))"],
                           env={**os.environ, "HTTPS_PROXY": proxy.url}, capture_output=True, text=True, timeout=120)
    assert child.stdout.strip() == "None", child.stderr
    assert proxy.close() == [] and outside.close() == []


def test_configured_proxy_checks_and_records_the_real_destination(proxy, outside, no_name_resolution):
    egress.install(["127.0.0.3", "intranet.test"], proxy=proxy.url)
    start = egress.mark()
    with pytest.raises(BackendError, match="HTTP 400"):
        ask("http://intranet.test:8000/v1")
    assert proxy.requests == ["POST http://intranet.test:8000/v1/chat/completions HTTP/1.1"]
    assert no_name_resolution == []  # the proxy resolves the destination, this process does not
    recorded = [e for e in egress.events()[start:] if e["host"] == "intranet.test"]
    assert [(e["kind"], e["port"], e["allowed"], e.get("via")) for e in recorded] == \
        [("connection", 8000, True, f"127.0.0.3:{proxy.port}")]
    contacted = egress.summarise(egress.events()[start:])["contacted"]
    assert {"intranet.test:8000", f"127.0.0.3:{proxy.port}"} <= set(contacted)
    with pytest.raises(EgressBlockedError, match="127.0.0.2"):
        ask(f"http://127.0.0.2:{outside.port}/v1")
    assert egress.summarise(egress.events()[start:])["blocked"] == [f"127.0.0.2:{outside.port}"]
    assert proxy.close() == ["POST http://intranet.test:8000/v1/chat/completions HTTP/1.1"]
    assert outside.close() == []


def test_redirect_through_the_configured_proxy_is_checked(outside, no_name_resolution):
    target = f"http://127.0.0.2:{outside.port}/v1/chat/completions"
    proxy = StandInProxy(f"HTTP/1.1 307 Temporary Redirect\r\nLocation: {target}\r\nContent-Length: 0\r\n"
                         f"Connection: close\r\n\r\n".encode())
    try:
        egress.install(["127.0.0.3", "intranet.test"], proxy=proxy.url)
        with pytest.raises(EgressBlockedError, match="127.0.0.2"):
            ask("http://intranet.test:8000/v1")
    finally:
        requests = proxy.close()
    assert requests == ["POST http://intranet.test:8000/v1/chat/completions HTTP/1.1"]
    assert outside.close() == []


def test_proxy_must_be_allow_listed_and_reaches_children(proxy):
    with pytest.raises(ValueError, match="not in egress.allow"):
        egress.install([], proxy="http://127.0.0.2:3128")
    with pytest.raises(ValueError, match="URL"):
        egress.install(["127.0.0.3"], proxy="127.0.0.3:3128")
    egress.install(["127.0.0.3"], proxy=proxy.url)
    code = "from sovllm import egress; print(egress.http_client_options(asynchronous=False)['proxy'])"
    child = subprocess.run([sys.executable, "-c", code], env={}, capture_output=True, text=True, timeout=120)
    assert child.stdout.strip() == proxy.url, child.stderr
    assert proxy.close() == []
