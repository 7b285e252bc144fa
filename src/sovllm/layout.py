"""Where each stage's folder is: `project.locations.<artifact>`, or `<output_dir>/<stage>` by default.

Every stage reads its inputs and writes its output through `folder()`, never through a path of
its own, so a stage can run on explicit locations (a pod's mounted artifacts, another disk):
`sovllm curate . --set project.locations.chunks=/in/chunks --set project.locations.splits=/out/splits`.
A location given as `s3://bucket/key.tgz` is made local around the stage command by
`sovllm.objectstore.materialised` before `folder()` is asked for it.
"""

from __future__ import annotations

from pathlib import Path

from sovllm.config import Config

# artifact → the stage folder it lives in by default (shards: inside the pairs folder)
DEFAULT_FOLDER = {"chunks": "ingest", "pairs": "synth", "splits": "curate", "adapter": "train", "report": "eval",
                  "mlflow": "mlflow", "shards": "synth/shards"}

# stage → the artifact it writes
STAGE_ARTIFACT = {"ingest": "chunks", "synth": "pairs", "curate": "splits", "train": "adapter", "eval": "report"}


def folder(root: str | Path, cfg: Config, artifact: str) -> Path:
    """The folder of `artifact` (chunks, pairs, splits, adapter, report, mlflow, shards) for the project at `root`."""
    if artifact not in DEFAULT_FOLDER:
        raise KeyError(f"unknown artifact {artifact!r}; known: {sorted(DEFAULT_FOLDER)}")
    explicit = getattr(cfg.project.locations, artifact)
    if explicit:
        path = Path(explicit).expanduser()
        return path if path.is_absolute() else Path(root) / path
    if artifact == "shards":
        return folder(root, cfg, "pairs") / "shards"
    return Path(root) / cfg.project.output_dir / DEFAULT_FOLDER[artifact]


def documents(root: str | Path, cfg: Config) -> Path:
    path = Path(cfg.project.documents).expanduser()
    return path if path.is_absolute() else Path(root) / path


def stage_folders(root: str | Path, cfg: Config) -> dict[str, Path]:
    """stage name → the folder it writes (its manifest.json lies there)."""
    return {stage: folder(root, cfg, artifact) for stage, artifact in STAGE_ARTIFACT.items()}


def shown(path: Path, root: str | Path) -> str:
    """`path` relative to the project folder when it lies inside it, else absolute."""
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)
