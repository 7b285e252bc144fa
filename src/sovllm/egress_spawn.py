"""Child processes of a guarded process get its egress policy, whatever environment they are given.

A guarded process exports its policy in `SOVLLM_EGRESS_ALLOW`, and the `sovllm_egress.pth`
start-up hook installs the guard in every Python child that has that variable. A caller that
starts a child with its own, scrubbed environment (`env={}`), or code that deleted the variable,
would start an unguarded child; so every way Python starts a program is covered:

* `subprocess` and `multiprocessing` (`_posixsubprocess.fork_exec`), `os.execve` and
  `os.posix_spawn[p]` get the policy's variables added to the environment they pass, and proxy
  variables removed from it;
* programs that inherit this process's environment (`os.execv`, `os.system`, `fork_exec` without
  an environment) find the variables put back first;
* an `os.exec*` / `os.posix_spawn` call that bypassed these wrappers (a function bound before the
  guard was installed) with an environment lacking the policy is refused;
* a Python interpreter started with `-S` would skip the start-up hook, so it is refused.

Not covered, because nothing of sovllm runs there: a program that is not Python, a Python without
sovllm in its site-packages, and whatever such a program or a shell starts with its own environment.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Callable

from sovllm.errors import EgressUnguardableError

_required: Callable[[], dict[str, str] | None] = lambda: None
_real: dict = {}
_PYTHON_RE = re.compile(r"^python[0-9.]*$")


def is_proxy_variable(key) -> bool:
    """Whether an environment variable names a proxy (`http_proxy`, `HTTPS_PROXY`, `ALL_PROXY`, …; not `no_proxy`)."""
    name = (os.fsdecode(key) if isinstance(key, bytes) else str(key)).lower()
    return name.endswith("_proxy") and name != "no_proxy"


def _dropped(key, required: dict) -> bool:
    name = os.fsdecode(key) if isinstance(key, bytes) else str(key)
    return name in required or is_proxy_variable(name)


def _restore_environ(required: dict) -> None:
    """Put the policy back into this process's environment, which the child inherits."""
    for key, value in required.items():
        os.environ[key] = value  # always: os.unsetenv may have removed it below os.environ
    for key in [k for k in os.environ if is_proxy_variable(k) and k not in required]:
        del os.environ[key]


def _env_list(env_list):
    """`fork_exec`'s environment (`[b"K=V", ...]`, or None to inherit) with the policy in it."""
    required = _required()
    if required is None:
        return env_list
    if env_list is None:
        _restore_environ(required)
        return None
    kept = [e for e in env_list if not _dropped(e.split(b"=" if isinstance(e, bytes) else "=", 1)[0], required)]
    return [*kept, *(os.fsencode(k) + b"=" + os.fsencode(v) for k, v in required.items())]


def _env_mapping(env):
    """An `execve` / `posix_spawn` environment mapping with the policy in it (a new dict)."""
    required = _required()
    if required is None or env is None:
        return env
    fixed = {k: v for k, v in env.items() if not _dropped(k, required)}
    fixed.update(required)
    return fixed


def _lookup(env, key: str):
    for k in (key, os.fsencode(key)):
        try:
            value = env[k]
        except (KeyError, TypeError):
            continue
        return os.fsdecode(value) if isinstance(value, bytes) else value
    return None


def skips_site(executable, argv) -> bool:
    """Whether this command starts a Python interpreter with `-S` (no site, hence no guard)."""
    try:
        name = os.path.basename(os.fsdecode(executable))
        args = [os.fsdecode(a) for a in list(argv)[1:]]
    except (TypeError, ValueError):
        return False
    if not (_PYTHON_RE.match(name) or name == os.path.basename(sys.executable)):
        return False
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-", "--") or not arg.startswith("-"):
            return False  # the script and its own arguments follow
        i += 1
        if arg.startswith("--"):
            i += arg == "--check-hash-based-pycs"  # takes a value
            continue
        for j, flag in enumerate(arg[1:]):
            if flag == "S":
                return True
            if flag in "cm":
                return False  # the rest is the command or module
            if flag in "WX":
                i += j == len(arg) - 2  # its value is the next argument
                break
    return False


def _refuse_unguarded_python(executable, argv) -> None:
    if _required() is not None and skips_site(executable, argv):
        raise EgressUnguardableError(f"starting {os.fsdecode(executable)} with -S",
                                     hint="-S skips the start-up hook that installs the guard in the child; "
                                          "start it without -S")


def audit(event: str, args: tuple) -> None:
    """The egress audit hook's part for process creation (events are documented in the `sys` audit table)."""
    if event == "subprocess.Popen":
        _refuse_unguarded_python(args[0], args[1])
    elif event in ("os.exec", "os.posix_spawn"):
        required = _required()
        if required is None:
            return
        _refuse_unguarded_python(args[0], args[1])
        env = args[2]
        if env is None:
            _restore_environ(required)
        elif any(_lookup(env, key) != value for key, value in required.items()):
            raise EgressUnguardableError(f"starting {os.fsdecode(args[0])} without the egress policy",
                                         hint="this call bypassed the guard's wrapper of os.execve/posix_spawn; "
                                              "pass an environment that keeps SOVLLM_EGRESS_ALLOW")
    elif event == "os.system":
        required = _required()
        if required is not None:
            _restore_environ(required)


def _guarded_fork_exec(*args, **kwargs):
    args = list(args)
    if len(args) > 5:
        _refuse_unguarded_python(args[1][0] if args[1] else args[0][0], args[0])
        args[5] = _env_list(args[5])
    return _real["fork_exec"](*args, **kwargs)


def _guarded_execve(path, argv, env):
    return _real["execve"](path, argv, _env_mapping(env))


def _guarded_posix_spawn(path, argv, env, **kwargs):
    return _real["posix_spawn"](path, argv, _env_mapping(env), **kwargs)


def _guarded_posix_spawnp(path, argv, env, **kwargs):
    return _real["posix_spawnp"](path, argv, _env_mapping(env), **kwargs)


def install(required: Callable[[], dict[str, str] | None]) -> None:
    """Wrap the process-creation functions; `required()` gives the variables every child must get."""
    global _required
    _required = required
    try:
        import _posixsubprocess
        import subprocess
    except ImportError:  # not POSIX: the audit hook still refuses what it can
        return
    _real["fork_exec"] = _posixsubprocess.fork_exec
    _posixsubprocess.fork_exec = _guarded_fork_exec  # multiprocessing calls it by attribute
    if getattr(subprocess, "_fork_exec", None) is _real["fork_exec"]:
        subprocess._fork_exec = _guarded_fork_exec  # subprocess imported it by name
    for name, wrapper in (("execve", _guarded_execve), ("posix_spawn", _guarded_posix_spawn),
                          ("posix_spawnp", _guarded_posix_spawnp)):
        if hasattr(os, name):
            _real[name] = getattr(os, name)
            setattr(os, name, wrapper)
