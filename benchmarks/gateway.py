"""Gateway overhead: `sovllm gateway serve` vs LiteLLM's proxy, both in front of the same upstream.

Four paths to one scripted upstream (`benchmarks.scripted_upstream`, its own process: a fixed
streamed answer of `--tokens` tokens, one every `--interval` seconds): the baseline (clients
straight to the upstream); the floor, a byte relay that parses no HTTP (what any Python proxy costs
at least on this machine: it tells a saturated machine from a slow gateway; `--no-floor`); ours
(one tenant, one key, through `sovllm gateway serve`); the peer (LiteLLM's proxy from `make
litellm`, `.venv-litellm`: one `openai/...` model_list entry with `api_base` at the upstream, a
master key, no database, no callbacks, telemetry off and the local model cost map, so it runs
offline). Each server is a process of its own, one worker each; the client is this process
(httpx, async, one connection per stream, raw SSE parsing).

Measured, the paths taking turns (baseline, floor, ours, peer, baseline, floor, ours, peer, ...):

* TTFT (request sent -> first non-empty content delta) at 1 stream and at `--streams` concurrent
  streams (closed loop), and the TTFT each path adds: its percentile minus the baseline's;
* the open-loop rate each path sustains, stepping `--rates` up. A step is sustained when no request
  fails, the completions in the window reach 95% of the offered rate and p99 TTFT (timed from each
  request's scheduled arrival) stays under `--ttft-bound-ms`. Then the added TTFT at the highest
  rate our gateway sustains (or `--rate`), every path at that rate;
* proxy CPU-seconds per 1,000 proxied tokens (utime + stime from /proc of the proxy process and its
  children, before and after each phase), the upstream's and the client's alongside, and the CPU
  other people's processes used meanwhile (the machine is shared: a busy neighbour shows there);
* throughput in front of the real embedded server (`sovllm serve`, the bundled model): `--embedded-
  streams` streams of short prompts, tokens/s direct and through our gateway, taking turns.

Prints JSON: baseline, floor, ours, peer and the targets of the issue (added p99 TTFT <= 5 ms at
`--streams` streams; at most half of LiteLLM's added latency) as measured. Every process it starts
is stopped on exit, Ctrl-C and SIGTERM included.

    .venv/bin/python benchmarks/gateway.py              # about 9 minutes on 2 cores
    .venv/bin/python benchmarks/gateway.py --quick      # about 5 minutes: shorter phases, 1 round
    .venv/bin/python benchmarks/gateway.py --rate 50 --skip-embedded --skip-peer
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: `benchmarks` is importable from the repository root
    sys.path.insert(0, str(ROOT))

from benchmarks.gateway_load import (  # noqa: E402
    MODEL,
    OURS,
    QUIET,
    Phase,
    Sample,
    Target,
    added,
    body,
    client,
    closed_loop,
    log,
    measured,
    merge,
    one,
    open_loop,
    summary,
    sustained,
)

LITELLM = ROOT / ".venv-litellm" / "bin" / "litellm"
OUR_KEY = "sk-bench-" + "7" * 32
PEER_KEY = "sk-litellm-" + "8" * 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- processes ----------------------------------------------------------------------------------------


class Processes:
    """Every server this run starts, each in its own process group, stopped together at the end."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.running: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, args: list[str], env: dict | None = None) -> subprocess.Popen:
        from sovllm.procs import dies_with_parent

        out = (self.workdir / f"{name}.log").open("ab")
        proc = subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env or os.environ.copy(),
                                start_new_session=True, preexec_fn=dies_with_parent(signal.SIGKILL))
        self.running.append((name, proc))
        return proc

    def log_tail(self, name: str, chars: int = 3000) -> str:
        try:
            return (self.workdir / f"{name}.log").read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # the group: LiteLLM's workers too, if it forked any
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.running = [(n, p) for n, p in self.running if p is not proc]

    def stop_all(self) -> None:
        for _, proc in reversed(list(self.running)):
            if isinstance(proc, subprocess.Popen):
                self.stop(proc)
            else:  # an EmbeddedServer: its own SIGTERM-then-SIGKILL
                proc.stop()
                self.running = [(n, p) for n, p in self.running if p is not proc]


