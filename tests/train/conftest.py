"""A curated project on the tiny model: train/val splits written by the real curate stage."""

from __future__ import annotations

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
