"""Where and in which precision training runs: `train.device`, `train.precision`, `train.qlora`,
`train.num_processes` and `train.distributed`, checked against the machine before anything loads.

`plan` is pure (the machine's facts come in as a `Machine`), so every combination is tested
without a GPU; `probe` reads the facts from torch and bitsandbytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from sovllm.config import TrainSection
from sovllm.errors import ConfigError


@dataclass(frozen=True)
class Machine:
    """What training can use here."""

    cuda_devices: int = 0
    bf16: bool = False  # every visible GPU computes in bf16 (compute capability ≥ 8.0)
    gpu_name: str = ""
    bitsandbytes: str | None = None  # installed version
    cpus: int = 1


@dataclass(frozen=True)
class Hardware:
    """The resolved settings a training process uses."""

    device: str  # "cpu" | "cuda"
    precision: str  # "fp32" | "bf16" | "fp16"
    qlora: bool
    processes: int
    threads: int  # torch threads per process

    @property
    def torch_dtype(self):
        import torch

        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]

    def describe(self) -> str:
        where = f"{self.processes} × {self.device}" if self.processes > 1 else self.device
        base = "4-bit NF4 base (QLoRA)" if self.qlora else f"{self.precision} base"
        return f"{where}, {self.precision} compute, {base}, {self.threads} threads per process"

    def as_dict(self) -> dict:
        return {"device": self.device, "precision": self.precision, "qlora": self.qlora,
                "processes": self.processes, "threads": self.threads}


def probe() -> Machine:
    """The facts of this machine, read from torch (and bitsandbytes' metadata, without importing it)."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    try:
        bnb = version("bitsandbytes")
    except PackageNotFoundError:
        bnb = None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return Machine(cuda_devices=count, bf16=bool(count) and torch.cuda.is_bf16_supported(),
                   gpu_name=torch.cuda.get_device_name(0) if count else "", bitsandbytes=bnb,
                   cpus=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def plan(section: TrainSection, machine: Machine) -> Hardware:
    """The device, precision and process layout `section` asks for, or a ConfigError saying why this
    machine cannot do it and what to set instead."""
    device = section.device if section.device != "auto" else ("cuda" if machine.cuda_devices else "cpu")
    if device == "cuda" and not machine.cuda_devices:
        raise ConfigError("train.device is cuda but torch sees no CUDA GPU on this machine",
                          hint="set train.device: auto (or cpu), or install a CUDA build of torch on a GPU node")
    precision = section.precision
    if precision == "auto":
        precision = ("bf16" if machine.bf16 else "fp16") if device == "cuda" else "fp32"
    if device == "cuda" and precision == "bf16" and not machine.bf16:
        raise ConfigError(f"train.precision is bf16 but {machine.gpu_name or 'this GPU'} has no bf16 "
                          "(it needs compute capability 8.0, e.g. A100, L4, H100)",
                          hint="set train.precision: fp16 (or auto, which picks fp16 here)")
    if device == "cpu" and precision == "fp16":
        raise ConfigError("train.precision is fp16, which torch does not train in on a CPU",
                          hint="set train.precision: fp32 (or auto); bf16 runs on a CPU but is much slower there")
    if section.qlora and not machine.bitsandbytes:
        raise ConfigError("train.qlora needs bitsandbytes (4-bit NF4 weights), which is not installed",
                          hint="pip install 'sovllm[qlora]', or set train.qlora: false")
    if section.distributed == "fsdp":
        raise ConfigError("train.distributed: fsdp is not supported yet (the LoRA weights are small; data parallel "
                          "covers models whose base fits one device, and QLoRA shrinks the base 4×)",
                          hint="set train.distributed: ddp, and train.qlora: true if the base does not fit one GPU")
    processes = section.num_processes
    if device == "cuda" and processes > machine.cuda_devices:
        raise ConfigError(f"train.num_processes is {processes} but torch sees {machine.cuda_devices} GPU(s); "
                          "data parallel training runs one process per GPU",
                          hint=f"set train.num_processes: {machine.cuda_devices} or less")
    if device == "cpu" and processes > machine.cpus:
        raise ConfigError(f"train.num_processes is {processes} but this machine has {machine.cpus} CPU cores",
                          hint=f"set train.num_processes: {machine.cpus} or less")
    threads = section.threads or (max(1, machine.cpus // processes) if device == "cpu" else
                                  max(1, min(4, machine.cpus // processes)))
    return Hardware(device=device, precision=precision, qlora=section.qlora, processes=processes, threads=threads)
