"""The answer cache behind prediction (`endpoint.CompletionCache`): resuming after a crash mid-write."""

from __future__ import annotations

import os

import pytest

from sovllm.endpoint import Completion, CompletionCache
from sovllm.errors import InputError


def answer(text: str) -> Completion:
    return Completion(text, "stop", 10, 3, 0.01, 0.02)


def test_a_torn_last_cache_line_is_cut_off_so_the_next_answer_is_kept(tmp_path, monkeypatch):
    path = tmp_path / "eval" / "cache.jsonl"
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    cache = CompletionCache(path)
    cache.put("k1", answer("Die Sitzung endet nach acht Stunden."))
    cache.put("k2", answer("Grüße"))
    assert len(synced) >= 2  # each answer is on disk before it counts as done
    data = path.read_bytes()
    path.write_bytes(data[: data.index(b"\xc3")])  # kill -9 in the middle of the second line
    resumed = CompletionCache(path)
    assert set(resumed.entries) == {"k1"}
    resumed.put("k3", answer("Drei."))
    again = CompletionCache(path)
    assert set(again.entries) == {"k1", "k3"} and again.entries["k3"]["text"] == "Drei."


def test_a_corrupt_cache_line_in_the_middle_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "cache.jsonl"
    cache = CompletionCache(path)
    for key in ("k1", "k2", "k3"):
        cache.put(key, answer(key))
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + lines[1][:15] + "\n" + lines[2])
    with pytest.raises(InputError, match=r"cache.jsonl:2: not valid JSON") as err:
        CompletionCache(path)
    assert "delete that line (or the whole file)" in str(err.value)