def wait_ready(procs: Processes, name: str, proc: subprocess.Popen, probe: str, ready: Path | None = None,
               timeout: float = 120) -> dict:
    """Wait for the ready file (if any), then for `probe` (a URL, or a path on the ready file's port) to answer 200."""
    deadline = time.monotonic() + timeout
    info: dict = {}
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited with {proc.returncode} while starting:\n{procs.log_tail(name)}")
        if ready is not None and not info and ready.is_file():
            info = json.loads(ready.read_text())
        url = probe if probe.startswith("http") else (f"http://127.0.0.1:{info['port']}{probe}" if info else None)
        if url:
            try:
                if httpx.get(url, timeout=2, trust_env=False).status_code == 200:
                    return info
            except httpx.HTTPError:
                pass
        time.sleep(0.1)
    raise SystemExit(f"{name} was not ready after {timeout:.0f} s:\n{procs.log_tail(name)}")


def start_upstream(procs: Processes, args) -> dict:
    ready = procs.workdir / "upstream.ready"
    proc = procs.start("upstream", [sys.executable, "-m", "benchmarks.scripted_upstream", "--port", "0",
                                    "--base", MODEL, "--tokens", str(args.tokens), "--interval", str(args.interval),
                                    "--ready-file", str(ready)])
    info = wait_ready(procs, "upstream", proc, "/health", ready)
    OURS.append(info["pid"])
    return {"url": f"http://127.0.0.1:{info['port']}", "pid": info["pid"], "proc": proc}


def start_gateway(procs: Processes, name: str, upstream_v1: str, model: str) -> dict:
    """`sovllm gateway serve` on a fresh project: one tenant, one hashed key, one model."""
    from sovllm.gateway.keys import digest

    root = procs.workdir / name
    root.mkdir(exist_ok=True)
    gateway = {"upstreams": [{"url": upstream_v1}],
               "tenants": {"bench": {"keys": [{"sha256": digest(OUR_KEY)}], "models": [model]}}}
    (root / "sovllm.yaml").write_text(yaml.safe_dump({"project": {"name": name}, "gateway": gateway}))
    ready = root / "ready.json"
    proc = procs.start(name, [sys.executable, "-m", "sovllm", "gateway", "serve", str(root), "--port", "0",
                              "--ready-file", str(ready), "--log-level", "warning"])
    info = wait_ready(procs, name, proc, "/health", ready)
    OURS.append(info["pid"])
    return {"url": f"http://127.0.0.1:{info['port']}", "pid": info["pid"], "proc": proc}


def litellm_env() -> dict:
    """LiteLLM offline: the bundled cost map instead of the download, telemetry off, no proxies."""
    env = {k: v for k, v in os.environ.items()
           if not k.lower().endswith("_proxy") and not k.startswith(("SOVLLM_EGRESS", "LITELLM_", "DATABASE_URL"))}
    env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_TELEMETRY_DISABLED="true", DO_NOT_TRACK="1",
               LITELLM_LOG="ERROR", NO_DOCS="True", DISABLE_ADMIN_UI="True")
    return env


def start_litellm(procs: Processes, upstream_v1: str, model: str) -> dict:
    config = {"model_list": [{"model_name": model, "litellm_params": {"model": f"openai/{model}",
                                                                      "api_base": upstream_v1,
                                                                      "api_key": "sk-upstream-unused"}}],
              "litellm_settings": {"drop_params": True, "set_verbose": False, "callbacks": [],
                                   "success_callback": [], "failure_callback": []},
              "general_settings": {"master_key": PEER_KEY, "disable_spend_logs": True, "disable_error_logs": True}}
    path = procs.workdir / "litellm.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    proc = procs.start("litellm", [str(LITELLM), "--config", str(path), "--host", "127.0.0.1", "--port", str(port),
                                   "--num_workers", "1"], env=litellm_env())
    wait_ready(procs, "litellm", proc, f"http://127.0.0.1:{port}/health/liveliness", timeout=180)
    OURS.append(proc.pid)
    text = procs.log_tail("litellm", 200_000)
    fetched = [line for line in text.splitlines() if "cost map" in line.lower() and "fail" in line.lower()]
    return {"url": f"http://127.0.0.1:{port}", "pid": proc.pid, "proc": proc,
            "offline_check": "no cost-map download attempted" if not fetched else f"cost map fetch: {fetched[0]}"}


