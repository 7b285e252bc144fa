"""Unit tests of keys, routing and the A/B statistics (no servers)."""

from __future__ import annotations

import os
import random
import time

import pytest

from sovllm.config import GatewaySection, KeySource, load_config
from sovllm.errors import ConfigError
from sovllm.gateway.ab import applied_routes, two_proportions, welch
from sovllm.gateway.keys import KeyRing, bearer, digest, new_key
from sovllm.gateway.policy import ADMIN, Policy, bucket, pick


def _cfg(**extra) -> GatewaySection:
    return GatewaySection.model_validate({
        "tenants": {"a": {"keys": [{"sha256": digest("ka")}], "models": ["bot", "a1"]},
                    "b": {"keys": [{"sha256": digest("kb")}], "models": ["b1"]}},
        "aliases": {"bot": {"routes": {"a1": 0.9, "a2": 0.1}}}, **extra})


def test_resolve_refuses_what_the_tenant_may_not_call_like_a_missing_name():
    policy = Policy(_cfg())
    assert policy.resolve("a", "a1", None).target == "a1"
    assert policy.resolve("a", "b1", None) is None
    assert policy.resolve("a", "a2", None) is None  # only through the alias
    assert policy.resolve("b", "bot", "u") is None
    assert policy.resolve(ADMIN, "b1", None).target == "b1"
    assert policy.allowed("b") == ["b1"]


def test_alias_split_is_sticky_per_user_and_follows_the_weights():
    policy = Policy(_cfg())
    users = [f"user-{i}" for i in range(4000)]
    first = [policy.resolve("a", "bot", u).target for u in users]
    assert first == [policy.resolve("a", "bot", u).target for u in users]
    share = first.count("a2") / len(first)
    assert 0.085 < share < 0.115  # 10 % ± 5 standard errors
    policy.splits = {"bot": {"a1": 0.5, "a2": 0.5}}  # a live change moves only the users it must
    second = [policy.resolve("a", "bot", u).target for u in users]
    assert all(b == "a2" for a, b in zip(first, second) if a == "a2")
    assert pick({"x": 0.0, "y": 1.0}, 0.0) == "y" and pick({"x": 1.0, "y": 0.0}, 0.999) == "x"
    assert 0 <= bucket("bot", "ä") < 1


def test_key_files_are_reread_so_keys_rotate_without_restart(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("old-key\n")
    ring = KeyRing([("t", KeySource(file=str(keys))), ("u", KeySource(sha256=digest("u-key")))], tmp_path)
    assert ring.owner("old-key") == "t" and ring.owner("u-key") == "u" and ring.owner("new-key") is None
    keys.write_text("old-key\nnew-key\n")
    os.utime(keys, (time.time() + 5, time.time() + 5))
    assert ring.refresh() is True
    assert ring.owner("new-key") == "t" and ring.owner("old-key") == "t"
    keys.write_text("new-key\n")
    os.utime(keys, (time.time() + 10, time.time() + 10))
    ring.refresh()
    assert ring.owner("old-key") is None and ring.owner("new-key") == "t"
    keys.write_text("")  # a Secret being rewritten: keep the last good keys
    os.utime(keys, (time.time() + 15, time.time() + 15))
    ring.refresh()
    assert ring.owner("new-key") == "t"


def test_key_problems_are_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="belongs to 't' and 'u'"):
        KeyRing([("t", KeySource(sha256=digest("same"))), ("u", KeySource(sha256=digest("same")))], tmp_path)
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(ConfigError, match="NO_SUCH_KEY_VAR is empty or unset"):
        KeyRing([("t", KeySource(env="NO_SUCH_KEY_VAR"))], tmp_path)
    with pytest.raises(ConfigError, match="cannot read the keys of 't'"):
        KeyRing([("t", KeySource(file="missing.txt"))], tmp_path)
    assert bearer("Bearer  abc ") == "abc" and bearer("Basic abc") is None and bearer(None) is None
    assert new_key().startswith("sk-sovllm-") and len(new_key()) > 40


def test_config_problems_name_the_key(tmp_path):
    (tmp_path / "sovllm.yaml").write_text(
        "gateway:\n  tenants:\n    'bad name':\n      keys: [{sha256: abc, file: x}]\n      models: []\n"
        "  aliases:\n    bot: {routes: {a: -1}}\n")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path)
    text = "\n".join(err.value.problems)
    assert "exactly one of sha256, file or env" in text and "weights must be >= 0" in text
    assert "models" in text


def test_welch_and_proportions_and_what_apply_does():
    rng = random.Random(0)
    a = [float(rng.random() < 0.4) for _ in range(200)]
    b = [float(rng.random() < 0.8) for _ in range(200)]
    diff, p = welch(a, b)
    assert diff > 0.3 and p < 1e-6
    assert welch(a, a)[1] == pytest.approx(1.0)
    assert two_proportions(5, 100, 30, 100) < 0.001 and two_proportions(5, 100, 5, 100) == pytest.approx(1.0)
    report = {"control": "a1", "routes": {"a1": 0.9, "a2": 0.1}, "variants": [
        {"adapter": "a1", "recommendation": "control", "score": 0.5, "reason": ""},
        {"adapter": "a2", "recommendation": "rollback", "score": 0.2, "reason": "worse"}]}
    assert applied_routes(report) == ({"a1": 0.9, "a2": 0.0}, "roll back a2 (worse)")
    report["variants"][1].update(recommendation="keep")
    assert applied_routes(report) is None
