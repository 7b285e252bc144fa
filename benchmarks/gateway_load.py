"""The load side of `benchmarks/gateway.py`: streamed requests, closed and open loops, CPU accounting.

A request is timed from when it was sent (closed loop) or scheduled (open loop) to its first
non-empty content delta; the SSE stream is parsed by hand so that the client costs every path the
same. CPU-seconds come from /proc: of a proxy process and its children, of the upstream, of this
client, and of the processes this run did not start (the machine is shared: before each phase it
waits for them to go quiet, and reports what they used meanwhile).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass, field

import httpx

MODEL = "base-model"
TICK = os.sysconf("SC_CLK_TCK")

def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float | None:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` and every live descendant, plus the children it has reaped."""
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry)] = fields
        children.setdefault(int(fields[1]), []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        if p in stats:
            f = stats[p]  # after the ")": state=0, ppid=1, ..., utime=11, stime=12, cutime=13, cstime=14
            total += int(f[11]) + int(f[12]) + (int(f[13]) + int(f[14]) if p == pid else 0)
        todo += children.get(p, [])
    return total / TICK


def machine_busy() -> float:
    """CPU-seconds the machine has spent in processes since boot (user, nice, system; not interrupts)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return sum(fields[:3]) / TICK


OURS: list[int] = []  # pids of the servers this run started, for telling our CPU from other people's


def own_cpu() -> float:
    return sum(cpu_seconds(pid) for pid in OURS) + time.process_time()


QUIET = {"max_wait_s": 60.0, "waited_s": 0.0, "phases_started_busy": 0}


async def settle() -> None:
    """Wait (at most QUIET["max_wait_s"]) until other people's processes use under a quarter of a core,
    measured over one second: the machine is shared, and a neighbour's test run would be measured too."""
    started = time.perf_counter()
    while True:
        busy, own = machine_busy(), own_cpu()
        await asyncio.sleep(1.0)
        others = (machine_busy() - busy) - (own_cpu() - own)
        waited = time.perf_counter() - started
        if others < 0.25 or waited >= QUIET["max_wait_s"]:
            break
        if waited < 1.5:
            log(f"  the machine is busy ({others:.2f} cores used by other processes): waiting")
    QUIET["waited_s"] += max(0.0, waited - 1.0)
    if others >= 0.25:
        QUIET["phases_started_busy"] += 1


# --- the client ---------------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    url: str               # .../v1/chat/completions
    headers: dict
    pid: int | None        # the proxy process (None for the baseline)
    model: str = MODEL


@dataclass
class Sample:
    ttft: float | None = None
    end: float = 0.0
    tokens: int = 0
    usage: int | None = None
    error: str | None = None


def body(model: str, tokens: int, prompt: str = "Say something.", usage: bool = False, ignore_eos: bool = False):
    payload = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True,
               "max_tokens": tokens, "temperature": 0}
    if usage:
        payload["stream_options"] = {"include_usage": True}
    if ignore_eos:
        payload["ignore_eos"] = True
    return json.dumps(payload).encode()


async def one(client: httpx.AsyncClient, target: Target, content: bytes, t0: float,
              sample: Sample | None = None) -> Sample:
    """One streamed request; TTFT from `t0` to the first non-empty content delta (into `sample`, so a
    request cancelled part-way still shows what it received)."""
    sample = sample if sample is not None else Sample()
    try:
        async with client.stream("POST", target.url, content=content,
                                 headers={**target.headers, "content-type": "application/json"}) as response:
            if response.status_code != 200:
                await response.aread()
                sample.error = f"HTTP {response.status_code}: {response.text[:200]}"
                return sample
            buffer = b""
            async for chunk in response.aiter_raw():
                buffer += chunk
                *events, buffer = buffer.split(b"\n\n")
                for event in events:
                    data = event[5:].strip() if event.startswith(b"data:") else b""
                    if not data or data == b"[DONE]":
                        continue
                    message = json.loads(data)
                    if "error" in message:
                        sample.error = str(message["error"])[:200]
                        continue
                    if message.get("usage"):
                        sample.usage = message["usage"].get("completion_tokens")
                    for choice in message.get("choices") or ():
                        if (choice.get("delta") or {}).get("content"):
                            sample.tokens += 1
                            if sample.ttft is None:
                                sample.ttft = time.perf_counter() - t0
    except httpx.HTTPError as exc:
        sample.error = f"{type(exc).__name__}: {exc}"
    sample.end = time.perf_counter()
    return sample


def client() -> httpx.AsyncClient:
    return httpx.AsyncClient(limits=httpx.Limits(max_connections=2000, max_keepalive_connections=2000),
                             timeout=httpx.Timeout(120.0, connect=10.0), trust_env=False)


@dataclass
class Phase:
    samples: list[Sample] = field(default_factory=list)
    wall: float = 0.0
    proxy_cpu: float | None = None
    upstream_cpu: float = 0.0
    client_cpu: float = 0.0
    offered: float | None = None
    achieved: float | None = None
    others_cpu: float = 0.0  # CPU-seconds used meanwhile by processes this run did not start


