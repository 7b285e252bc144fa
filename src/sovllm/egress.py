"""The sovereignty guard: nothing leaves the machine unless the user allowed that host.

`install(allow)` puts two layers into the current Python process:

* a `sys.addaudithook` hook that sees every socket connect, send, name lookup and reverse lookup
  the interpreter makes (including those made from C code through `_socket`), and
* wrappers around `socket.getaddrinfo` / `gethostbyname` / `gethostbyname_ex` that refuse a host
  name *before* the resolver is called, and remember the addresses of allowed names so that the
  connection that follows is allowed too.

Allowed are 127.0.0.1, ::1, `localhost` and the entries of `egress.allow` (host names, `*.suffix`
wildcards, IP addresses, CIDR networks). Everything else, including the rest of 127.0.0.0/8, is
refused with `EgressBlockedError` before any packet or DNS query is sent. Every attempt, allowed
or not, is recorded (`events()`), and with `SOVLLM_EGRESS_LOG` set it is appended to that file,
so a stage can list in its manifest the endpoints its child processes contacted.

`install` also exports the allow-list in `SOVLLM_EGRESS_ALLOW` and the hub/telemetry opt-outs, so
every child process inherits them; the `sovllm_egress.pth` file this package installs into
site-packages re-installs the guard at start-up in any Python process that has that variable.
Non-IP sockets (Unix domain, netlink) are not network egress and are not restricted.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import sys
import threading
import time

from sovllm.errors import EgressBlockedError

ENV_ALLOW = "SOVLLM_EGRESS_ALLOW"
ENV_LOG = "SOVLLM_EGRESS_LOG"

# Hub downloads, hub telemetry and MLflow usage tracking are switched off for sovllm and its children.
PRIVACY_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}

_LOOPBACK = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))
_LOCAL_NAMES = ("localhost",)
_HOSTNAME_RE = re.compile(r"^(\*\.)?([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*$")


def _as_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address `host` spells, unwrapping IPv4-mapped IPv6 and zone ids; None for a name."""
    text = host.strip("[]").split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
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
        self.suffixes: tuple[str, ...] = ()
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
        name = name.lower().rstrip(".")
        if name in _LOCAL_NAMES or name in self.names:
            return True
        return bool(self.suffixes) and name.endswith(self.suffixes)

    def allows_ip(self, ip) -> bool:
        return ip in _LOOPBACK or any(ip.version == n.version and ip in n for n in self.networks)

    def allows(self, host: str) -> bool:
        """Whether a host (name or address literal) may be contacted under this policy."""
        ip = _as_ip(host)
        return self.allows_ip(ip) if ip is not None else self.allows_name(host)


_lock = threading.Lock()
_policy: Policy | None = None
_hook_added = False
_resolved: set = set()  # addresses that allowed host names resolved to
_events: list[dict] = []
_seen: set[tuple] = set()
_real = {}


def _record(kind: str, host: str, port, allowed: bool) -> None:
    key = (kind, host, port, allowed)
    if key in _seen:
        return
    _seen.add(key)
    event = {"time": time.time(), "pid": os.getpid(), "kind": kind, "host": host, "port": port, "allowed": allowed}
    _events.append(event)
    path = os.environ.get(ENV_LOG)
    if path:
        try:
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(event) + "\n")
        except OSError:
            pass  # recording must never break the connection it records


def _check(kind: str, host, port=None) -> None:
    """Raise EgressBlockedError unless the active policy allows `host`; record the attempt."""
    policy = _policy
    if policy is None or host is None:
        return
    if isinstance(host, (bytes, bytearray)):
        host = host.decode("ascii", "replace")
    host = str(host)
    if host in ("", "0.0.0.0", "::") and kind == "lookup":
        return  # wildcard lookups are made to bind listening sockets, not to reach anyone
    ip = _as_ip(host)
    allowed = (policy.allows_ip(ip) or ip in _resolved) if ip is not None else policy.allows_name(host)
    if kind == "lookup" and allowed and ip is None:
        return  # the connect that follows is checked and recorded
    port = port if isinstance(port, int) or port is None else str(port)
    _record(kind, host, port, allowed)
    if not allowed:
        action = "name lookup" if kind == "lookup" and ip is None else ("send" if kind == "send" else "connection")
        raise EgressBlockedError(host, port if isinstance(port, int) else None, action=action)


