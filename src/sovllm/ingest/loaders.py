"""Document loaders by file suffix: Markdown, plain text, HTML, PDF and DOCX.

The registry (`sovllm.ingest.registry`) is an extension point: `@register_loader(".rst")` on a
function `path -> LoadedDocument` adds a format, and packages can do so through the
`sovllm.loaders` entry-point group (the entry point's module registers its loaders when imported).
A loader raises `SkipDocument(reason)` for a file it cannot use; the ingest stage warns and goes on.
This module gathers the built-in loaders (importing them registers them) and looks loaders up.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from sovllm.ingest import loaders_html, loaders_office  # noqa: F401 - importing registers them
from sovllm.ingest.loaders_text import load_markdown, load_text, split_front_matter  # noqa: F401 (API)
from sovllm.ingest.registry import LOADERS, Loader, register_loader  # noqa: F401 (API)
from sovllm.ingest.textfile import decode_text, read_limited, read_text  # noqa: F401 (API)

_plugins_loaded = False


def loader_for(path: Path) -> Loader | None:
    """The loader for a file's suffix, or None when the format is not supported."""
    global _plugins_loaded
    if not _plugins_loaded:
        _plugins_loaded = True
        for entry_point in importlib.metadata.entry_points(group="sovllm.loaders"):
            entry_point.load()
    return LOADERS.get(path.suffix.lower())
