"""The sovereignty guard: nothing leaves the machine unless the user allowed that host.

`install(allow)` puts these layers into the current Python process:

* the socket methods that take an address (`connect`, `connect_ex`, `sendto`, `sendmsg`, `bind`)
  and `socket.getaddrinfo` / `gethostbyname` / `gethostbyname_ex` are wrapped, so a host *name*
  is judged before the C code resolves it: a name outside the allow-list never reaches the
  resolver (the audit event of `connect` comes only after the C code has resolved the name);
* a `sys.addaudithook` hook sees every socket created, connected or sent to and every name
  lookup the interpreter makes, including those made from C code through `_socket`. It refuses
  raw IP sockets, packet sockets and every address family other than IP, Unix and netlink, and
  the import of native event loops and resolvers that bypass Python sockets (uvloop, c-ares);
* child processes get the policy whatever environment they are started with (`egress_spawn`).

Allowed are 127.0.0.1, ::1, `localhost` and the entries of `egress.allow` (host names, `*.suffix`
wildcards, IP addresses, CIDR networks). Everything else, including the rest of 127.0.0.0/8, is
refused with `EgressBlockedError` before any packet or DNS query is sent. A host is an IP address
only if it is a literal (a zone id only on IPv6); anything else is a name, compared exactly
(ASCII, case-insensitive, one trailing dot). Every attempt, allowed or not, is recorded
(`events()`), and with `SOVLLM_EGRESS_LOG` set it is appended to that file, so a stage can list
in its manifest the endpoints its child processes contacted.

`install` exports the allow-list in `SOVLLM_EGRESS_ALLOW` and the hub/telemetry opt-outs and
removes proxy variables (`*_proxy`), so that no client follows a proxy the user did not
configure; the `sovllm_egress.pth` file this package installs into site-packages re-installs the
guard at start-up in any Python process that has that variable. A proxy configured for sovllm
(`install(allow, proxy=...)`) is used only by sovllm's own HTTP clients (`http_client_options`),
which check and record the real destination of every request.
"""

from __future__ import annotations

import _socket
import ipaddress
import json
import os
import re
import socket
import sys
import threading
from urllib.parse import urlsplit

from sovllm import egress_spawn
from sovllm.egress_log import ENV_LOG, events, mark, read_log, summarise  # noqa: F401 (API)
from sovllm.egress_log import record as _record
from sovllm.errors import EgressBlockedError, EgressUnguardableError, SovllmError  # noqa: F401 (API)

ENV_ALLOW = "SOVLLM_EGRESS_ALLOW"
ENV_PROXY = "SOVLLM_EGRESS_PROXY_URL"  # not *_PROXY: that would read as a proxy variable

# Hub downloads, hub telemetry and MLflow usage tracking are switched off for sovllm and its children.
PRIVACY_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}

# Native event loops and resolvers that open sockets or send DNS queries in C, out of the guard's
# sight. Importing them under the guard raises ImportError, so their users fall back to Python's own
# (uvicorn's loop="auto" → asyncio, aiohttp → the threaded resolver).
REFUSED_MODULES = frozenset({"uvloop", "zuvloop", "winloop", "aiodns", "pycares", "pycurl"})

_LOOPBACK = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))
_LOCAL_NAMES = ("localhost",)
_HOSTNAME_RE = re.compile(r"^(\*\.)?([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*$")
_INET_FAMILIES = frozenset({socket.AF_INET, socket.AF_INET6})
# Families whose sockets cannot reach another machine: Unix domain and netlink (the kernel).
_LOCAL_FAMILIES = frozenset(getattr(socket, name) for name in ("AF_UNIX", "AF_NETLINK") if hasattr(socket, name))
_TYPE_FLAGS = getattr(socket, "SOCK_NONBLOCK", 0) | getattr(socket, "SOCK_CLOEXEC", 0)
# Read the C fields directly: a socket subclass may override the Python properties.
_FAMILY = _socket.socket.family.__get__
_TYPE = _socket.socket.type.__get__


def _host_text(host) -> str | None:
    """The host exactly as the C socket code reads it (a str subclass's own methods are not trusted)."""
    if isinstance(host, str):
        return str.__str__(host)
    if isinstance(host, bytes):
        return bytes.decode(host, "ascii", "replace")
    if isinstance(host, bytearray):
        return bytearray.decode(host, "ascii", "replace")
    return None


