"""Serving throughput: `sovllm serve` vs plain `generate()` on the same model directory.

Every request has its own prompt of 400-600 tokens cut from the example corpus and generates
exactly `--tokens` tokens (`ignore_eos`). Ours: the server as a subprocess, driven by the real
`openai` async client with 1 stream and with `--streams` concurrent streams. Peer: plain
transformers `generate()` on the same prepared model, one prompt at a time (single stream) and as
one static batch of `--streams` left-padded prompts. Prints JSON with tokens/s and the ratios.

    .venv/bin/python benchmarks/serve.py [--streams 8] [--tokens 128]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def corpus_prompts(tokenizer, count: int, low: int = 400, high: int = 600) -> list[str]:
    """`count` distinct prompts of low..high tokens from the example corpus."""
    from benchmarks.ingest import corpus_markdown

    paragraphs = [text for level, text in corpus_markdown() if not level]
    prompts, current = [], []
    for paragraph in paragraphs:
        current.append(paragraph)
        n = len(tokenizer("\n\n".join(current), add_special_tokens=False)["input_ids"])
        if n >= low:
            if n <= high:
                prompts.append("\n\n".join(current) + "\n\nSummarise the text above.")
            current = []
        if len(prompts) == count:
            break
    if len(prompts) < count:
        raise SystemExit(f"the corpus gave only {len(prompts)} prompts of {low}-{high} tokens")
    return prompts


def peer_generate(model_dir, tokenizer, prompts: list[str], tokens: int, batch: int) -> float:
    """Output tokens/s of plain generate(), `batch` prompts at a time (left padding)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    produced, started = 0, time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(texts), batch):
            enc = tokenizer(texts[i:i + batch], return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(**enc, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            produced += (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]
    return produced / (time.perf_counter() - started)


async def ours(base_url: str, model: str, prompts: list[str], tokens: int, streams: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    queue = list(prompts)
    produced, ttfts = 0, []

    async def worker():
        nonlocal produced
        while queue:
            prompt = queue.pop()
            sent = time.perf_counter()
            first = None
            stream = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": prompt}], max_tokens=tokens, temperature=0,
                stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            async for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter() - sent
                if chunk.usage:
                    produced += chunk.usage.completion_tokens
            ttfts.append(first)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(streams)))
    wall = time.perf_counter() - started
    await client.close()
    ttfts.sort()
    return {"tokens_per_s": round(produced / wall, 1), "requests": len(prompts), "ttft_p50_s": round(ttfts[len(ttfts) // 2], 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from sovllm import egress
    from sovllm.models import registry
    from sovllm.models.tokenizer import load_tokenizer
    from sovllm.serve.launch import EmbeddedServer

    egress.install([])
    info = registry.prepare(args.model)
    tokenizer = load_tokenizer(info.path)
    prompts = corpus_prompts(tokenizer, 3 + 2 * args.streams)
    single_prompts, multi_prompts = prompts[:3], prompts[3:]
    with EmbeddedServer(args.model, extra_args=["--max-num-seqs", str(max(16, args.streams))]) as server:
        single = asyncio.run(ours(server.base_url, server.served_name, single_prompts, args.tokens, 1))
        multi = asyncio.run(ours(server.base_url, server.served_name, multi_prompts, args.tokens, args.streams))
    peer_single = peer_generate(info.path, tokenizer, single_prompts, args.tokens, 1)
    peer_batch = peer_generate(info.path, tokenizer, multi_prompts[:args.streams], args.tokens, args.streams)
    result = {
        "benchmark": "serve-throughput",
        "tokens_per_request": args.tokens,
        "ours": {"single_stream": single, f"{args.streams}_streams": multi},
        "peer": {"name": "transformers generate()", "single_stream_tokens_per_s": round(peer_single, 1),
                 f"static_batch_{args.streams}_tokens_per_s": round(peer_batch, 1)},
        "ratio_single_stream": round(single["tokens_per_s"] / peer_single, 2),
        f"ratio_{args.streams}_streams_vs_generate_single": round(multi["tokens_per_s"] / peer_single, 2),
        f"ratio_{args.streams}_streams_vs_static_batch": round(multi["tokens_per_s"] / peer_batch, 2),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
