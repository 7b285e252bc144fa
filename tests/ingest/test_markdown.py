"""Markdown line syntax: the linear-time parsers agree with the regexes they replaced, and stay linear."""

from __future__ import annotations

import random
import re
import time

import pytest

from sovllm.ingest.loaders import load_markdown
from tests.ingest.conftest import deadline

# The expressions the parsers replaced: the reference for what each line means.
OLD_ATX = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
OLD_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
OLD_TABLE_RULE = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")
OLD_EMPHASIS = re.compile(r"(\*\*|__)(?=\S)(.+?)(?<=\S)\1")
OLD_SETEXT = re.compile(r"\s*(=+|-+)\s*")


def random_lines(alphabet: list[str], count: int = 4000, seed: int = 7):
    rng = random.Random(seed)
    for _ in range(count):
        yield "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))


def test_links_and_emphasis_match_the_old_regexes():
    from sovllm.ingest.markdown import strip_emphasis, strip_links

    alphabet = ["[", "]", "(", ")", "!", "*", "**", "_", "__", " ", "a", "b", "\t", "\u00a0"]
    for line in random_lines(alphabet):
        assert strip_links(line) == OLD_LINK.sub(r"\1", line), line
        assert strip_emphasis(line) == OLD_EMPHASIS.sub(r"\2", line), line


def test_headings_and_table_rules_match_the_old_regexes():
    from sovllm.ingest.markdown import atx_heading, is_table_rule, setext_underline

    alphabet = ["#", "##", " ", "\t", "a", "|", "-", "---", ":", "=", "x#"]
    for line in random_lines(alphabet):
        old = OLD_ATX.match(line)
        new = atx_heading(line)
        assert (old is None) == (new is None), line
        if old:  # the heading title the loader keeps (after whitespace normalisation)
            assert new[0] == len(old.group(1)) and " ".join(new[1].split()) == " ".join(old.group(2).split()), line
        assert is_table_rule(line) == bool(OLD_TABLE_RULE.match(line)), line
        old_setext = OLD_SETEXT.fullmatch(line)
        assert setext_underline(line) == (old_setext.group(1)[0] if old_setext else None), line


def best_time(path, repeats: int = 3) -> float:
    """CPU seconds of this thread (not wall-clock), so other processes on the machine do not skew ratios."""
    times = []
    for _ in range(repeats):
        started = time.thread_time()
        load_markdown(path)
        times.append(time.thread_time() - started)
    return min(times)


# Lines that made the old regexes quadratic or worse (40 KB of them took 12-43 s, `# a` + 5,000
# spaces took minutes).
HOSTILE_LINES = {
    "emphasis": lambda n: "**a " * (n // 4),
    "brackets": lambda n: "[" * n,
    "link openings": lambda n: "[a](" * (n // 4),
    "atx heading padded with spaces": lambda n: "# a" + " " * n + "b",
    "table rule padded with spaces": lambda n: "|---" + " " * n + "x",
}


@pytest.mark.parametrize("kind", sorted(HOSTILE_LINES))
def test_one_long_markdown_line_loads_in_linear_time(tmp_path, kind):
    small, big = tmp_path / "small.md", tmp_path / "big.md"
    small.write_text("| a | b |\n" + HOSTILE_LINES[kind](20_000) + "\n", encoding="utf-8")
    big.write_text("| a | b |\n" + HOSTILE_LINES[kind](160_000) + "\n", encoding="utf-8")
    with deadline(30):  # the old regexes need minutes here
        t_small = max(best_time(small), 0.01)  # a floor, so timer noise on a tiny time is no ratio
        t_big = best_time(big)
    # 8x the input: about 8x the time when linear, 64x when quadratic; 3x margin for a loaded machine.
    assert t_big < 24 * t_small, (kind, t_small, t_big)
    assert load_markdown(big).sections  # the text is kept, not dropped
