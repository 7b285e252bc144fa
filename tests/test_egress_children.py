"""Children of a guarded process are guarded however they are started (fail closed), with
loopback stand-ins only: 127.0.0.2 plays a forbidden outside host."""

from __future__ import annotations

import json
import multiprocessing.util
import os
import subprocess
import sys
import textwrap

import pytest

from sovllm import egress
from sovllm.egress import EgressUnguardableError
from sovllm.egress_spawn import skips_site
from tests.test_egress import outside  # noqa: F401 - the fixture

# Reports its policy and whether it reached the outside stand-in, into the file named by argv[2].
CHILD = textwrap.dedent("""
    import json, os, socket, sys
    out = {"allow": os.environ.get("SOVLLM_EGRESS_ALLOW"), "https_proxy": os.environ.get("HTTPS_PROXY")}
    try:
        socket.create_connection(("127.0.0.2", int(sys.argv[1])), timeout=30).close()
        out["outside"] = "connected"
    except Exception as exc:
        out["outside"] = type(exc).__name__
    with open(sys.argv[2], "w") as fh:
        json.dump(out, fh)
""")


@pytest.fixture
def child(tmp_path, outside):
    """(command, read result) for one child run."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    result = tmp_path / "result.json"
    cmd = [sys.executable, str(script), str(outside.port), str(result)]
    return cmd, lambda: json.loads(result.read_text())


def _wait(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _subprocess_scrubbed(cmd):
    subprocess.run(cmd, env={}, timeout=120, check=True)


def _subprocess_copy_without_policy(cmd):
    env = {k: v for k, v in os.environ.items() if k != egress.ENV_ALLOW}
    subprocess.run(cmd, env={**env, "HTTPS_PROXY": "http://127.0.0.3:9"}, timeout=120, check=True)


def _posix_spawn_scrubbed(cmd):
    assert _wait(os.posix_spawn(cmd[0], cmd, {})) == 0


def _environ_deleted_subprocess(cmd):
    del os.environ[egress.ENV_ALLOW]
    subprocess.run(cmd, timeout=120, check=True)


def _unsetenv_multiprocessing_spawn(cmd):
    os.unsetenv(egress.ENV_ALLOW)  # below os.environ: a child that inherits would not see it
    assert _wait(multiprocessing.util.spawnv_passfds(os.fsencode(cmd[0]), cmd, ())) == 0


def _unsetenv_os_system(cmd):
    os.unsetenv(egress.ENV_ALLOW)
    assert os.system(" ".join(cmd)) == 0


def _execve_scrubbed_in_a_guarded_child(cmd):
    # The intermediate process is guarded through the environment (the .pth start-up hook).
    code = f"import os, sys; os.execve(sys.executable, {cmd!r}, {{}})"
    subprocess.run([sys.executable, "-c", code], timeout=120, check=True)


@pytest.mark.parametrize("start", [_subprocess_scrubbed, _subprocess_copy_without_policy, _posix_spawn_scrubbed,
                                   _environ_deleted_subprocess, _unsetenv_multiprocessing_spawn, _unsetenv_os_system,
                                   _execve_scrubbed_in_a_guarded_child], ids=lambda f: f.__name__.strip("_"))
def test_child_started_without_the_policy_variable_is_guarded(start, child, outside):
    cmd, result = child
    egress.install(["127.0.0.3"])
    start(cmd)
    out = result()
    assert json.loads(out["allow"]) == ["127.0.0.3"]
    assert out["outside"] == "EgressBlockedError"
    assert out["https_proxy"] is None
    assert outside.close() == []


def test_exec_that_bypasses_the_wrapper_with_a_scrubbed_environment_is_refused(child, outside):
    cmd, _ = child
    egress.install([])
    code = (f"import posix\ntry:\n    posix.execve({cmd[0]!r}, {cmd!r}, {{}})\n"  # posix.execve: not the wrapper
            "except Exception as e:\n    print(type(e).__name__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "EgressUnguardableError", proc.stderr
    assert outside.close() == []


@pytest.mark.parametrize("flags", [["-S"], ["-IS"], ["-Sc", "pass"], ["-X", "dev", "-S"], ["-W", "ignore", "-bS"]])
def test_python_child_without_site_is_refused(flags, child, outside):
    cmd, _ = child
    egress.install([])
    command = [cmd[0], *flags, *([] if flags[-1] == "pass" else cmd[1:])]
    with pytest.raises(EgressUnguardableError, match="-S"):
        subprocess.run(command, timeout=120)
    with pytest.raises(EgressUnguardableError, match="-S"):
        os.posix_spawn(command[0], command, dict(os.environ))
    assert outside.close() == []


@pytest.mark.parametrize("argv, expected", [
    (["python3", "-S", "x.py"], True), (["python3.11", "-ISu"], True), (["/venv/bin/python", "-X", "dev", "-S"], True),
    (["python", "-I", "x.py"], False), (["python", "-c", "import sys; sys.argv = ['-S']"], False),
    (["python", "-mS"], False), (["python", "x.py", "-S"], False), (["python", "-X", "S", "x.py"], False),
    (["python", "-W", "S", "x.py"], False), (["/usr/bin/sh", "-c", "python -S x.py"], False),
    (["Spython", "-S"], False), ([b"python3", b"-S"], True),
])
def test_skips_site_reads_the_interpreter_options(argv, expected):
    assert skips_site(argv[0], argv) is expected


def test_children_run_normally_when_the_guard_is_off(child):
    cmd, result = child
    subprocess.run([cmd[0], "-S", "-c", "pass"], timeout=120, check=True)  # no guard: nothing to refuse
    subprocess.run(cmd, env={**os.environ, "HTTPS_PROXY": "http://127.0.0.3:9"}, timeout=120, check=True)
    assert result()["allow"] is None and result()["https_proxy"] == "http://127.0.0.3:9"