def _literal_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address an IP literal denotes (IPv4-mapped IPv6 unwrapped, a zone id dropped); None for a name.

    Only IPv6 literals carry a zone id: `127.0.0.1%x.evil.test` is a name, and so is `[127.0.0.1]`.
    """
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id is not None:
            ip = ipaddress.IPv6Address(text.split("%", 1)[0])
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
    return ip


def parse_allow_entry(entry: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | str:
    """Parse one `egress.allow` entry into a network or a lower-case host name (ValueError if neither)."""
    text = str(entry).strip()
    if not text:
        raise ValueError("empty entry")
    if "://" in text:
        raise ValueError(f"'{text}' is a URL; list only its host name")
    try:
        return ipaddress.ip_network(text.strip("[]"), strict=False)
    except ValueError:
        pass
    name = text.lower().rstrip(".")
    if not _HOSTNAME_RE.match(name):
        raise ValueError(f"'{text}' is neither a host name, an IP address nor a CIDR network")
    return name


class Policy:
    """An immutable allow-list: loopback (127.0.0.1, ::1, localhost) plus the user's entries."""

    def __init__(self, allow: list[str] | tuple[str, ...] = ()):
        self.allow = tuple(str(a) for a in allow)
        self.names: set[str] = set()
        self.networks: list = []
        suffixes = []
        for entry in self.allow:
            parsed = parse_allow_entry(entry)
            if isinstance(parsed, str):
                if parsed.startswith("*."):
                    suffixes.append(parsed[1:])
                else:
                    self.names.add(parsed)
            else:
                self.networks.append(parsed)
        self.suffixes = tuple(suffixes)

    def allows_name(self, name: str) -> bool:
        """Whether a host *name* is allowed: exact ASCII match (any case, one trailing dot) or a wildcard."""
        if not name.isascii():
            return False  # the C code would IDNA-encode it into some other name
        name = name.lower()
        if name.endswith("."):
            name = name[:-1]
        if name in _LOCAL_NAMES or name in self.names:
            return True
        return bool(self.suffixes) and name.endswith(self.suffixes)

    def allows_ip(self, ip) -> bool:
        return ip in _LOOPBACK or any(ip.version == n.version and ip in n for n in self.networks)

    def allows(self, host: str) -> bool:
        """Whether a host (name, address literal, or `[IPv6]` as in a URL) may be contacted under this policy."""
        text = str(host)
        if text.startswith("[") and text.endswith("]"):
            ip = _literal_ip(text[1:-1])
            return ip is not None and ":" in text and self.allows_ip(ip)
        ip = _literal_ip(text)
        return self.allows_ip(ip) if ip is not None else self.allows_name(text)


_lock = threading.Lock()
_policy: Policy | None = None
_proxy: str | None = None
_hook_added = False
_resolved: set = set()  # addresses that allowed host names resolved to
_real = {}


def _check(kind: str, host, port=None, *, via: str | None = None) -> None:
    """Raise EgressBlockedError unless the active policy allows `host`; record the attempt."""
    policy = _policy
    if policy is None or host is None:
        return
    text = _host_text(host)
    if text is None:  # the C code accepts only str, bytes and bytearray: refuse what we cannot read
        raise EgressBlockedError(f"<{type(host).__name__} host>", None, action=kind)
    if kind == "lookup" and text in ("", "0.0.0.0", "::"):
        return  # wildcard lookups are made to bind listening sockets, not to reach anyone
    ip = _literal_ip(text)
    allowed = (policy.allows_ip(ip) or ip in _resolved) if ip is not None else policy.allows_name(text)
    if kind == "lookup" and allowed and ip is None:
        return  # the connect that follows is checked and recorded
    port = port if isinstance(port, int) or port is None else str(port)
    _record(kind, text, port, allowed, via)
    if not allowed:
        action = "name lookup" if kind == "lookup" and ip is None else ("send" if kind == "send" else "connection")
        raise EgressBlockedError(text, port if isinstance(port, int) else None, action=action)


def _refuse_socket_kind(family: int, stype: int) -> None:
    """Refuse sockets whose destination the guard cannot judge: raw IP, packet and non-IP network families."""
    if family in _INET_FAMILIES:
        if stype & ~_TYPE_FLAGS == socket.SOCK_RAW:
            raise EgressUnguardableError("a raw IP socket", hint="raw sockets write their own packet headers, "
                                                              "so their destination cannot be checked")
    elif family not in _LOCAL_FAMILIES and family != -1:
        try:
            name = socket.AddressFamily(family).name
        except ValueError:
            name = f"address family {family}"
        raise EgressUnguardableError(f"a {name} socket", hint="sovllm allows only IP sockets (checked per "
                                                            "address), Unix-domain and netlink sockets")


