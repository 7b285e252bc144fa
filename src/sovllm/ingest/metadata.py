"""Document metadata: YAML front matter and sidecars, read within limits, and made JSON-safe.

Metadata is copied into every chunk of its document, so its size multiplies. YAML aliases make
a few hundred bytes expand to many megabytes (an "alias bomb") or to a cycle (`&a [*a]`), and
deep nesting exhausts recursion. Before constructing any Python object, the YAML event stream
is read once (linear time) to measure nesting depth and the size the text would have with every
alias expanded; over `limits.MAX_YAML_DEPTH`, over `limits.MAX_METADATA_CHARS` or recursive, the
document is refused (`SkipDocument`). Ordinary mistakes — invalid YAML, values YAML cannot
construct (`date: 2024-02-30`), a list instead of a mapping — only drop the metadata, with a
warning, as before.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from sovllm.ingest import limits
from sovllm.ingest.discover import SIDECAR, check_file
from sovllm.ingest.document import SkipDocument


def _refusal(text: str) -> str | None:
    """Why this YAML text must not be constructed (too deep, too large expanded, recursive), or None."""
    open_nodes: list[list] = []  # [anchor, expanded size so far] per open collection
    sizes: dict[str, int] = {}
    total = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            open_nodes.append([event.anchor, 1])
            if len(open_nodes) > limits.MAX_YAML_DEPTH:
                return f"nested deeper than {limits.MAX_YAML_DEPTH} levels"
            continue
        if isinstance(event, yaml.CollectionEndEvent):
            anchor, size = open_nodes.pop()
            if anchor:
                sizes[anchor] = size
        elif isinstance(event, yaml.ScalarEvent):
            size = len(event.value) + 1
            if event.anchor:
                sizes[event.anchor] = size
        elif isinstance(event, yaml.AliasEvent):
            if any(anchor == event.anchor for anchor, _ in open_nodes):
                return f"recursive YAML alias (*{event.anchor} inside &{event.anchor})"
            size = sizes.get(event.anchor, 1)
        else:
            continue
        if open_nodes:
            open_nodes[-1][1] += size
            size = open_nodes[-1][1]
        else:
            total += size
            size = total
        if size > limits.MAX_METADATA_CHARS:
            return f"expands to over {limits.MAX_METADATA_CHARS:,} characters (YAML aliases?)"
    return None


def yaml_mapping(text: str, what: str) -> tuple[dict, str | None]:
    """The mapping in a YAML text and a warning (None when fine); `SkipDocument` for a hostile one."""
    if len(text) > limits.MAX_METADATA_CHARS:
        return {}, f"{what} ignored: over {limits.MAX_METADATA_CHARS:,} characters"
    try:
        refusal = _refusal(text)
    except yaml.YAMLError as exc:
        return {}, f"{what} ignored: invalid YAML ({_yaml_problem(exc)})"
    if refusal:
        raise SkipDocument(f"{what}: {refusal}")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        return {}, f"{what} ignored: invalid YAML ({_yaml_problem(exc)})"
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. date: 2024-02-30, a 5,000-digit number
        return {}, f"{what} ignored: invalid value ({_one_line(exc)})"
    if data is None:
        return {}, None
    if not isinstance(data, dict):
        return {}, f"{what} ignored: not a mapping"
    return {str(k): v for k, v in data.items()}, None


def sidecar_metadata(path: Path, folder: Path | None = None) -> tuple[dict, str | None]:
    """Metadata from `name.ext.meta.yaml` or `name.meta.yaml` next to a document, and a warning."""
    for candidate in (path.with_name(path.name + SIDECAR), path.with_name(path.stem + SIDECAR)):
        if not candidate.exists() and not candidate.is_symlink():
            continue
        problem = check_file(candidate, folder if folder is not None else candidate.parent)
        if problem:
            return {}, f"{candidate.name} ignored: {problem}"
        try:
            with open(candidate, "rb") as fh:
                data = fh.read(limits.MAX_METADATA_CHARS + 1)
            if len(data) > limits.MAX_METADATA_CHARS:
                return {}, f"{candidate.name} ignored: over {limits.MAX_METADATA_CHARS:,} bytes"
            text = data.decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            return {}, f"{candidate.name} ignored: {_one_line(exc)}"
        return yaml_mapping(text, f"sidecar {candidate.name}")
    return {}, None


def json_safe(value, budget: int | None = None):
    """`value` with only JSON types (str for dates and the like, non-finite floats as text).

    Refuses (`SkipDocument`) metadata nested deeper than `MAX_YAML_DEPTH` or with more values
    than `budget` (shared or cyclic structures from a plugin loader would otherwise expand).
    """
    remaining = [budget if budget is not None else limits.MAX_METADATA_CHARS]

    def convert(item, depth: int):
        remaining[0] -= 1
        if remaining[0] < 0 or depth > limits.MAX_YAML_DEPTH:
            raise SkipDocument("metadata too large or too deeply nested to copy into every chunk")
        if isinstance(item, dict):
            return {str(k): convert(v, depth + 1) for k, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [convert(v, depth + 1) for v in item]
        if isinstance(item, float) and not math.isfinite(item):
            return str(item)  # NaN and Infinity are not JSON
        if item is None or isinstance(item, (str, int, float, bool)):
            return item
        return str(item)  # dates from YAML front matter and the like

    result = convert(value, 0)
    size = len(json.dumps(result, ensure_ascii=False))
    if size > limits.MAX_METADATA_CHARS:
        raise SkipDocument(f"metadata too large ({size:,} characters as JSON; the limit is "
                           f"{limits.MAX_METADATA_CHARS:,}, and it is copied into every chunk)")
    return result


def _yaml_problem(exc: yaml.YAMLError) -> str:
    parts = [getattr(exc, "context", None), getattr(exc, "problem", None)]
    return _one_line("; ".join(p for p in parts if p) or exc)


def _one_line(value) -> str:
    return " ".join(str(value).split())[:300]
