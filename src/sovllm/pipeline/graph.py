"""The pipeline as one declarative graph of stages: what `sovllm run` executes and `sovllm render
argo` renders.

Each stage names its inputs and outputs (artifacts: the folders `project.documents` and
`project.locations.*` name, by default `documents/` and `out/<stage>/`), whether it needs an LLM endpoint or a GPU, resource hints, and the `sovllm`
command that runs it. A stage also takes its own previous output as an optional input: its
manifest is what makes an up-to-date stage skip, and synth's cache is what lets new documents
redo only their own chunks. With `shards` > 1, synth fans out into `synth --shard K/N` stages and
a `synth merge` stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sovllm import layout
from sovllm.config import Config
from sovllm.errors import ConfigError


@dataclass(frozen=True)
class Artifact:
    """A folder that one stage writes and later stages read: the folder of `project.locations.<location>`
    (`documents`: `project.documents`), or its sub-folder `sub` (a synth shard's `K-of-N`)."""

    name: str
    location: str
    sub: str = ""

    def path(self, root: str | Path, cfg: Config) -> Path:
        base = layout.documents(root, cfg) if self.location == "documents" else layout.folder(root, cfg, self.location)
        return base / self.sub if self.sub else base


@dataclass(frozen=True)
class Resources:
    """Requests for one stage's pod (Kubernetes quantities)."""

    cpu: str
    memory: str
    gpus: int = 0


@dataclass(frozen=True)
class Stage:
    name: str
    command: tuple[str, ...]  # `sovllm` arguments; "{project}" is the project folder
    inputs: tuple[str, ...]  # artifacts it reads (its own previous output is among them when it has one)
    outputs: tuple[str, ...]
    needs_endpoint: bool = False
    needs_gpu: bool = False
    resources: Resources = field(default_factory=lambda: Resources("1", "2Gi"))
    after: tuple[str, ...] = ()  # stages it depends on (those that write its inputs)
    shares_endpoint: bool = False  # run locally, it uses the run's one endpoint (eval starts its own, with adapters)

    def argv(self, project: str, locations: dict[str, str] | None = None) -> list[str]:
        """The command line; `locations` (location → folder) become explicit `--set project.…` options."""
        sets = []
        for location, path in (locations or {}).items():
            key = "project.documents" if location == "documents" else f"project.locations.{location}"
            sets += ["--set", f"{key}={path}"]
        return ["sovllm", *(a.replace("{project}", project) for a in self.command), *sets]


def artifacts(cfg: Config, shards: int = 1) -> dict[str, Artifact]:
    found = {name: Artifact(name, name) for name in ("documents", "chunks", "pairs", "splits", "adapter", "report",
                                                     "mlflow")}
    if shards > 1:
        for k in range(1, shards + 1):
            found[f"synth-shard-{k}"] = Artifact(f"synth-shard-{k}", "shards", f"{k}-of-{shards}")
    return found


def stages(cfg: Config, shards: int = 1, *, quick: bool = False, promote: bool | None = None) -> list[Stage]:
    """The pipeline's stages in an order that respects their dependencies. eval runs with `--promote`
    (the eval gate) unless `promote` is False; by default a full run promotes and a `--quick` one does not."""
    if shards < 1:
        raise ConfigError(f"synth shards must be at least 1 (got {shards})")
    flags = ("--quick",) if quick else ()
    small = Resources("1", "2Gi")
    llm = Resources("2", "6Gi")
    graph = [Stage("ingest", ("ingest", "{project}", *flags), ("documents", "chunks"), ("chunks",), resources=small)]
    if shards == 1:
        graph.append(Stage("synth", ("synth", "{project}", *flags), ("chunks", "pairs"), ("pairs",),
                           needs_endpoint=True, resources=llm, after=("ingest",), shares_endpoint=True))
    else:
        names = [f"synth-{k}" for k in range(1, shards + 1)]
        graph += [Stage(name, ("synth", "{project}", "--shard", f"{k}/{shards}", *flags),
                        ("chunks", f"synth-shard-{k}"), (f"synth-shard-{k}",), needs_endpoint=True, resources=llm,
                        after=("ingest",), shares_endpoint=True) for k, name in enumerate(names, 1)]
        graph.append(Stage("synth-merge", ("synth", "merge", "{project}", "--shards", str(shards)),
                           ("chunks", *(f"synth-shard-{k}" for k in range(1, shards + 1)), "pairs"), ("pairs",),
                           resources=small, after=tuple(names)))
    synth_done = "synth" if shards == 1 else "synth-merge"
    graph.append(Stage("curate", ("curate", "{project}", *flags), ("chunks", "pairs", "splits"), ("splits",),
                       needs_endpoint=True, resources=llm, after=(synth_done,), shares_endpoint=True))
    train_cpu = Resources("4", "16Gi")
    graph.append(Stage("train", ("train", "{project}", *flags), ("splits", "adapter", "mlflow"), ("adapter", "mlflow"),
                       needs_gpu=cfg.train.device != "cpu", resources=Resources("4", "32Gi", max(1, cfg.train.num_processes))
                       if cfg.train.device != "cpu" else train_cpu, after=("curate",)))
    gate = ("--promote",) if (not quick if promote is None else promote) else ()
    graph.append(Stage("eval", ("eval", "{project}", *gate, *flags),
                       ("chunks", "splits", "adapter", "mlflow", "report"), ("report", "mlflow"),
                       needs_endpoint=True, resources=llm, after=("train",)))
    return graph


def order(graph: list[Stage]) -> list[str]:
    """The stage names in dependency order (ConfigError on a cycle or an unknown dependency)."""
    names = {s.name for s in graph}
    for stage in graph:
        unknown = [d for d in stage.after if d not in names]
        if unknown:
            raise ConfigError(f"stage {stage.name} depends on unknown stages {unknown}")
    done: list[str] = []
    pending = list(graph)
    while pending:
        ready = [s for s in pending if all(d in done for d in s.after)]
        if not ready:
            raise ConfigError(f"the stage graph has a cycle among {[s.name for s in pending]}")
        done += [s.name for s in ready]
        pending = [s for s in pending if s not in ready]
    return done
