"""One decode step of the embedded engine: `--rows` sequences with `--prompt`-token contexts, base model.

Prompts are cut from the example corpus; every sequence is prefilled once, then `--steps` decode steps
(after 3 warm-up steps) are timed and their mean printed as JSON. Compare two versions of the
engine by running this alternately against each source tree (`PYTHONPATH=<tree>/src`), since the
machine's speed drifts.

    .venv/bin/python benchmarks/decode.py [--rows 32] [--prompt 1000] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    args = parser.parse_args(argv)

    import torch

    from sovllm import egress
    from sovllm.models import registry
    from sovllm.models.tokenizer import load_tokenizer
    from sovllm.serve.engine import Engine, Request
    from sovllm.serve.sampling import SamplingParams

    egress.install([])
    info = registry.prepare(args.model)
    tokenizer = load_tokenizer(info.path)
    text = " ".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "examples/acme/documents").rglob("*.md")))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stride = max(1, (len(ids) - args.prompt) // max(1, args.rows))
    engine = Engine(info.path, tokenizer, max_num_seqs=args.rows, max_model_len=args.prompt + 3 + args.steps + 8,
                    threads=2)
    params = SamplingParams(max_tokens=args.steps + 8, temperature=0.0, ignore_eos=True)
    with torch.inference_mode():
        for i in range(args.rows):
            engine.submit(Request(id=f"r{i}", prompt_ids=ids[i * stride:i * stride + args.prompt], params=params,
                                  adapter=None, emit=lambda event: None))
        started = time.perf_counter()
        while len(engine._running) < args.rows:
            engine._iteration()
        prefill = time.perf_counter() - started
        for _ in range(3):
            engine._decode()
        started = time.perf_counter()
        for _ in range(args.steps):
            engine._decode()
        step = (time.perf_counter() - started) / args.steps
    print(json.dumps({"rows": args.rows, "prompt_tokens": args.prompt, "prefill_s": round(prefill, 2),
                      "decode_step_ms": round(step * 1000, 1), "tokens_per_s": round(args.rows / step, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
