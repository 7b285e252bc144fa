"""sovllm's import layering: no cycles between modules, and imports only go down the layers.

LAYERS is the written-down architecture (docs/architecture.md "Layers" says the same in words).
A new package or top-level module fails this test until it is given a layer.
"""

from __future__ import annotations

from pathlib import Path

from tests.layering import cycles, import_graph, layer_violations

SRC = Path(__file__).resolve().parents[1] / "src"

# Top to bottom. A module may import its own package and anything in a lower layer; members of
# one layer do not import each other.
LAYERS = [
    ["sovllm.__main__"],
    ["sovllm.cli"],
    ["sovllm.pipeline", "sovllm.doctor", "sovllm.project", "sovllm.deploy"],
    ["sovllm.evaluate"],
    ["sovllm.train"],
    ["sovllm.curate"],
    ["sovllm.retrieval"],
    ["sovllm.synth"],
    ["sovllm.ingest"],
    ["sovllm.endpoint"],
    ["sovllm.gateway"],
    ["sovllm.monitoring"],
    ["sovllm.serve"],
    ["sovllm.models"],
    ["sovllm.artifacts", "sovllm.progress", "sovllm.layout", "sovllm.objectstore"],
    ["sovllm.config"],
    ["sovllm.egress"],
    ["sovllm.egress_spawn", "sovllm.egress_log"],
    ["sovllm.stats", "sovllm.text", "sovllm.procs"],
    ["sovllm.errors"],
    ["sovllm"],
]


def test_no_import_cycles_between_sovllm_modules():
    found = cycles(import_graph(SRC, "sovllm"))
    assert not found, "import cycles (counting imports inside functions):\n" + "\n".join(map(" ↔ ".join, found))


def test_imports_follow_the_layers():
    problems = layer_violations(import_graph(SRC, "sovllm"), LAYERS)
    assert not problems, "imports against the layering (tests/test_layering.py LAYERS):\n" + "\n".join(problems)


def _package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "src" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "src"


def test_the_checker_finds_a_planted_cycle_and_an_upward_import(tmp_path):
    # A clean two-layer package, then the same with one function-local import back up.
    clean = {"pkg/__init__.py": "", "pkg/low.py": "import os\n",
             "pkg/high/__init__.py": "", "pkg/high/a.py": "from pkg import low\nfrom . import b\n",
             "pkg/high/b.py": "from pkg.low import thing\n"}
    layers = [["pkg.high"], ["pkg.low"], ["pkg"]]
    src = _package(tmp_path / "clean", clean)
    graph = import_graph(src, "pkg")
    assert graph["pkg.high.a"] == {"pkg.low", "pkg.high.b"} and graph["pkg.high.b"] == {"pkg.low"}
    assert cycles(graph) == [] and layer_violations(graph, layers) == []

    planted = dict(clean, **{"pkg/low.py": "def f():\n    from pkg.high.a import g\n"})
    graph = import_graph(_package(tmp_path / "planted", planted), "pkg")
    assert cycles(graph) == [["pkg.high.a", "pkg.high.b", "pkg.low"]]
    assert layer_violations(graph, layers) == ["pkg.low imports pkg.high.a (up: pkg.low → pkg.high)"]

    sideways = dict(clean, **{"pkg/other.py": "import pkg.low\n"})
    graph = import_graph(_package(tmp_path / "sideways", sideways), "pkg")
    assert layer_violations(graph, [["pkg.high", "pkg.other"], ["pkg.low"], ["pkg"]]) == []
    assert layer_violations(graph, layers) == ["pkg.other is in no layer: add it to LAYERS and docs/architecture.md"]
