"""The import graph of a package, read from its source, and the two rules sovllm keeps about it.

Every `import` and `from … import` statement counts, at module level or inside a function (a
function-local import that only dodges a cycle is still a cycle). `from pkg import name` counts as
an import of `pkg.name` when that is a module, else of `pkg`. A package's own `__init__` running
before its submodules is Python's doing, not an import, so it is not an edge.

Rule 1: no cycles between modules. Rule 2: packages and top-level modules sit in layers (listed
top to bottom, docs/architecture.md "Layers"); a module imports only from its own package or from
a lower layer, and members of one layer are independent of each other.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path


def module_files(src: Path, package: str) -> dict[str, Path]:
    """Dotted module name → file for every .py file of `package` under `src`."""
    files = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        files[name] = path
    return files


def _resolve(target: str, modules: dict[str, Path]) -> str | None:
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def import_graph(src: Path, package: str) -> dict[str, set[str]]:
    """Module → the package's modules it imports (anywhere in its source)."""
    modules = module_files(src, package)
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        home = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = home.split(".")[: len(home.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            else:
                continue
            for target in targets:
                if target.split(".")[0] == package and (found := _resolve(target, modules)) and found != name:
                    graph[name].add(found)
    return {name: graph.get(name, set()) for name in modules}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def component(module: str, layers: list[list[str]]) -> str | None:
    """The layer member (a package or module name) that `module` belongs to, the longest match.

    The top-level package as a member stands for its `__init__` alone, not for everything in it."""
    best = None
    for layer in layers:
        for member in layer:
            inside = module.startswith(member + ".") and "." in member
            if (module == member or inside) and (best is None or len(member) > len(best)):
                best = member
    return best


def layer_violations(graph: dict[str, set[str]], layers: list[list[str]]) -> list[str]:
    """Imports that go up a layer or across members of one layer, and modules in no layer."""
    level = {member: i for i, layer in enumerate(layers) for member in layer}
    problems = []
    for module in sorted(graph):
        home = component(module, layers)
        if home is None:
            problems.append(f"{module} is in no layer: add it to LAYERS and docs/architecture.md")
            continue
        for target in sorted(graph[module]):
            there = component(target, layers)
            if there is None or there == home:
                continue
            if level[there] <= level[home]:
                way = "across its layer" if level[there] == level[home] else "up"
                problems.append(f"{module} imports {target} ({way}: {home} → {there})")
    return problems
