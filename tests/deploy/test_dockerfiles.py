"""The Dockerfiles, checked without a container engine (none is reachable here): every file they copy
exists in the repository, every `sovllm` command they run is a real command, every package extra
they install exists, base images are pinned, the user is the rendered pods' non-root user, and the
entrypoint's `--help` works in this checkout's environment."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from sovllm.config import Config
from sovllm.deploy import k8s

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((REPO / "docker").glob("*.Dockerfile"))


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", text, re.M)]


def sovllm_cli(args: list[str]) -> subprocess.CompletedProcess:
    exe = str(Path(sys.executable).with_name("sovllm"))
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120, check=False)


def test_there_are_cpu_cuda_and_vllm_images():
    assert [p.name for p in DOCKERFILES] == ["cpu.Dockerfile", "cuda.Dockerfile", "vllm.Dockerfile"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_what_the_dockerfile_copies_and_runs_exists(dockerfile):
    steps = instructions(dockerfile)
    froms = [a for i, a in steps if i == "FROM"]
    assert froms and all(":" in f and not f.endswith(":latest") for f in froms), froms
    extras = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    for instruction, args in steps:
        if instruction == "COPY":
            *sources, _ = shlex.split(args)
            for source in sources:
                assert (REPO / source).exists(), f"{dockerfile.name}: COPY {source}: not in the repository"
        if instruction == "RUN":
            for command in re.split(r"&&|;", args):
                words = shlex.split(command)
                if not words:
                    continue
                if words[0] == "sovllm":  # a real command: its --help works
                    sub = [w for w in words[1:] if not w.startswith("-")][:2]
                    done = sovllm_cli([*sub[:2 if sub and sub[0] == "models" else 1], "--help"])
                    assert done.returncode == 0, f"{dockerfile.name}: {command.strip()}: {done.stderr[-500:]}"
                if words[:2] == ["pip", "install"]:
                    for word in words[2:]:
                        found = re.fullmatch(r"/src\[([a-z,]+)\]", word)
                        if found:
                            assert set(found.group(1).split(",")) <= extras, word
                        if word.startswith("/src"):
                            assert (REPO / "pyproject.toml").is_file()
    users = [a for i, a in steps if i == "USER"]
    assert users == ["1000"], users  # the rendered pods run as user 1000, non-root


def test_the_entrypoints_work_here():
    cpu = dict(instructions(REPO / "docker" / "cpu.Dockerfile"))
    assert cpu["ENTRYPOINT"] == '["sovllm"]'
    assert sovllm_cli(["--help"]).returncode == 0
    vllm = dict(instructions(REPO / "docker" / "vllm.Dockerfile"))
    assert "vllm.entrypoints.openai.api_server" in vllm["ENTRYPOINT"]
    assert k8s.vllm_container(Config())["args"][:2] == ["-m", "vllm.entrypoints.openai.api_server"]
    # the vLLM image's tag is the vLLM version the rendered flags default to
    assert vllm["FROM"].endswith(f":v{Config().cluster.serving.vllm_image_tag}")
    # the plugin the vLLM image imports is importable from this checkout with the standard library only
    done = subprocess.run([sys.executable, "-c", "import sovllm.serve.vllm_plugin"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