def litellm_version() -> str | None:
    try:
        out = subprocess.run([str(LITELLM.parent / "python"), "-c",
                              "import importlib.metadata as m; print(m.version('litellm'))"],
                             capture_output=True, text=True, timeout=60, env=litellm_env())
        return out.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


# --- the floor: a byte relay --------------------------------------------------------------------------


def serve_relay(upstream_port: int, ready: str) -> None:
    """A TCP relay that copies bytes both ways without parsing HTTP: what any Python proxy costs at least
    (one read and one write per event), to tell a busy machine from a slow gateway."""

    class Pipe(asyncio.Protocol):
        def __init__(self, peer=None):
            self.peer, self.transport, self.pending = peer, None, []

        def connection_made(self, transport):
            self.transport = transport
            if self.peer is None:  # a client connected: open its upstream connection
                self.peer = Pipe(self)
                asyncio.ensure_future(asyncio.get_running_loop().create_connection(
                    lambda: self.peer, "127.0.0.1", upstream_port))
            else:
                for data in self.pending:
                    transport.write(data)

        def data_received(self, data):
            if self.peer.transport is None:
                self.peer.pending.append(data)  # the request, before the upstream connection is open
            else:
                self.peer.transport.write(data)

        def connection_lost(self, exc):
            if self.peer is not None and self.peer.transport is not None:
                self.peer.transport.close()

    async def run():
        server = await asyncio.get_running_loop().create_server(Pipe, "127.0.0.1", 0)
        tmp = ready + ".tmp"
        Path(tmp).write_text(json.dumps({"port": server.sockets[0].getsockname()[1], "pid": os.getpid()}))
        os.replace(tmp, ready)
        await server.serve_forever()

    asyncio.run(run())


def start_relay(procs: Processes, upstream_port: int) -> dict:
    ready = procs.workdir / "relay.ready"
    proc = procs.start("relay", [sys.executable, str(Path(__file__).resolve()), "--serve-relay", str(upstream_port),
                                 str(ready)])
    info = wait_ready(procs, "relay", proc, "/health", ready)
    OURS.append(info["pid"])
    return {"url": f"http://127.0.0.1:{info['port']}", "pid": info["pid"], "proc": proc}


# --- the runs -----------------------------------------------------------------------------------------


async def scripted(args, targets: list[Target], upstream_pid: int) -> dict:
    content = body(MODEL, args.tokens)
    result: dict = {}

    async def turns(label: str, rounds: int, run) -> dict:
        phases: dict[str, list[Phase]] = {t.name: [] for t in targets}
        for r in range(rounds):
            for t in targets:
                log(f"{label}: round {r + 1}, {t.name}")
                phases[t.name].append(await measured(t, upstream_pid, lambda phase, t=t: run(t, phase)))
        rows = {name: summary(merge(p)) for name, p in phases.items()}
        for name, p in phases.items():  # the pooled tail can hide one odd round: each round's, to judge it
            rows[name]["ttft_p99_ms_per_round"] = [summary(x)["ttft_p99_ms"] for x in p]
        return {**rows, "added_ttft_ms": added(rows)}

    log("warm-up")
    for t in targets:
        await closed_loop(t, 8, None, 32, content)
    if args.single_requests:
        result["single_stream"] = await turns("1 stream", args.rounds, lambda t, _: closed_loop(
            t, 1, None, args.single_requests, content))
    stagger = args.tokens * args.interval  # one answer's length: the streams spread over it
    result[f"streams_{args.streams}"] = await turns(f"{args.streams} streams", args.rounds, lambda t, _: closed_loop(
        t, args.streams, args.seconds, None, content, stagger))

    rate = args.rate
    if rate is None:
        steps, alive = [], [t for t in targets]
        for i, step in enumerate(args.rates):
            if not alive:
                break
            order = alive[i % len(alive):] + alive[:i % len(alive)]  # who goes first rotates
            row: dict = {"offered_rps": step}
            for t in order:
                for attempt in (1, 2):  # a failed step is tried once more before the path is dropped
                    log(f"rate {step:g}/s: {t.name}" + (" (again)" if attempt == 2 else ""))
                    phase = await measured(t, upstream_pid, lambda phase, t=t: open_loop(
                        t, step, args.step_seconds, content, phase))
                    row[t.name] = {**summary(phase), "attempt": attempt}
                    row[t.name]["sustained"] = sustained(row[t.name], args.ttft_bound_ms)
                    if row[t.name]["sustained"]:
                        break
            alive = [t for t in alive if row[t.name]["sustained"]]
            steps.append(row)
        best = {t.name: max([s["offered_rps"] for s in steps if s.get(t.name, {}).get("sustained")], default=None)
                for t in targets}
        result["rate_steps"] = steps
        result["max_sustained_rps"] = best
        rate = best.get("ours") or args.rates[0]
    how = ("--rate" if args.rate else "the highest step our gateway sustained (before the first step it failed "
                                      "twice), else the lowest step")
    result["at_rate"] = {"rate_rps": rate, "chosen_as": how, **await turns(
        f"rate {rate}/s", args.rounds, lambda t, phase: open_loop(t, rate, args.rate_seconds, content, phase))}
    for t in targets:
        result["at_rate"][t.name]["sustained"] = sustained(result["at_rate"][t.name], args.ttft_bound_ms)
    return result


