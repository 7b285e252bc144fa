"""Serving fixtures: a tiny base model with three distinct random adapters, and an engine driver."""

from __future__ import annotations

import threading
import time

import pytest

from sovllm.serve.engine import Engine, Request
from sovllm.serve.sampling import SamplingParams

ADAPTER_SPECS = {  # name: (rank, target modules, seed)
    "r2": (2, ("q_proj", "v_proj"), 11),
    "r4": (4, ("q_proj", "k_proj", "v_proj", "o_proj"), 12),
    "r8": (8, ("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"), 13),
}


@pytest.fixture(scope="session")
def tiny_adapters(tiny_model_dir, tmp_path_factory):
    from sovllm.models.tiny import make_random_adapter

    root = tmp_path_factory.mktemp("adapters")
    return {name: make_random_adapter(tiny_model_dir, root / name, rank=r, target_modules=t, seed=s)
            for name, (r, t, s) in ADAPTER_SPECS.items()}


class Collector:
    """Collects one request's engine events; `done` is set when all its sequences finished."""

    def __init__(self, n: int = 1):
        self.events: list[dict] = []
        self.remaining = n
        self.done = threading.Event()

    def __call__(self, event: dict) -> None:
        self.events.append(event)
        if event["finish_reason"]:
            self.remaining -= 1
            if not self.remaining:
                self.done.set()

    def tokens(self, index: int = 0) -> list[int]:
        return [e["token"] for e in self.events if e["index"] == index and e["token"] is not None]

    def text(self, index: int = 0) -> str:
        return "".join(e["text"] for e in self.events if e["index"] == index)

    def wait(self, timeout: float = 120) -> "Collector":
        assert self.done.wait(timeout), "engine did not finish in time"
        return self


def submit(engine: Engine, prompt_ids, adapter=None, request_id=None, refusal_bias=None, **params) -> Collector:
    collector = Collector(params.get("n", 1))
    engine.submit(Request(request_id or f"r{time.monotonic_ns()}", list(prompt_ids), SamplingParams(**params),
                          adapter, collector, refusal_bias=refusal_bias))
    return collector
