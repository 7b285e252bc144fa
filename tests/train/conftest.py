"""A curated project on the tiny model: train/val splits written by the real curate stage."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sovllm.config import load_config
from sovllm.curate import stage as curate
from tests.curate.conftest import make_chunks, make_pairs, write_project

TRAIN_FAST = ("train.batch_size=4", "train.grad_accum=1", "train.eval_steps=2", "train.stop_min_rate=0",
              "train.stop_prompts=4", "train.max_length=4096")


def curated_project(root: Path, model_dir: Path) -> Path:
    chunks = make_chunks()
    write_project(root, chunks, make_pairs(chunks), config=(
        f"model:\n  base: {model_dir}\ncurate:\n  splits: {{train: 0.5, val: 0.25, eval: 0.25, seed: 13}}\n"))
    curate.run(root, load_config(root, ("curate.judge.mode=off",)), None, log=lambda _: None)
    return root


@pytest.fixture
def train_project(tmp_path, tiny_model_dir):
    return curated_project(tmp_path / "p", tiny_model_dir)


def complete(checkpoint: Path) -> bool:
    """Every file a resume needs is there and the Trainer's state (written last) parses."""
    from sovllm.train.save import CHECKPOINT_FILES

    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return all((checkpoint / name).is_file() for name in CHECKPOINT_FILES)


def train_command(project: Path, settings: list[str]) -> list[str]:
    return [sys.executable, "-m", "sovllm", "train", str(project)] + [a for s in settings for a in ("--set", s)]


def train_until_first_checkpoint(cmd: list[str], checkpoints: Path, timeout: float = 180) -> subprocess.Popen:
    """Start a real `sovllm train` process; return it once its first complete checkpoint is on disk."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not any(complete(c) for c in checkpoints.glob("checkpoint-*")):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    return proc
