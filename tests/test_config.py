"""Config loading: strict keys with suggestions, all problems at once, dotted overrides."""

from __future__ import annotations

import pytest

from sovllm.config import Config, load_config
from sovllm.errors import ConfigError
from sovllm.project import init_project, render_template


def write(tmp_path, text: str):
    path = tmp_path / "sovllm.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_a_file():
    cfg = load_config(None)
    assert cfg.ingest.chunk_size == 512 and cfg.ingest.chunk_overlap == 64
    assert cfg.model.base == "smollm2-135m-instruct" and cfg.egress.allow == []


def test_init_template_is_commented_and_equals_the_defaults(tmp_path):
    path = init_project(tmp_path / "acme")
    text = path.read_text()
    assert text.count("#") > 10 and (tmp_path / "acme" / "documents").is_dir()
    loaded = load_config(path)
    expected = Config()
    expected.project.name = "acme"
    assert loaded == expected


def test_init_refuses_to_overwrite(tmp_path):
    init_project(tmp_path)
    with pytest.raises(ConfigError, match="already exists.*--force"):
        init_project(tmp_path)
    init_project(tmp_path, force=True)


def test_unknown_key_names_key_file_line_and_closest_key(tmp_path):
    path = write(tmp_path, "project:\n  name: x\ningest:\n  chunk_size: 256\n  chunk_sise: 300\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [f"{path}:5: ingest.chunk_sise: unknown key; did you mean 'chunk_size'?"]


def test_unknown_section_suggests_section(tmp_path):
    path = write(tmp_path, "modle:\n  base: x\n")
    with pytest.raises(ConfigError, match=r"sovllm.yaml:1: modle: unknown key; did you mean 'model'\?"):
        load_config(path)


def test_all_problems_are_reported_at_once(tmp_path):
    path = write(tmp_path, (
        "ingest:\n  chunk_size: big\n  chunk_overlap: -1\n"
        "egress:\n  allow: [https://vllm.internal]\n"
        "endpoint:\n  base_url: ftp://x\n"
        "extra_section: 1\n"
    ))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    problems = info.value.problems
    assert len(problems) == 5, problems
    joined = "\n".join(problems)
    for fragment in (":2: ingest.chunk_size", ":3: ingest.chunk_overlap", ":5: egress.allow",
                     "is a URL; list only its host name", ":7: endpoint.base_url", ":8: extra_section"):
        assert fragment in joined
    assert str(info.value).startswith(f"{path}: 5 config problems")


def test_overrides_are_typed_and_validated(tmp_path):
    path = write(tmp_path, "ingest:\n  chunk_size: 256\n")
    cfg = load_config(path, ["ingest.chunk_size=128", "egress.allow=[vllm.internal, 10.0.0.0/8]"])
    assert cfg.ingest.chunk_size == 128
    assert cfg.egress.allow == ["vllm.internal", "10.0.0.0/8"]
    with pytest.raises(ConfigError, match=r"--set: ingest.chunk_sise: unknown key; did you mean 'chunk_size'"):
        load_config(path, ["ingest.chunk_sise=1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(path, ["ingest.chunk_size"])
    with pytest.raises(ConfigError, match="'chunk_size' is not a section"):
        load_config(path, ["ingest.chunk_size.x=1"])


def test_one_split_share_of_unanswerable_items_keeps_the_other_defaults(tmp_path):
    """Setting train's share must not silently remove the unanswerable items of val and eval."""
    defaults = Config().curate.unanswerable
    cfg = load_config(write(tmp_path, "version: 1\n"), ["curate.unanswerable.train=0.5"])
    assert cfg.curate.unanswerable == {**defaults, "train": 0.5}
    cfg = load_config(write(tmp_path, "curate:\n  unanswerable: {eval: 0.25}\n"))
    assert cfg.curate.unanswerable == {**defaults, "eval": 0.25}
    with pytest.raises(ConfigError, match="share must be between 0 and 0.9"):
        load_config(write(tmp_path, "version: 1\n"), ["curate.unanswerable.val=0.95"])


def test_cross_field_rule_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="chunk_overlap \\(512\\) must be smaller than chunk_size"):
        load_config(write(tmp_path, "ingest:\n  chunk_overlap: 512\n"))
    with pytest.raises(ConfigError, match=r"sovllm.yaml:2: invalid YAML"):
        load_config(write(tmp_path, "ingest:\n\tchunk_size: 1\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="no such config file.*sovllm init"):
        load_config(tmp_path / "missing.yaml")


def test_endpoints_outside_allow_list():
    cfg = load_config(None, ["endpoint.base_url=http://vllm.internal:8000/v1"])
    assert cfg.endpoints_outside_allow_list() == {"endpoint.base_url": "http://vllm.internal:8000/v1"}
    cfg = load_config(None, ["endpoint.base_url=http://vllm.internal:8000/v1", "egress.allow=[vllm.internal]"])
    assert cfg.endpoints_outside_allow_list() == {}
    assert load_config(None, ["endpoint.base_url=http://127.0.0.1:8000/v1"]).endpoints_outside_allow_list() == {}


def test_config_hash_is_stable_and_sensitive():
    assert Config().hash() == load_config(None).hash()
    assert Config().hash() != load_config(None, ["ingest.chunk_size=256"]).hash()


def test_template_sanitises_project_name():
    assert "name: my-docs" in render_template("my docs")


def test_remote_judge_and_tracking_server_are_checked_against_the_allow_list():
    cfg = load_config(None, ["curate.judge.base_url=http://judge.internal:8000/v1",
                             "train.tracking.uri=http://mlflow.internal:5000", "egress.allow=[judge.internal]"])
    assert cfg.endpoints_outside_allow_list() == {"train.tracking.uri": "http://mlflow.internal:5000"}
    local = load_config(None, ["train.tracking.uri=sqlite:///tmp/m.db"])
    assert local.endpoints() == {}


def test_egress_proxy_must_be_a_url_on_an_allowed_host(tmp_path):
    cfg = load_config(None, ["egress.allow=[proxy.internal]", "egress.proxy=http://proxy.internal:3128"])
    assert cfg.egress.proxy == "http://proxy.internal:3128"
    for proxy, fragment in (("http://elsewhere.test:3128", "must be listed in egress.allow"),
                            ("proxy.internal:3128", "must be a URL")):
        with pytest.raises(ConfigError) as caught:
            load_config(None, ["egress.allow=[proxy.internal]", f"egress.proxy={proxy}"])
        assert fragment in str(caught.value) and "egress" in str(caught.value)
