"""Device, precision, QLoRA and process layout, checked against the machine's facts before training."""

from __future__ import annotations

import pytest

from sovllm.config import TrainSection
from sovllm.errors import ConfigError
from sovllm.train.hardware import Machine, plan

CPU = Machine(cpus=2, bitsandbytes="0.50.2")
T4 = Machine(cuda_devices=1, bf16=False, gpu_name="Tesla T4", bitsandbytes="0.50.2", cpus=8)
H100X2 = Machine(cuda_devices=2, bf16=True, gpu_name="NVIDIA H100", bitsandbytes="0.50.2", cpus=32)


@pytest.mark.parametrize("machine, expected", [(CPU, ("cpu", "fp32")), (T4, ("cuda", "fp16")),
                                               (H100X2, ("cuda", "bf16"))])
def test_auto_picks_the_device_and_the_best_precision_it_has(machine, expected):
    layout = plan(TrainSection(), machine)
    assert (layout.device, layout.precision, layout.processes, layout.qlora) == (*expected, 1, False)


def test_cpu_threads_are_shared_between_processes():
    assert plan(TrainSection(num_processes=2), CPU).threads == 1
    assert plan(TrainSection(), CPU).threads == 2
    assert plan(TrainSection(threads=3), CPU).threads == 3


@pytest.mark.parametrize("settings, machine, message", [
    ({"device": "cuda"}, CPU, "train.device is cuda but torch sees no CUDA GPU"),
    ({"precision": "bf16"}, T4, "Tesla T4 has no bf16"),
    ({"precision": "fp16"}, CPU, "fp16, which torch does not train in on a CPU"),
    ({"qlora": True}, Machine(cpus=2), "train.qlora needs bitsandbytes"),
    ({"distributed": "fsdp"}, H100X2, "fsdp is not supported yet"),
    ({"num_processes": 4}, H100X2, "train.num_processes is 4 but torch sees 2 GPU"),
    ({"num_processes": 3}, CPU, "this machine has 2 CPU cores"),
])
def test_what_the_machine_cannot_do_is_refused_with_the_setting_to_change(settings, machine, message):
    with pytest.raises(ConfigError, match=message) as info:
        plan(TrainSection(**settings), machine)
    assert info.value.hint and "train." in info.value.hint


def test_explicit_settings_the_machine_has_are_kept():
    layout = plan(TrainSection(qlora=True, precision="fp16", num_processes=2), H100X2)
    assert (layout.device, layout.precision, layout.qlora, layout.processes) == ("cuda", "fp16", True, 2)
    assert "4-bit NF4" in layout.describe()
    assert plan(TrainSection(precision="bf16"), CPU).precision == "bf16"  # slow on a CPU, but it runs
