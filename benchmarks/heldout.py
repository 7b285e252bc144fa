"""Hand-written questions against a served adapter: what a user asking about their documents gets.

Reads a question file (`labels/heldout.jsonl` of an example project: `question`, `doc` — the
document's path relative to the project —, `section` — the heading the question is about —,
`answer` — the reference, null when unanswerable — and `kind`: `answerable` or
`on_topic_unanswerable`), puts each question into the training prompt format with the chunk of
`doc` that holds `section` as its gold context, and asks the base model and the adapter through
the embedded server (`sovllm serve`, which applies the adapter's refusal calibration). The
questions were written by hand, not by synth, and nothing was tuned on them.

    .venv/bin/python benchmarks/heldout.py examples/klinik [--adapter DIR] [--out FILE]

Prints, per model: token F1 and false refusals on the answerable questions, refusals of the
on-topic unanswerable ones, and the stop rate over all.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import openai

from sovllm.artifacts import read_jsonl
from sovllm.config import load_config
from sovllm.curate.records import make_record
from sovllm.evaluate.metrics import is_refusal, token_f1
from sovllm.models.adapter import adapter_name
from sovllm.serve.launch import EmbeddedServer


def gold_chunk(chunks: list[dict], doc: str, section: str) -> dict:
    """The chunk of `doc` (a path under the documents folder) whose text has the `section` heading."""
    own = [c for c in chunks if c["source"]["path"] == doc or f"documents/{c['source']['path']}" == doc]
    for chunk in own:
        if any(line.lstrip("# ").strip() == section.strip() for line in chunk["text"].splitlines()):
            return chunk
    if own and any(section in (c.get("heading_path") or []) for c in own):
        return next(c for c in own if section in (c.get("heading_path") or []))
    raise SystemExit(f"{doc}: no chunk holds the section {section!r}; run 'sovllm ingest' on the project first")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("project", type=Path)
    parser.add_argument("--questions", type=Path, default=None, help="default: <project>/labels/heldout.jsonl")
    parser.add_argument("--adapter", type=Path, default=None, help="default: <project>/out/train/adapter")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=None, help="write the per-question answers here (JSON)")
    args = parser.parse_args(argv)

    cfg = load_config(args.project)
    out = args.project / cfg.project.output_dir
    adapter = args.adapter or out / "train" / "adapter"
    questions = list(read_jsonl(args.questions or args.project / "labels" / "heldout.jsonl"))
    chunks = list(read_jsonl(out / "ingest" / "chunks.jsonl"))
    name = adapter_name(cfg)
    prompts = []
    for q in questions:
        chunk = gold_chunk(chunks, q["doc"], q["section"])
        record = make_record(q["id"], prompt=cfg.prompt, contexts=[chunk], question=q["question"], answer="-",
                             chunk=chunk, type_=q["kind"])
        prompts.append(record["messages"][:2])
    rows = []
    with EmbeddedServer(cfg.model.base, adapters={name: str(adapter)}) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=600)
        base = next(m.id for m in client.models.list().data if m.id != name)
        for model in (base, name):
            for q, messages in zip(questions, prompts):
                reply = client.chat.completions.create(model=model, messages=messages, max_tokens=args.max_tokens,
                                                       temperature=0.0)
                text = reply.choices[0].message.content or ""
                rows.append({"model": "base" if model == base else "adapter", "id": q["id"], "kind": q["kind"],
                             "question": q["question"], "answer": text, "reference": q.get("answer"),
                             "refused": is_refusal(text, cfg.prompt.refusal),
                             "f1": token_f1(text, q["answer"]) if q.get("answer") else None,
                             "stopped": reply.choices[0].finish_reason == "stop"})
    summary = {}
    for model in ("base", "adapter"):
        mine = [r for r in rows if r["model"] == model]
        answerable = [r for r in mine if r["kind"] == "answerable"]
        unanswerable = [r for r in mine if r["kind"] != "answerable"]
        summary[model] = {
            "answerable": len(answerable), "on_topic_unanswerable": len(unanswerable),
            "f1": round(sum(r["f1"] for r in answerable) / max(1, len(answerable)), 3),
            "false_refusals": sum(r["refused"] for r in answerable),
            "on_topic_refused": sum(r["refused"] for r in unanswerable),
            "stop_rate": round(sum(r["stopped"] for r in mine) / max(1, len(mine)), 3),
        }
        s = summary[model]
        print(f"{model}: token F1 {s['f1']:.3f} on {s['answerable']} answerable questions, false refusals "
              f"{s['false_refusals']}/{s['answerable']}; on-topic unanswerable refused {s['on_topic_refused']}/"
              f"{s['on_topic_unanswerable']}; stop rate {s['stop_rate']:.1%}")
    if args.out:
        args.out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
