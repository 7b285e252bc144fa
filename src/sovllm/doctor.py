"""`sovllm doctor`: what this machine has, what is missing, and whether the config is sovereign.

Each check returns a status (`ok`, `warn`, `fail`) and one line of detail that says what to do.
`fail` makes the command exit non-zero; `warn` does not.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

from sovllm import __version__, egress


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _packages() -> list[Check]:
    checks = [Check("python", "ok", f"{platform.python_version()} ({platform.machine()})"),
              Check("sovllm", "ok", __version__)]
    for dist, needed_for in (("torch", "models prepare, train, serve"), ("transformers", "every model stage"),
                             ("peft", "train, serve"), ("gguf", "preparing the bundled model")):
        version = _version(dist)
        if version:
            checks.append(Check(dist, "ok", version))
        else:
            checks.append(Check(dist, "warn", f"not installed (needed for {needed_for}); run 'make install'"))
    return checks


def _compute() -> Check:
    cpus = os.cpu_count() or 1
    if _version("torch") is None:
        return Check("compute", "warn", f"{cpus} CPU cores; torch not installed, GPU unknown")
    import torch

    bnb = _version("bitsandbytes")
    qlora = f"QLoRA via bitsandbytes {bnb}" if bnb else "no QLoRA (pip install 'sovllm[qlora]')"
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16 (no bf16)"
        return Check("compute", "ok", f"{cpus} CPU cores; CUDA: {names}; trains in {precision}; {qlora}; "
                                      f"train.num_processes up to {torch.cuda.device_count()}")
    return Check("compute", "ok", f"{cpus} CPU cores, no GPU: training and serving run in fp32 on the CPU; {qlora}")


def _models() -> list[Check]:
    from sovllm.models.registry import list_models, sovllm_home

    checks = []
    for row in list_models():
        if not row["installed"]:
            checks.append(Check(f"model {row['name']}", "warn", f"not installed; run '{row['install']}'"))
        elif not row["prepared"]:
            checks.append(Check(f"model {row['name']}", "warn",
                                f"installed, not prepared; run 'sovllm models prepare {row['name']}' ({row['note']})"))
        else:
            checks.append(Check(f"model {row['name']}", "ok",
                                f"prepared at {row['path']}, base_id {row['base_id'][:12]}… ({row['note']})"))
    home = sovllm_home()
    probe = home if home.exists() else next((p for p in home.parents if p.exists()), Path("/"))
    free_gb = shutil.disk_usage(probe).free / 1e9
    status = "ok" if free_gb >= 5 else "warn"
    checks.append(Check("disk", status, f"{free_gb:.1f} GB free at {home} (a prepared model takes ~0.6 GB)"))
    return checks


def _vllm(project: Path | None) -> Check:
    """Whether a local vLLM environment is there (the peer sovllm's `vllm` tests and parity runs use)."""
    from sovllm.serve.vllm_server import DEFAULT_VENV, PYTHON_ENV, find_python, version

    python = find_python(project)
    found = version(python) if python is not None else None
    if found is None:
        where = f" at {python}" if python is not None else ""
        return Check("vllm", "warn", f"no local vLLM{where}; optional: 'make vllm' builds {DEFAULT_VENV} "
                                     f"(CPU build) or set {PYTHON_ENV} to a vLLM environment's python")
    return Check("vllm", "ok", f"{found} at {python} (adapters' refusal calibration: "
                               "sovllm.serve.vllm_plugin, installed there)")


def _sovereignty(project: Path | None, overrides: tuple[str, ...]) -> list[Check]:
    checks = []
    offline = all(os.environ.get(k) == v for k, v in egress.PRIVACY_ENV.items())
    checks.append(Check("hub/telemetry opt-outs", "ok" if offline else "fail",
                        "HF_HUB_OFFLINE, HF_HUB_DISABLE_TELEMETRY, DO_NOT_TRACK, MLFLOW_DISABLE_TELEMETRY set"
                        if offline else "not set: run sovllm through its CLI, which sets them"))
    if project is None:
        checks.append(Check("endpoints", "ok", "no project config here; only loopback is allowed"))
        return checks
    from sovllm.config import load_config

    cfg = load_config(project, overrides)
    allow = ", ".join(cfg.egress.allow) or "(loopback only)"
    checks.append(Check("egress.allow", "ok", allow))
    outside = cfg.endpoints_outside_allow_list()
    for key, url in cfg.endpoints().items():
        if key in outside:
            checks.append(Check(key, "fail", f"{url} is outside the allow-list; sovllm will refuse it "
                                             f"(add its host to egress.allow if you run it yourself)"))
        else:
            checks.append(Check(key, "ok", f"{url} (allowed)"))
    if not cfg.endpoints():
        checks.append(Check("endpoint", "ok", "embedded server on a loopback port"))
    return checks


def run_checks(project: str | Path | None = None, overrides: tuple[str, ...] = ()) -> list[Check]:
    """All doctor checks; `project` is a folder with sovllm.yaml (None: machine checks only)."""
    root = None
    if project is not None and (Path(project) / "sovllm.yaml").is_file():
        root = Path(project)
    return [*_packages(), _compute(), *_models(), _vllm(root), *_sovereignty(root, overrides)]