async def embedded(args, procs: Processes) -> dict:
    """Tokens/s of the real embedded server, direct and through our gateway, taking turns."""
    from sovllm.serve.launch import EmbeddedServer

    prompts = [f"Write one sentence about the number {i}." for i in range(args.embedded_streams * 2)]
    server = EmbeddedServer(args.model, extra_args=["--max-num-seqs", str(max(16, args.embedded_streams))])
    procs.running.append(("embedded", server))  # stopped with the rest (EmbeddedServer.stop)
    log(f"embedded: starting sovllm serve --model {args.model}")
    started = time.perf_counter()
    server.start()
    startup = time.perf_counter() - started
    gw = start_gateway(procs, "gateway-embedded", server.base_url, server.served_name)
    targets = [Target("baseline", server.base_url + "/chat/completions", {}, None, server.served_name),
               Target("ours", gw["url"] + "/v1/chat/completions", {"authorization": f"Bearer {OUR_KEY}"}, gw["pid"],
                      server.served_name)]
    server_pid = server.process.pid
    OURS.append(server_pid)

    async def run(t: Target) -> list[Sample]:
        queue = list(prompts)
        samples: list[Sample] = []
        async with client() as http:
            async def worker():
                while queue:
                    samples.append(Sample())
                    await one(http, t, body(t.model, args.embedded_tokens, queue.pop(), usage=True, ignore_eos=True),
                              time.perf_counter(), samples[-1])

            workers = [asyncio.ensure_future(worker()) for _ in range(args.embedded_streams)]
            _, pending = await asyncio.wait(workers, timeout=args.embedded_seconds)
            for task in pending:  # cut off: what every request streamed so far counts
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        return samples

    async with client() as http:  # warm-up
        for t in targets:
            await one(http, t, body(t.model, 4, "Hi.", usage=True), time.perf_counter())
    runs: dict[str, list[dict]] = {t.name: [] for t in targets}
    for r in range(args.rounds):
        for t in targets:
            log(f"embedded: round {r + 1}, {t.name}")
            phase = await measured(t, server_pid, lambda _, t=t: run(t))
            row = summary(phase)
            produced = sum(s.usage if s.usage is not None else s.tokens for s in phase.samples if not s.error)
            row["completion_tokens"] = produced
            row["cut_off_after_s"] = args.embedded_seconds if any(s.end == 0.0 for s in phase.samples) else None
            row["tokens_per_s"] = round(produced / phase.wall, 1)
            row["server_cpu_s"] = row.pop("upstream_cpu_s")
            runs[t.name].append(row)
    from statistics import median

    med = {name: median(r["tokens_per_s"] for r in rows) for name, rows in runs.items()}
    return {"model": args.model, "served_name": server.served_name, "server_startup_s": round(startup, 1),
            "streams": args.embedded_streams, "requests_per_run": len(prompts), "max_tokens": args.embedded_tokens,
            "tokens_per_s_median": med, "throughput_ratio_ours_over_direct": round(med["ours"] / med["baseline"], 3),
            "runs": runs}


