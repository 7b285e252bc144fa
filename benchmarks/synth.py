"""QA generation throughput: pairs/min at concurrency 1 vs 8 (and 16) against the embedded server.

The same chunks (default 40, seeded sample of the example corpus), the same prompts, sampling and
`max_tokens` at every level; each level starts from an empty cache (reuse off), so every level
does the same work. The baseline is concurrency 1. Prints JSON with pairs/min, generated tokens,
prompt and generation time per level and the speed-up over concurrency 1.

    .venv/bin/python benchmarks/synth.py [--chunks 40] [--levels 1,8,16]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=40)
    parser.add_argument("--levels", default="1,8,16")
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    from sovllm import egress
    from sovllm.config import load_config
    from sovllm.endpoint import open_endpoint
    from sovllm.ingest import stage as ingest
    from sovllm.synth import stage as synth

    egress.install([])
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp) / "acme"
        shutil.copytree(ROOT / "examples" / "acme", project, ignore=shutil.ignore_patterns("out"))
        cfg = load_config(project)
        ingest.run(project, cfg, warn=lambda _: None)
        cfg.synth.concurrency = max(levels)
        with open_endpoint(cfg) as endpoint:
            report = synth.sweep(project, cfg, endpoint, levels, args.chunks, log=lambda m: print(m, file=sys.stderr))
    rows = report["levels"]
    base = rows[0]
    result = {
        "benchmark": "synth-concurrency",
        "chunks": args.chunks,
        "baseline": {"name": f"concurrency {base['concurrency']}", **base},
        "ours": {f"concurrency {r['concurrency']}": r for r in rows[1:]},
        "speedup_pairs_per_min": {str(r["concurrency"]): round(r["pairs_per_min"] / base["pairs_per_min"], 2)
                                  for r in rows[1:]},
        "recommended_concurrency": report["recommended_concurrency"],
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    sys.exit(main())