def _guard_socket_use(kind: str, sock, address) -> None:
    """Check the destination of one socket call (connection, send, bind) before the C code resolves it."""
    if _policy is None:
        return
    family = _FAMILY(sock)
    _refuse_socket_kind(family, _TYPE(sock))
    if family not in _INET_FAMILIES or not isinstance(address, tuple) or tuple.__len__(address) < 2:
        return  # local families; a malformed IP address is refused by the C code before any lookup
    host, port = tuple.__getitem__(address, 0), tuple.__getitem__(address, 1)
    if kind != "bind":
        _check(kind, host, port)
        return
    text = _host_text(host)
    if text is not None and text not in ("", "<broadcast>") and _literal_ip(text) is None:
        _check("lookup", text, port)  # binding to a local address sends nothing; binding to a name looks it up


def _address_argument(method: str, args: tuple):
    if method in ("connect", "connect_ex", "bind"):
        return args[0] if len(args) == 1 else None
    if method == "sendto":
        return args[-1] if len(args) in (2, 3) else None
    return args[3] if len(args) >= 4 else None  # sendmsg(buffers, ancdata, flags, address)


def _guarded_method(method: str, kind: str):
    real = getattr(_socket.socket, method)

    def guarded(self, *args):
        _guard_socket_use(kind, self, _address_argument(method, args))
        return real(self, *args)

    guarded.__name__ = guarded.__qualname__ = method
    guarded.__doc__ = real.__doc__
    return guarded


def _guarded_socket_init(self, *args, **kwargs):
    _real["socket.__init__"](self, *args, **kwargs)
    if _policy is not None:
        try:  # an adopted descriptor (fileno=...) shows its kind only now
            _refuse_socket_kind(_FAMILY(self), _TYPE(self))
        except EgressUnguardableError:
            self.detach()
            raise


def _audit_hook(event: str, args: tuple) -> None:
    if _policy is None:
        return
    if event.startswith("socket."):
        _audit_socket(event, args)
    elif event == "import":
        if str(args[0]).partition(".")[0] in REFUSED_MODULES:
            raise ImportError(f"egress guard: {args[0]} is refused because it opens sockets or sends DNS queries "
                              f"outside Python's socket module, where the guard cannot check them", name=args[0])
    else:
        egress_spawn.audit(event, args)


def _audit_socket(event: str, args: tuple) -> None:
    if event == "socket.__new__":
        sock, family, stype = args[0], args[1], args[2]
        if not isinstance(sock, socket.socket) and family not in _LOCAL_FAMILIES:
            raise EgressUnguardableError("a bare _socket.socket", hint="use socket.socket, whose methods the guard "
                                                                      "checks before a name is resolved")
        _refuse_socket_kind(family, stype)
    elif event == "socket.connect":
        _guard_socket_use("connection", args[0], args[1])
    elif event in ("socket.sendto", "socket.sendmsg"):
        _guard_socket_use("send", args[0], args[1])
    elif event == "socket.bind":
        _guard_socket_use("bind", args[0], args[1])
    elif event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr"):
        _check("lookup", args[0], args[1] if event == "socket.getaddrinfo" and len(args) > 1 else None)
    elif event == "socket.getnameinfo":
        address = args[0]
        if isinstance(address, tuple) and len(address) >= 2:
            _check("lookup", address[0], address[1])


def _guarded_getaddrinfo(host, port, *args, **kwargs):
    _check("lookup", host, port)
    result = _real["getaddrinfo"](host, port, *args, **kwargs)
    _remember(host, (info[4][0] for info in result))
    return result


def _guarded_gethostbyname(host):
    _check("lookup", host)
    result = _real["gethostbyname"](host)
    _remember(host, [result])
    return result


def _guarded_gethostbyname_ex(host):
    _check("lookup", host)
    result = _real["gethostbyname_ex"](host)
    _remember(host, result[2])
    return result


def _remember(host, addresses) -> None:
    """Allow the addresses an allow-listed *name* resolved to (never those of localhost)."""
    if _policy is None or host is None:
        return
    name = _host_text(host) or ""
    if _literal_ip(name) is None and name.lower().rstrip(".") not in _LOCAL_NAMES:
        for addr in addresses:
            ip = _literal_ip(str(addr))
            if ip is not None:
                _resolved.add(ip)


def _add_hooks() -> None:
    for name, wrapper in (("getaddrinfo", _guarded_getaddrinfo), ("gethostbyname", _guarded_gethostbyname),
                          ("gethostbyname_ex", _guarded_gethostbyname_ex)):
        _real[name] = getattr(socket, name)
        setattr(socket, name, wrapper)
    for method, kind in (("connect", "connection"), ("connect_ex", "connection"), ("sendto", "send"),
                         ("sendmsg", "send"), ("bind", "bind")):
        if hasattr(_socket.socket, method):
            setattr(socket.socket, method, _guarded_method(method, kind))
    _real["socket.__init__"] = socket.socket.__init__
    socket.socket.__init__ = _guarded_socket_init
    egress_spawn.install(_child_env)
    sys.addaudithook(_audit_hook)