async def measured(target: Target, upstream_pid: int, run) -> Phase:
    """Run `run(phase)` (returns the samples) with the CPU time of proxy, upstream and client around it."""
    await settle()
    phase = Phase()
    before = (cpu_seconds(target.pid) if target.pid else None, cpu_seconds(upstream_pid), time.process_time(),
              machine_busy(), own_cpu())
    started = time.perf_counter()
    phase.samples = await run(phase)
    phase.wall = time.perf_counter() - started
    if target.pid:
        phase.proxy_cpu = cpu_seconds(target.pid) - before[0]
    phase.upstream_cpu = cpu_seconds(upstream_pid) - before[1]
    phase.client_cpu = time.process_time() - before[2]
    phase.others_cpu = max(0.0, (machine_busy() - before[3]) - (own_cpu() - before[4]))
    return phase


async def closed_loop(target: Target, streams: int, seconds: float | None, requests: int | None,
                      content: bytes, stagger: float = 0.0) -> list[Sample]:
    """`streams` workers sending back to back, for `seconds` or `requests` requests in all.

    Worker i starts after i * stagger / streams seconds, so the streams do not run in lockstep;
    with `seconds`, requests started before the last worker's first one ends (the ramp) are not kept.
    """
    samples: list[Sample] = []
    left = [requests] if requests else None
    async with client() as http:
        started = time.perf_counter()
        deadline = started + stagger + (seconds or 1e9)
        keep_after = started + 2 * stagger if seconds else 0.0

        async def worker(i: int):
            await asyncio.sleep(i * stagger / streams)
            while time.perf_counter() < deadline:
                if left is not None:
                    if left[0] <= 0:
                        return
                    left[0] -= 1
                sent = time.perf_counter()
                sample = await one(http, target, content, sent)
                if sent >= keep_after:
                    samples.append(sample)

        await asyncio.gather(*(worker(i) for i in range(streams)))
    return samples


async def open_loop(target: Target, rate: float, seconds: float, content: bytes, phase_out: Phase,
                    drain: float = 10.0) -> list[Sample]:
    """Arrivals at a fixed rate (evenly spaced) for `seconds`; TTFT from each scheduled arrival.

    Requests still running `drain` seconds after the last arrival are cancelled and count as errors
    (a path far past its capacity would otherwise take minutes to catch up)."""
    n = int(rate * seconds)
    async with client() as http:
        t0 = time.perf_counter() + 0.05
        tasks = []
        for i in range(n):
            at = t0 + i / rate
            delay = at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(http, target, content, at)))
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, t0 + seconds + drain - time.perf_counter()))
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    samples = [t.result() if not t.cancelled() else Sample(error=f"unfinished {drain:g} s after the last arrival",
                                                           end=time.perf_counter()) for t in tasks]
    # completions per second inside the steady window [t0 + 1 s, t0 + seconds]
    done = sum(1 for s in samples if not s.error and t0 + 1.0 <= s.end <= t0 + seconds)
    phase_out.offered, phase_out.achieved = rate, done / (seconds - 1.0)
    return samples


def summary(phase: Phase) -> dict:
    ok = [s for s in phase.samples if not s.error]
    ttfts = [s.ttft for s in ok if s.ttft is not None]
    tokens = sum(s.tokens for s in ok)
    errors = [s.error for s in phase.samples if s.error]
    out = {"requests": len(phase.samples), "errors": len(errors), "tokens": tokens,
           "ttft_p50_ms": ms(percentile(ttfts, 0.5)), "ttft_p99_ms": ms(percentile(ttfts, 0.99)),
           "wall_s": round(phase.wall, 2), "upstream_cpu_s": round(phase.upstream_cpu, 2),
           "client_cpu_s": round(phase.client_cpu, 2), "other_processes_cpu_s": round(phase.others_cpu, 2)}
    if phase.proxy_cpu is not None:
        out["proxy_cpu_s"] = round(phase.proxy_cpu, 2)
        out["proxy_cpu_s_per_1k_tokens"] = round(phase.proxy_cpu / tokens * 1000, 4) if tokens else None
    if phase.offered is not None:
        out["offered_rps"], out["achieved_rps"] = phase.offered, round(phase.achieved, 1)
    if errors:
        out["first_error"] = errors[0]
    return out


def merge(phases: list[Phase]) -> Phase:
    """Pool the samples and CPU of several rounds of one path."""
    pooled = Phase(samples=[s for p in phases for s in p.samples], wall=sum(p.wall for p in phases),
                   upstream_cpu=sum(p.upstream_cpu for p in phases), client_cpu=sum(p.client_cpu for p in phases),
                   others_cpu=sum(p.others_cpu for p in phases))
    if all(p.proxy_cpu is not None for p in phases):
        pooled.proxy_cpu = sum(p.proxy_cpu for p in phases)
    if all(p.achieved is not None for p in phases):
        pooled.offered, pooled.achieved = phases[0].offered, sum(p.achieved for p in phases) / len(phases)
    return pooled


def added(rows: dict[str, dict]) -> dict:
    """Each gateway's TTFT percentile minus the baseline's (ms)."""
    base = rows["baseline"]
    out = {}
    for who in ("floor", "ours", "peer"):
        if who in rows and rows[who].get("ttft_p50_ms") is not None:
            out[who] = {q: round(rows[who][f"ttft_{q}_ms"] - base[f"ttft_{q}_ms"], 2) for q in ("p50", "p99")}
    return out


def sustained(row: dict, bound_ms: float) -> bool:
    return (row["errors"] == 0 and row["achieved_rps"] >= 0.95 * row["offered_rps"]
            and row["ttft_p99_ms"] is not None and row["ttft_p99_ms"] <= bound_ms)
