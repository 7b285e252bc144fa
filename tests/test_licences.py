"""Runtime dependencies are permissively licensed (no AGPL/GPL), checked on what is installed."""

from __future__ import annotations

import importlib.metadata as md
import re

from packaging.requirements import Requirement

COPYLEFT = re.compile(r"\bA?GPL\b|GNU (Affero )?General Public", re.IGNORECASE)
RUNTIME_EXTRAS = {"model", "train", "serve", "all"}


def _runtime_closure() -> dict[str, md.Distribution]:
    found: dict[str, md.Distribution] = {}
    todo = [("sovllm", RUNTIME_EXTRAS)]
    while todo:
        name, extras = todo.pop()
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # an optional dependency that is not installed cannot ship
        key = dist.metadata["Name"].lower().replace("_", "-")
        if key in found and not extras:
            continue
        found[key] = dist
        for raw in dist.requires or []:
            req = Requirement(raw)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras or {""}):
                if req.name.lower() != "sovllm":
                    todo.append((req.name, set()))
                else:
                    todo.append((req.name, req.extras & RUNTIME_EXTRAS))
    return found


def _licence_text(dist: md.Distribution) -> str:
    meta = dist.metadata
    classifiers = [c for c in meta.get_all("Classifier") or [] if c.startswith("License")]
    return " ".join([meta.get("License-Expression") or "", (meta.get("License") or "")[:200], *classifiers])


def test_no_copyleft_licence_in_runtime_dependencies():
    closure = _runtime_closure()
    assert {"torch", "transformers", "typer", "pydantic"} <= set(closure)
    offenders = {name: _licence_text(d) for name, d in closure.items()
                 if COPYLEFT.search(_licence_text(d)) and "LGPL" not in _licence_text(d)}
    assert offenders == {}