def verdict(result: dict) -> dict:
    """The issue's targets and the ratios, as measured. An added latency is only judged where the
    baseline itself kept up (at a rate it did not sustain, its own tail makes the difference meaningless)."""
    scripted, out = result.get("scripted", {}), {}
    for key in [k for k in scripted if k.startswith("streams_")] + ["at_rate"]:
        rows = scripted.get(key) or {}
        if rows.get("baseline", {}).get("sustained") is False:
            out[f"{key}: not judged"] = "the baseline did not sustain this rate"
            continue
        add = rows.get("added_ttft_ms", {})
        ours, peer = add.get("ours"), add.get("peer")
        if ours:
            out[f"{key}: ours added p99 <= 5 ms"] = ours["p99"] <= 5.0
        if ours and peer:
            for q in ("p50", "p99"):
                ratio = round(ours[q] / peer[q], 3) if peer[q] > 0 else "peer added <= 0"
                out[f"{key}: ours added {q} / peer added {q} (target <= 0.5)"] = ratio
        cpu = {who: rows.get(who, {}).get("proxy_cpu_s_per_1k_tokens") for who in ("ours", "peer")}
        if cpu["ours"] and cpu["peer"]:
            out[f"{key}: proxy CPU per token, ours / peer"] = round(cpu["ours"] / cpu["peer"], 3)
    if isinstance(result.get("embedded"), dict) and "throughput_ratio_ours_over_direct" in result["embedded"]:
        out["embedded: tokens/s through ours / direct"] = result["embedded"]["throughput_ratio_ours_over_direct"]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64, help="tokens per scripted answer")
    parser.add_argument("--interval", type=float, default=0.005, help="seconds between the upstream's tokens")
    parser.add_argument("--streams", type=int, default=32, help="concurrent streams of the closed-loop run")
    parser.add_argument("--seconds", type=float, default=10, help="seconds per path and round at --streams")
    parser.add_argument("--single-requests", type=int, default=15, help="requests per path and round at 1 stream "
                                                                        "(0: skip)")
    parser.add_argument("--rounds", type=int, default=2, help="turns of every path per measurement")
    parser.add_argument("--rates", default="25,50,75,100,150",
                        help="open-loop request rates (req/s) to step through, comma-separated")
    parser.add_argument("--step-seconds", type=float, default=5, help="seconds per rate step and path")
    parser.add_argument("--rate", type=float, default=None, help="skip the stepping: measure at this rate")
    parser.add_argument("--rate-seconds", type=float, default=8, help="seconds per path and round at the rate")
    parser.add_argument("--ttft-bound-ms", type=float, default=100, help="a sustained step keeps p99 TTFT below "
                                                                         "this")
    parser.add_argument("--quiet-wait", type=float, default=60, help="before each phase, wait up to this many "
                                                                     "seconds for other processes to go quiet")
    parser.add_argument("--skip-peer", action="store_true", help="without LiteLLM")
    parser.add_argument("--no-floor", action="store_true", help="without the byte-relay floor path")
    parser.add_argument("--serve-relay", nargs=2, metavar=("UPSTREAM_PORT", "READY_FILE"), help=argparse.SUPPRESS)
    parser.add_argument("--skip-embedded", action="store_true", help="without the sovllm serve throughput run")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model of the embedded server")
    parser.add_argument("--embedded-streams", type=int, default=16)
    parser.add_argument("--embedded-tokens", type=int, default=64)
    parser.add_argument("--embedded-seconds", type=float, default=60, help="cut an embedded run off after this "
                                                                           "(tokens streamed so far count)")
    parser.add_argument("--quick", action="store_true", help="shorter: 1 round, 4-6 s phases, rates 25,50,100, "
                                                             "8 embedded streams")
    args = parser.parse_args(argv)
    if args.serve_relay:
        serve_relay(int(args.serve_relay[0]), args.serve_relay[1])
        return 0
    if args.quick:
        args.rounds, args.seconds, args.single_requests, args.rate_seconds = 1, 6, 10, 6
        args.step_seconds, args.embedded_streams = 4, 8
        if args.rates == parser.get_default("rates"):
            args.rates = "25,50,100"
    args.rates = [float(r) for r in args.rates.split(",") if r.strip()]
    QUIET["max_wait_s"] = args.quiet_wait

    def interrupted(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored (`cmd &`)
    result: dict = {"benchmark": "gateway-overhead",
                    "command": " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/gateway.py",
                                                                  *(sys.argv[1:] if argv is None else argv)]),
                    "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                                "load_average_at_start": os.getloadavg()},
                    "setup": {"upstream": f"benchmarks.scripted_upstream, {args.tokens} tokens streamed every "
                                          f"{args.interval * 1000:g} ms",
                              "ours": "sovllm gateway serve, 1 process, asyncio loop, egress guard on (as shipped)",
                              "floor": "a byte relay (asyncio, no HTTP parsing; --no-floor drops it): the least a "
                                       "Python proxy costs on this machine, to tell a busy machine from a slow "
                                       "gateway",
                              "client": "this process: httpx async, raw SSE parsing, one connection per stream",
                              "ttft": "closed loop: from sending the request (streams started staggered over one "
                                      "answer's length, the ramp not counted); open loop: from its scheduled "
                                      "arrival; added = gateway percentile minus baseline percentile",
                              "sustained": f"no errors, completions >= 95% of the offered rate, p99 TTFT <= "
                                           f"{args.ttft_bound_ms:g} ms"}}
    procs = Processes(Path(tempfile.mkdtemp(prefix="sovllm-gwbench-")))
    try:
        up = start_upstream(procs, args)
        ours = start_gateway(procs, "gateway", up["url"] + "/v1", MODEL)
        targets = [Target("baseline", up["url"] + "/v1/chat/completions", {}, None)]
        if not args.no_floor:
            relay = start_relay(procs, int(up["url"].rsplit(":", 1)[1]))
            targets.append(Target("floor", relay["url"] + "/v1/chat/completions", {}, relay["pid"]))
        targets.append(Target("ours", ours["url"] + "/v1/chat/completions", {"authorization": f"Bearer {OUR_KEY}"},
                              ours["pid"]))
        if args.skip_peer:
            result["setup"]["peer"] = "skipped (--skip-peer)"
        elif not LITELLM.exists():
            result["setup"]["peer"] = "not installed: run `make litellm`"
        else:
            peer = start_litellm(procs, up["url"] + "/v1", MODEL)
            targets.append(Target("peer", peer["url"] + "/v1/chat/completions",
                                  {"authorization": f"Bearer {PEER_KEY}"}, peer["pid"]))
            result["setup"]["peer"] = (f"LiteLLM proxy {litellm_version()} (.venv-litellm), 1 worker, uvicorn with "
                                       "uvloop (its default), master key, no database, no callbacks, "
                                       "LITELLM_LOCAL_MODEL_COST_MAP=True, LITELLM_TELEMETRY_DISABLED=true; "
                                       + peer["offline_check"])
        started = time.perf_counter()
        result["scripted"] = asyncio.run(scripted(args, targets, up["pid"]))
        result["scripted"]["seconds"] = round(time.perf_counter() - started, 1)
        procs.stop_all()
        if not args.skip_embedded:
            from sovllm.models import registry

            try:
                registry.prepare(args.model)
            except Exception as exc:  # noqa: BLE001 - reported, not hidden
                result["embedded"] = {"error": f"model {args.model} is not available: {exc}"}
            else:
                result["embedded"] = asyncio.run(embedded(args, procs))
    except KeyboardInterrupt:
        log(f"interrupted: stopping every server this run started (logs in {procs.workdir})")
        procs.stop_all()
        return 130
    except BaseException:
        log(f"failed: the servers' logs are in {procs.workdir}")
        raise
    else:
        shutil.rmtree(procs.workdir, ignore_errors=True)
    finally:
        procs.stop_all()
    result["machine"]["load_average_at_end"] = os.getloadavg()
    result["machine"]["waited_for_other_processes_s"] = round(QUIET["waited_s"], 1)
    result["machine"]["phases_started_while_others_busy"] = QUIET["phases_started_busy"]
    result["targets_and_ratios"] = verdict(result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
