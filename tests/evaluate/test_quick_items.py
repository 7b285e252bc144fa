"""--quick eval's sample: answerable and unanswerable items in proportion, every negative kind present."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sovllm.evaluate.stage import quick_items


def _items(answerable: int, foreign: int, on_topic: int) -> list:
    make = SimpleNamespace
    return ([make(id=f"a{i}", answerable=True, negative=None) for i in range(answerable)]
            + [make(id=f"f{i}", answerable=False, negative="foreign") for i in range(foreign)]
            + [make(id=f"o{i}", answerable=False, negative="on_topic") for i in range(on_topic)])


@pytest.mark.parametrize("limit", [3, 4, 8, 12, 40])
def test_the_quick_sample_keeps_every_kind_and_the_limit(limit):
    items = _items(20, 8, 2)
    got = quick_items(items, limit, seed=7)
    assert len(got) == min(limit, len(items)) and len({i.id for i in got}) == len(got)
    kinds = {i.negative for i in got if not i.answerable}
    assert kinds == {"foreign", "on_topic"}  # the rare kind too
    assert any(i.answerable for i in got)
    assert quick_items(items, limit, seed=7) == got  # seeded


def test_a_split_without_unanswerable_items_samples_answerable_ones_only():
    got = quick_items(_items(10, 0, 0), 4, seed=1)
    assert len(got) == 4 and all(i.answerable for i in got)
