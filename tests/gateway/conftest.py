"""One scripted upstream and one gateway per module, on loopback ports."""

from __future__ import annotations

import pytest

from tests.gateway import procs

K_HR, K_LEGAL, K_FIN, K_ADMIN = ("sk-hr-" + "1" * 24, "sk-legal-" + "2" * 24, "sk-fin-" + "3" * 24,
                                 "sk-admin-" + "4" * 24)
ADAPTERS = ["hr-v1", "hr-v2", "legal-v1", "fin-v1"]


def tenants_config(root, upstream_url: str) -> dict:
    return {
        "upstreams": [{"url": upstream_url + "/v1"}],
        "tenants": {
            "hr": {"keys": [procs.hashed(K_HR)], "models": ["hr-bot", "hr-v1", "base-model"],
                   "limits": {"requests_per_s": 0}},
            "legal": {"keys": [procs.key_file(root, "legal", K_LEGAL)], "models": ["legal-v1", "late-v1"]},
            "fin": {"keys": [{"env": "TEST_FIN_KEY"}], "models": ["fin-v1"]},
        },
        "aliases": {"hr-bot": {"routes": {"hr-v1": 0.5, "hr-v2": 0.5}}},
        "admin_keys": [procs.hashed(K_ADMIN)],
        "adapters": {"late-v1": "/adapters/late-v1"},
        "health_interval_s": 0.5,
    }


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    proc = procs.upstream(tmp_path_factory.mktemp("upstream"), adapters=ADAPTERS, loadable=["late-v1", "spare"],
                          tokens=4)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def gateway(upstream, tmp_path_factory):
    root = tmp_path_factory.mktemp("gw") / "project"
    root.mkdir()
    root = procs.project(root.parent, tenants_config(root, upstream.url), name="project")
    proc = procs.gateway(root, env={"TEST_FIN_KEY": K_FIN})
    proc.root = root
    yield proc
    proc.stop()
