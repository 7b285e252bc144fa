"""The document-loader registry: which function loads a file of a given suffix.

`@register_loader(".rst")` on a function `path -> LoadedDocument` adds a format. The built-in
loaders register themselves in their modules (`loaders_text`, `loaders_html`, `loaders_office`);
`sovllm.ingest.loaders.loader_for` imports them all and adds the `sovllm.loaders` entry points.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from sovllm.ingest.document import LoadedDocument

Loader = Callable[[Path], LoadedDocument]
LOADERS: dict[str, Loader] = {}


def register_loader(*suffixes: str) -> Callable[[Loader], Loader]:
    """Register a loader for file suffixes (lower case, with the dot)."""

    def decorate(fn: Loader) -> Loader:
        for suffix in suffixes:
            LOADERS[suffix.lower()] = fn
        return fn

    return decorate