def _child_env() -> dict[str, str] | None:
    """The variables every child process must get (None when the guard is off)."""
    if _policy is None:
        return None
    env = {**PRIVACY_ENV, ENV_ALLOW: json.dumps(list(_policy.allow))}
    if _proxy:
        env[ENV_PROXY] = _proxy
    return env


def _parse_proxy(proxy: str | None, policy: Policy) -> str | None:
    if not proxy:
        return None
    parts = urlsplit(str(proxy))
    if parts.scheme not in ("http", "https", "socks5", "socks5h") or not parts.hostname:
        raise ValueError(f"egress proxy '{proxy}' is not an http(s):// or socks5:// URL")
    if not policy.allows(parts.hostname):
        raise ValueError(f"egress proxy host '{parts.hostname}' is not in egress.allow")
    return str(proxy)


def install(allow: list[str] | tuple[str, ...] = (), *, proxy: str | None = None) -> Policy:
    """Guard this process (and its children) with the given allow-list and optional sovllm proxy.

    Calling it again replaces the allow-list; the hooks themselves are installed once per process.
    Raises ValueError for an entry that is neither a host name, an IP address nor a CIDR network,
    and for a proxy whose host is not allowed.
    """
    global _policy, _proxy, _hook_added
    policy = Policy(allow)
    proxy = _parse_proxy(proxy, policy)
    with _lock:
        for key, value in PRIVACY_ENV.items():
            os.environ[key] = value
        for key in [k for k in os.environ if egress_spawn.is_proxy_variable(k)]:
            del os.environ[key]  # HTTP(S)_PROXY & co would carry requests past the guard to any host
        os.environ[ENV_ALLOW] = json.dumps(list(policy.allow))
        if proxy:
            os.environ[ENV_PROXY] = proxy
        else:
            os.environ.pop(ENV_PROXY, None)
        _resolved.clear()
        _policy, _proxy = policy, proxy
        if not _hook_added:
            _add_hooks()
            _hook_added = True
    return policy


def install_from_env() -> Policy:
    """Install the guard from `SOVLLM_EGRESS_ALLOW` (a JSON list); fails closed to loopback only."""
    raw = os.environ.get(ENV_ALLOW, "[]")
    try:
        allow = json.loads(raw)
        if not isinstance(allow, list):
            raise ValueError("not a JSON list")
        return install(allow, proxy=os.environ.get(ENV_PROXY) or None)
    except ValueError as exc:
        print(f"sovllm: {ENV_ALLOW}={raw!r} is invalid ({exc}); allowing loopback only", file=sys.stderr)
        return install([])


def uninstall() -> None:
    """Deactivate the guard in this process (the hooks stay registered but idle). For tests."""
    global _policy, _proxy
    with _lock:
        _policy, _proxy = None, None
        os.environ.pop(ENV_ALLOW, None)
        os.environ.pop(ENV_PROXY, None)


def active_policy() -> Policy | None:
    """The policy in force, or None when the guard is not installed."""
    return _policy


def check_request(url) -> None:
    """Check and record the real destination of one HTTP request sent through sovllm's proxy.

    sovllm's HTTP clients call this for every request, redirects included (`http_client_options`).
    Without a proxy the connection itself is checked and recorded, so this does nothing.
    """
    if _proxy is None:
        return
    parts = urlsplit(str(url))
    try:
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        port = None
    _check("connection", parts.hostname or "", port, via=_proxy_address())


def _proxy_address() -> str:
    parts = urlsplit(_proxy)
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname
    return f"{host}:{parts.port}" if parts.port else str(host)


def http_client_options(*, asynchronous: bool) -> dict:
    """Keyword arguments for an httpx(2) client that obeys the guard.

    Proxy variables are ignored (`trust_env=False`); the proxy configured for sovllm, if any, is used,
    and each request's real destination is checked and recorded before it is sent, even through it.
    """
    if asynchronous:
        async def hook(request):
            check_request(request.url)
    else:
        def hook(request):
            check_request(request.url)
    return {"trust_env": False, "proxy": _proxy, "event_hooks": {"request": [hook]}}


def explain(exc: BaseException | None) -> EgressBlockedError | None:
    """The EgressBlockedError behind a wrapped network error, if any.

    Async clients (anyio, hence httpx.AsyncClient and openai.AsyncOpenAI) report "All connection
    attempts failed" and keep the real reason as the cause; sovllm's clients use this to show it.
    """
    seen: set[int] = set()
    stack = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, EgressBlockedError):
            return current
        stack.extend([current.__cause__, current.__context__, *getattr(current, "exceptions", ())])
    return None
