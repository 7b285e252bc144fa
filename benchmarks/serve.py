"""Serving throughput: `sovllm serve` vs plain `generate()` and `transformers serve --continuous-batching`.

Every request has its own prompt of 400-600 tokens cut from the example corpus (no prompt repeats
within a run) and generates exactly `--tokens` tokens (`ignore_eos`). Ours: the server as a
subprocess with 4 random LoRA adapters, driven by the real `openai` async client with 1 stream,
with `--streams` streams on the base model, and with `--streams` streams spread over the 4 adapters
and the base. Peers on the same machine and model directory: (a) sequential `generate()`, one
request at a time, switching PEFT adapters per request as the mixed traffic asks; the same
`generate()` as one static batch of `--streams` prompts (base); (b) `transformers serve
--continuous-batching` loaded from the prepared directory by path (base only). Reports output
tokens/s, TTFT and inter-token latency p50/p95, and the ratios the serving targets are stated in.

With `--vllm`, the real peer: vLLM's CPU build (`make vllm`) serves the same model directory and the
same 4 adapters (`--lora-modules`) at its best on this machine (compute on every core, tcmalloc and
libiomp5 preloaded: `sovllm.serve.vllm_server.cpu_env`; without sovllm's refusal plugin, which these
adapters do not need), and the three rows run on both servers in turn, `--alternations` times
(ours, vLLM, ours, vLLM, ...; one server up at a time), with the medians reported.

    .venv/bin/python benchmarks/serve.py [--streams 32] [--tokens 128] [--rounds 2]
    .venv/bin/python benchmarks/serve.py --vllm [--alternations 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = 4


def corpus_prompts(tokenizer, count: int, low: int = 400, high: int = 600) -> list[str]:
    """`count` distinct prompts of low..high tokens: windows of consecutive corpus paragraphs."""
    from benchmarks.ingest import corpus_markdown

    paragraphs = [text for level, text in corpus_markdown() if not level]
    prompts = []
    for start in range(len(paragraphs)):
        window = []
        for paragraph in paragraphs[start:]:
            window.append(paragraph)
            n = len(tokenizer("\n\n".join(window), add_special_tokens=False)["input_ids"])
            if n >= low:
                if n <= high:
                    prompts.append("\n\n".join(window) + "\n\nSummarise the text above.")
                break
        if len(prompts) == count:
            return prompts
    raise SystemExit(f"the corpus gave only {len(prompts)} prompts of {low}-{high} tokens")


def percentile(values: list[float], q: float) -> float | None:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4) if ordered else None


def stats(produced: int, wall: float, ttfts: list[float], gaps: list[float]) -> dict:
    return {"tokens_per_s": round(produced / wall, 1), "output_tokens": produced, "wall_s": round(wall, 1),
            "ttft_p50_s": percentile(ttfts, 0.5), "ttft_p95_s": percentile(ttfts, 0.95),
            "itl_p50_s": percentile(gaps, 0.5), "itl_p95_s": percentile(gaps, 0.95)}


async def drive(base_url: str, jobs: list[tuple[str, str]], tokens: int, streams: int, ignore_eos: bool = True,
                time_limit: float | None = None, tokenizer=None) -> dict:
    """Run (model, prompt) jobs through `streams` concurrent streaming clients.

    Output tokens come from the streamed usage. With `time_limit`, the run stops after that many
    seconds and the text streamed so far by every request (finished or not) is counted with
    `tokenizer`: the throughput of a server too slow to finish the jobs in reasonable time.
    """
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=1800)
    queue = list(reversed(jobs))
    produced, ttfts, gaps, texts = 0, [], [], []

    async def worker():
        nonlocal produced
        while queue:
            model, prompt = queue.pop()
            sent = last = time.perf_counter()
            first, chunks, usage = True, 0, None
            text: list[str] = []
            texts.append(text)
            stream = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": prompt}], max_tokens=tokens, temperature=0,
                stream=True, stream_options={"include_usage": True},
                extra_body={"ignore_eos": True} if ignore_eos else None)
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    now = time.perf_counter()
                    (ttfts if first else gaps).append(now - (sent if first else last))
                    first, last, chunks = False, now, chunks + 1
                    text.append(chunk.choices[0].delta.content)
                if chunk.usage:
                    usage = chunk.usage.completion_tokens
            produced += usage if usage is not None else chunks

    started = time.perf_counter()
    workers = [asyncio.ensure_future(worker()) for _ in range(streams)]
    done, pending = await asyncio.wait(workers, timeout=time_limit)
    wall = time.perf_counter() - started
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        task.result()  # surface a failed request
    await client.close()
    if pending:  # cut off: count what every request streamed so far
        produced = sum(len(tokenizer("".join(t), add_special_tokens=False)["input_ids"]) for t in texts if t)
        return {**stats(produced, wall, ttfts, gaps), "cut_off_after_s": time_limit,
                "requests_started": len(texts), "requests_unfinished": len(pending)}
    return stats(produced, wall, ttfts, gaps)


def load_model(model_dir, adapters: dict[str, Path] | None = None):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    if adapters:
        from peft import PeftModel

        names = list(adapters)
        model = PeftModel.from_pretrained(model, str(adapters[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(str(adapters[name]), adapter_name=name)
        model.eval()
    return model


def peer_generate(model, tokenizer, jobs: list[tuple[str | None, str]], tokens: int, batch: int) -> dict:
    """Plain generate(), `batch` prompts at a time (left padding); with PEFT, the adapter is set per request."""
    import torch

    tokenizer.padding_side = "left"
    produced, started, ttfts = 0, time.perf_counter(), []
    with torch.inference_mode():
        for i in range(0, len(jobs), batch):
            group = jobs[i:i + batch]
            texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                   add_generation_prompt=True) for _, p in group]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            adapter = group[0][0]
            sent = time.perf_counter()
            if hasattr(model, "set_adapter"):
                if adapter is None:
                    with model.disable_adapter():
                        out = model.generate(**enc, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                             pad_token_id=tokenizer.pad_token_id)
                else:
                    model.set_adapter(adapter)
                    out = model.generate(**enc, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                         pad_token_id=tokenizer.pad_token_id)
            else:
                out = model.generate(**enc, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            ttfts.append(time.perf_counter() - sent)  # no streaming: the whole answer arrives at once
            produced += (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]
    wall = time.perf_counter() - started
    return {"tokens_per_s": round(produced / wall, 1), "output_tokens": produced, "wall_s": round(wall, 1),
            "request_latency_p50_s": percentile(ttfts, 0.5)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def transformers_serve(model_dir, jobs: list[str], tokens: int, streams: int, time_limit: float,
                       tokenizer) -> dict:
    """Peer (b): `transformers serve --continuous-batching` on the same directory, base model only.

    Measured over at most `time_limit` seconds (tokens streamed in that window), since it may not
    finish the jobs in any reasonable time on a CPU.
    """
    import httpx

    exe = Path(sys.executable).parent / "transformers"
    port = free_port()
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    proc = subprocess.Popen([str(exe), "serve", str(model_dir), "--continuous-batching", "--host", "127.0.0.1",
                             "--port", str(port), "--device", "cpu", "--dtype", "float32"],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                log.seek(0)
                return {"error": f"transformers serve exited with {proc.returncode}: {log.read()[-2000:]}"}
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                return {"error": "transformers serve did not become healthy in 300 s"}
            time.sleep(1)
        # it refuses vLLM's ignore_eos (422), so answers may stop before `tokens`: output_tokens says how many came
        asyncio.run(drive(base_url, [(str(model_dir), jobs[0])], 4, 1, ignore_eos=False))  # warm-up
        return {**asyncio.run(drive(base_url, [(str(model_dir), p) for p in jobs], tokens, streams, ignore_eos=False,
                                    time_limit=time_limit, tokenizer=tokenizer)),
                "note": "no ignore_eos support: answers may end before max_tokens"}
    except Exception as exc:  # noqa: BLE001 - a peer failure is reported, not hidden
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def rows(base_url: str, base: str, single, many, mixed, tokens: int, streams: int, log) -> dict:
    """The three measured rows on one server: single stream, `streams` on the base, `streams` mixed."""
    log("  single stream")
    out = {"single_stream": asyncio.run(drive(base_url, [(base, p) for p in single], tokens, 1))}
    log(f"  {streams} streams, base only")
    out["base_only"] = asyncio.run(drive(base_url, [(base, p) for p in many], tokens, streams))
    log(f"  {streams} streams, 4 adapters + base")
    out["mixed_adapters"] = asyncio.run(drive(base_url, [(m or base, p) for m, p in mixed], tokens, streams))
    return out


def versus_vllm(args, info, single, many, log) -> dict:
    """sovllm serve and vLLM on the same prompts and adapters, alternating; medians per row and ratios."""
    from statistics import median

    from sovllm.models.tiny import make_random_adapter
    from sovllm.serve.launch import EmbeddedServer
    from sovllm.serve.vllm_server import VLLMServer

    runs: dict[str, list[dict]] = {"sovllm": [], "vllm": []}
    with tempfile.TemporaryDirectory() as tmp:
        adapters = {f"lora{i}": str(make_random_adapter(info.path, Path(tmp) / f"lora{i}", rank=8, seed=i, scale=0.3,
                                                        target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
                                                        base_id=info.base_id)) for i in range(ADAPTERS)}
        names = [None, *adapters]
        mixed = [(names[i % len(names)], p) for i, p in enumerate(many)]
        vllm_env = None
        for turn in range(args.alternations):
            log(f"round {turn + 1}: sovllm serve")
            with EmbeddedServer(args.model, adapters=adapters,
                                extra_args=["--max-num-seqs", str(max(16, args.streams))]) as server:
                asyncio.run(drive(server.base_url, [(server.served_name, single[0])], 4, 1))  # warm-up
                runs["sovllm"].append(rows(server.base_url, server.served_name, single, many, mixed, args.tokens,
                                           args.streams, log))
            log(f"round {turn + 1}: vLLM")
            with VLLMServer(info.path, served_name=info.name, adapters=adapters, max_loras=ADAPTERS, max_lora_rank=8,
                            calibration=False, extra_args=["--max-num-seqs", str(max(16, args.streams))]) as server:
                vllm_env = {k: v for k, v in server.environment().items()
                            if k.startswith(("VLLM_CPU", "LD_PRELOAD", "VLLM_USE_V2"))}
                asyncio.run(drive(server.base_url, [(info.name, single[0])], 4, 1))
                runs["vllm"].append(rows(server.base_url, info.name, single, many, mixed, args.tokens, args.streams,
                                         log))
    keys = ("tokens_per_s", "ttft_p50_s", "ttft_p95_s", "itl_p50_s")
    medians = {who: {row: {k: median(r[row][k] for r in results) for k in keys} for row in results[0]}
               for who, results in runs.items()}
    ratios = {row: round(medians["sovllm"][row]["tokens_per_s"] / medians["vllm"][row]["tokens_per_s"], 2)
              for row in medians["sovllm"]}
    return {"benchmark": "serve-vs-vllm", "tokens_per_request": args.tokens, "streams": args.streams,
            "requests_per_concurrent_run": len(many), "adapters": ADAPTERS, "alternations": args.alternations,
            "vllm_env": vllm_env, "medians": medians, "throughput_ratio_sovllm_over_vllm (target >= 1.5)": ratios,
            "runs": runs}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="requests per stream in the concurrent runs")
    parser.add_argument("--single", type=int, default=3, help="requests in the single-stream runs")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--skip-transformers-serve", action="store_true")
    parser.add_argument("--only-transformers-serve", action="store_true", help="run only peer (b)")
    parser.add_argument("--peer-b-seconds", type=float, default=300,
                        help="measure peer (b) over at most this many seconds (it may not finish on a CPU)")
    parser.add_argument("--vllm", action="store_true", help="compare with vLLM (CPU build) only: the three rows "
                                                            "on both servers, alternating")
    parser.add_argument("--alternations", type=int, default=2, help="with --vllm: rounds of ours-then-vLLM")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from sovllm import egress
    from sovllm.models import registry
    from sovllm.models.tiny import make_random_adapter
    from sovllm.models.tokenizer import load_tokenizer
    from sovllm.serve.launch import EmbeddedServer

    egress.install([])
    info = registry.prepare(args.model)
    tokenizer = load_tokenizer(info.path)
    n = args.streams * args.rounds
    prompts = corpus_prompts(tokenizer, args.single + n)
    single, many = prompts[:args.single], prompts[args.single:]
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if args.vllm:
        egress.uninstall()  # vLLM cannot run under the in-process guard; every server here is on loopback
        print(json.dumps(versus_vllm(args, info, single, many, log), indent=2))
        return 0
    if args.only_transformers_serve:
        print(json.dumps({"transformers_serve_continuous_batching": transformers_serve(
            info.path, many, args.tokens, args.streams, args.peer_b_seconds, tokenizer)}, indent=2))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        adapters = {f"lora{i}": make_random_adapter(info.path, Path(tmp) / f"lora{i}", rank=8, seed=i, scale=0.3,
                                                    target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
                                                    base_id=info.base_id) for i in range(ADAPTERS)}
        names = [None, *adapters]  # None = base
        mixed = [(names[i % len(names)], p) for i, p in enumerate(many)]
        result: dict = {"benchmark": "serve-throughput", "tokens_per_request": args.tokens, "streams": args.streams,
                        "requests_per_concurrent_run": n, "adapters": ADAPTERS, "ours": {}, "peers": {}}
        with EmbeddedServer(args.model, adapters={k: str(v) for k, v in adapters.items()},
                            extra_args=["--max-num-seqs", str(max(16, args.streams))]) as server:
            base = server.served_name
            log("ours: single stream")
            result["ours"]["single_stream"] = asyncio.run(drive(server.base_url, [(base, p) for p in single],
                                                                args.tokens, 1))
            log(f"ours: {args.streams} streams, base only")
            result["ours"]["base_only"] = asyncio.run(drive(server.base_url, [(base, p) for p in many],
                                                            args.tokens, args.streams))
            log(f"ours: {args.streams} streams, 4 adapters + base")
            result["ours"]["mixed_adapters"] = asyncio.run(drive(
                server.base_url, [(m or base, p) for m, p in mixed], args.tokens, args.streams))
        log("peer (a): sequential generate() with adapter switching")
        model = load_model(info.path, adapters)
        result["peers"]["generate_sequential_adapter_switching"] = peer_generate(
            model, tokenizer, [(m, p) for m, p in mixed[:args.single + 2]], args.tokens, 1)
        result["peers"]["generate_single_stream_base"] = peer_generate(
            model, tokenizer, [(None, p) for p in single], args.tokens, 1)
        log(f"peer: generate() static batch of {args.streams}, base")
        result["peers"][f"generate_static_batch_{args.streams}"] = peer_generate(
            model, tokenizer, [(None, p) for p in many[:args.streams]], args.tokens, args.streams)
        del model
    if not args.skip_transformers_serve:
        log(f"peer (b): transformers serve --continuous-batching, {args.streams} streams, base")
        result["peers"]["transformers_serve_continuous_batching"] = transformers_serve(
            info.path, many, args.tokens, args.streams, args.peer_b_seconds, tokenizer)
    ours, peers = result["ours"], result["peers"]
    tps = lambda d: d.get("tokens_per_s") if isinstance(d, dict) else None  # noqa: E731
    ratios = {
        "base_only_vs_static_batch (gate >= 1)": tps(ours["base_only"]) / tps(peers[f"generate_static_batch_{args.streams}"]),
        "mixed_vs_peer_a (gate >= 10)": tps(ours["mixed_adapters"]) / tps(peers["generate_sequential_adapter_switching"]),
        "base_only_vs_peer_a (gate >= 10)": tps(ours["base_only"]) / tps(peers["generate_sequential_adapter_switching"]),
        "single_stream_vs_generate_single (target >= 0.9)": tps(ours["single_stream"]) / tps(peers["generate_single_stream_base"]),
        "mixed_vs_base_only (target >= 0.7)": tps(ours["mixed_adapters"]) / tps(ours["base_only"]),
    }
    peer_b = peers.get("transformers_serve_continuous_batching")
    if peer_b and tps(peer_b):
        ratios["base_only_vs_transformers_serve (stretch >= 3)"] = tps(ours["base_only"]) / tps(peer_b)
    result["ratios"] = {k: round(v, 2) for k, v in ratios.items()}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
