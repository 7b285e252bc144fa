"""`sovllm bench serve`: an open-loop load test against any OpenAI-compatible server (sovllm or vLLM).

A profile is a list of phases, `name:DURATION@RATE` (`warmup:60s@2rps,spike:2m@12rps`): during
each phase requests start at a fixed rate whether or not earlier ones have finished (open loop,
so a slow server builds a queue instead of slowing the client down). Every request is a streamed
chat completion of one prompt from `eval.jsonl` (the training prompt format), sent to a model
drawn from the mix (`adapter=0.7,base=0.3`: `base` is the server's base model, `adapter` each of
its adapters in turn, any other key a served model name). Measured per request: time to first
token, the gaps between tokens, end-to-end latency, tokens, status. The report gives p50/p95/p99
per phase and overall, throughput and error counts.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import time
from dataclasses import dataclass, field

from sovllm import egress
from sovllm.errors import BackendError, ConfigError, InputError

_PHASE = re.compile(r"^(?P<name>[\w-]+):(?P<value>\d+(?:\.\d+)?)(?P<unit>s|m)@(?P<rate>\d+(?:\.\d+)?)rps$")


@dataclass(frozen=True)
class Phase:
    name: str
    seconds: float
    rate: float


def parse_profile(text: str) -> list[Phase]:
    """'warmup:60s@2rps,spike:60s@12rps' → phases; a one-line error names the bad part."""
    phases = []
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        match = _PHASE.match(part)
        if not match:
            raise ConfigError(f"--profile {part!r}: expected NAME:DURATION@RATE, e.g. spike:60s@12rps "
                              f"(duration in s or m, rate in requests per second)")
        seconds = float(match["value"]) * (60 if match["unit"] == "m" else 1)
        rate = float(match["rate"])
        if seconds <= 0 or rate <= 0:
            raise ConfigError(f"--profile {part!r}: duration and rate must be above 0")
        phases.append(Phase(match["name"], seconds, rate))
    if not phases:
        raise ConfigError("--profile is empty", hint="e.g. --profile 'warmup:60s@2rps,spike:60s@12rps'")
    return phases


def parse_mix(text: str) -> dict[str, float]:
    """'adapter=0.7,base=0.3' → normalised weights."""
    mix = {}
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        name, sep, weight = part.partition("=")
        try:
            value = float(weight)
        except ValueError:
            value = -1.0
        if not sep or not name.strip() or value < 0:
            raise ConfigError(f"--mix {part!r}: expected NAME=WEIGHT, e.g. adapter=0.7,base=0.3")
        mix[name.strip()] = value
    total = sum(mix.values())
    if not mix or total <= 0:
        raise ConfigError("--mix needs at least one positive weight", hint="e.g. --mix adapter=0.7,base=0.3")
    return {k: v / total for k, v in mix.items()}


def load_prompts(path) -> list[list[dict]]:
    """The system + user turns of every record in an eval/train split."""
    from pathlib import Path

    from sovllm.artifacts import read_jsonl

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no prompts file", hint="run 'sovllm curate' first or pass --prompts FILE.jsonl")
    prompts = []
    for n, record in enumerate(read_jsonl(path), 1):
        messages = [m for m in record.get("messages", []) if m.get("role") in ("system", "user")]
        if not messages:
            raise InputError(f"{path}:{n}: the record has no system/user messages",
                             hint="use a split written by 'sovllm curate' (eval.jsonl)")
        prompts.append(messages)
    if not prompts:
        raise InputError(f"{path}: the file holds no records")
    return prompts


@dataclass
class Result:
    phase: str
    model: str
    status: str  # "ok" or an error kind (HTTP status, timeout, connection)
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    e2e: float | None = None
    tokens: int = 0


def quantiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "mean": None}
    ordered = sorted(values)

    def q(p):  # nearest rank: the smallest value with at least p of the values at or below it
        return round(ordered[max(0, math.ceil(p * len(ordered)) - 1)], 4)

    return {"p50": q(0.50), "p95": q(0.95), "p99": q(0.99), "mean": round(sum(ordered) / len(ordered), 4)}


def summarise(results: list[Result], seconds: float) -> dict:
    ok = [r for r in results if r.status == "ok"]
    errors: dict[str, int] = {}
    for r in results:
        if r.status != "ok":
            errors[r.status] = errors.get(r.status, 0) + 1
    tokens = sum(r.tokens for r in ok)
    return {"requests": len(results), "ok": len(ok), "errors": errors, "seconds": round(seconds, 2),
            "requests_per_s": round(len(ok) / seconds, 3) if seconds else None,
            "output_tokens": tokens, "output_tokens_per_s": round(tokens / seconds, 2) if seconds else None,
            "ttft_s": quantiles([r.ttft for r in ok if r.ttft is not None]),
            "inter_token_s": quantiles([g for r in ok for g in r.gaps]),
            "e2e_s": quantiles([r.e2e for r in ok if r.e2e is not None]),
            "by_model": {m: sum(r.model == m for r in results) for m in sorted({r.model for r in results})}}


async def _one(client, openai, phase: str, model: str, messages, max_tokens: int, temperature: float) -> Result:
    started = time.perf_counter()
    result = Result(phase, model, "ok")
    last = None
    try:
        stream = await client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                      temperature=temperature, stream=True,
                                                      stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.usage is not None:
                result.tokens = chunk.usage.completion_tokens
            if not chunk.choices or not chunk.choices[0].delta.content:
                continue
            now = time.perf_counter()
            if last is None:
                result.ttft = now - started
            else:
                result.gaps.append(now - last)
            last = now
        result.e2e = time.perf_counter() - started
    except openai.APIStatusError as exc:
        result.status = f"http_{exc.status_code}"
    except openai.APITimeoutError:
        result.status = "timeout"
    except openai.APIConnectionError:
        result.status = "connection"
    return result


async def run_load(base_url: str, *, phases: list[Phase], mix: dict[str, float], prompts: list[list[dict]],
                   max_tokens: int = 128, temperature: float = 0.0, api_key: str | None = None, seed: int = 0,
                   timeout: float = 120.0, max_in_flight: int = 512, on_result=None) -> dict:
    """Drive the server through `phases`; returns the report (per phase and overall)."""
    import openai


    client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key or "sovllm", max_retries=0, timeout=timeout,
                                http_client=openai.DefaultAsyncHttpxClient(**egress.http_client_options(asynchronous=True)))
    try:
        try:
            served = await client.models.list()
        except openai.APIError as exc:
            blocked = egress.explain(exc)
            if blocked is not None:
                raise blocked from None
            raise BackendError(f"{base_url}/models: {exc}", hint="is the server running, and is --base-url its "
                                                                 "OpenAI base URL (ending in /v1)?") from None
        base = [m.id for m in served.data if getattr(m, "parent", None) is None]
        adapters = [m.id for m in served.data if getattr(m, "parent", None) is not None]
        targets = {}
        for key in mix:
            if key == "base":
                targets[key] = base[:1]
            elif key == "adapter":
                targets[key] = adapters
            else:
                targets[key] = [key] if key in {m.id for m in served.data} else []
            if not targets[key]:
                raise ConfigError(f"--mix {key}: the server at {base_url} serves no such model "
                                  f"(models: {', '.join(m.id for m in served.data)})")
        rng = random.Random(seed)
        keys, weights = list(mix), list(mix.values())
        turn = {k: 0 for k in keys}
        slots = asyncio.Semaphore(max_in_flight)
        results: list[Result] = []
        tasks = []

        async def fire(phase: str, model: str, messages) -> None:
            async with slots:
                result = await _one(client, openai, phase, model, messages, max_tokens, temperature)
            results.append(result)
            if on_result:
                on_result(result)

        started = time.perf_counter()
        for phase in phases:
            phase_start = time.perf_counter()
            count = max(1, round(phase.seconds * phase.rate))
            for i in range(count):
                delay = phase_start + i / phase.rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                key = rng.choices(keys, weights)[0]
                names = targets[key]
                model = names[turn[key] % len(names)]
                turn[key] += 1
                tasks.append(asyncio.create_task(fire(phase.name, model, prompts[rng.randrange(len(prompts))])))
            remaining = phase_start + phase.seconds - time.perf_counter()
            if remaining > 0:
                await asyncio.sleep(remaining)
        await asyncio.gather(*tasks)
        total = time.perf_counter() - started
    finally:
        await client.close()
    report = {"base_url": base_url, "max_tokens": max_tokens, "temperature": temperature, "mix": mix,
              "profile": [{"name": p.name, "seconds": p.seconds, "rate": p.rate} for p in phases],
              "phases": {}, "overall": summarise(results, total)}
    for phase in phases:
        mine = [r for r in results if r.phase == phase.name]
        # a phase's throughput counts its own requests over its own window (tail included in overall)
        report["phases"][phase.name] = summarise(mine, phase.seconds)
    return report