def _check_address(kind: str, address) -> None:
    if isinstance(address, tuple) and len(address) >= 2 and isinstance(address[0], (str, bytes)):
        _check(kind, address[0], address[1])


def _audit_hook(event: str, args: tuple) -> None:
    if _policy is None or not event.startswith("socket."):
        return
    if event == "socket.connect":
        _check_address("connection", args[1])
    elif event in ("socket.sendto", "socket.sendmsg"):
        if args[1] is not None:
            _check_address("send", args[1])
    elif event == "socket.getaddrinfo":
        _check("lookup", args[0], args[1] if len(args) > 1 else None)
    elif event == "socket.gethostbyname":
        _check("lookup", args[0])
    elif event == "socket.gethostbyaddr":
        _check("lookup", args[0])
    elif event == "socket.getnameinfo":
        _check_address("lookup", args[0])


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
    name = host.decode() if isinstance(host, (bytes, bytearray)) else str(host)
    if _as_ip(name) is None and name.lower().rstrip(".") not in _LOCAL_NAMES:
        for addr in addresses:
            ip = _as_ip(str(addr))
            if ip is not None:
                _resolved.add(ip)


def install(allow: list[str] | tuple[str, ...] = ()) -> Policy:
    """Guard this process (and, through the environment, its children) with the given allow-list.

    Calling it again replaces the allow-list; the hook itself is installed once per process.
    Raises ValueError for an entry that is neither a host name, an IP address nor a CIDR network.
    """
    global _policy, _hook_added
    policy = Policy(allow)
    with _lock:
        for key, value in PRIVACY_ENV.items():
            os.environ[key] = value
        os.environ[ENV_ALLOW] = json.dumps(list(policy.allow))
        if not _hook_added:
            for name, wrapper in (("getaddrinfo", _guarded_getaddrinfo),
                                  ("gethostbyname", _guarded_gethostbyname),
                                  ("gethostbyname_ex", _guarded_gethostbyname_ex)):
                _real[name] = getattr(socket, name)
                setattr(socket, name, wrapper)
            sys.addaudithook(_audit_hook)
            _hook_added = True
        _resolved.clear()
        _policy = policy
    return policy


def install_from_env() -> Policy:
    """Install the guard from `SOVLLM_EGRESS_ALLOW` (a JSON list); fails closed to loopback only."""
    raw = os.environ.get(ENV_ALLOW, "[]")
    try:
        allow = json.loads(raw)
        if not isinstance(allow, list):
            raise ValueError("not a JSON list")
        return install(allow)
    except ValueError as exc:
        print(f"sovllm: {ENV_ALLOW}={raw!r} is invalid ({exc}); allowing loopback only", file=sys.stderr)
        return install([])


def uninstall() -> None:
    """Deactivate the guard in this process (the audit hook stays registered but idle). For tests."""
    global _policy
    with _lock:
        _policy = None
        os.environ.pop(ENV_ALLOW, None)


def active_policy() -> Policy | None:
    """The policy in force, or None when the guard is not installed."""
    return _policy


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


def mark() -> int:
    """Start a new recording window (e.g. a stage) and return its start index into `events()`.

    Repeated attempts are recorded once per window, so each stage lists every endpoint it used.
    """
    with _lock:
        _seen.clear()
        return len(_events)


def events() -> list[dict]:
    """All distinct egress attempts recorded in this process, in order."""
    return list(_events)


def read_log(path) -> list[dict]:
    """Events that processes wrote to a `SOVLLM_EGRESS_LOG` file (missing file: none)."""
    try:
        with open(path, encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]
    except FileNotFoundError:
        return []


def summarise(evts: list[dict]) -> dict:
    """Manifest form: distinct endpoints contacted and attempts blocked, as `host:port` strings."""
    def fmt(e):
        host = f"[{e['host']}]" if ":" in str(e["host"]) else e["host"]
        return host if e.get("port") is None else f"{host}:{e['port']}"

    contacted = sorted({fmt(e) for e in evts if e["allowed"]})
    blocked = sorted({fmt(e) for e in evts if not e["allowed"]})
    return {"contacted": contacted, "blocked": blocked}
