"""The command line: help everywhere, version, init/run/doctor, and one-line errors with exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import typer

from sovllm import __version__
from sovllm.cli import app, main


def cli(argv, capsys, monkeypatch=None):
    """Run the real entry point in-process; returns (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return info.value.code, out, err


def all_command_paths():
    def walk(command, path):
        yield path
        if hasattr(command, "commands"):
            for name, sub in command.commands.items():
                yield from walk(sub, [*path, name])

    return list(walk(typer.main.get_command(app), []))


@pytest.mark.parametrize("path", all_command_paths(), ids=lambda p: " ".join(p) or "sovllm")
def test_every_command_has_help(path, capsys):
    code, out, _ = cli([*path, "--help"], capsys)
    assert code == 0 and "Usage: sovllm" in out


def test_expected_commands_exist():
    paths = {" ".join(p) for p in all_command_paths()}
    assert {"init", "run", "doctor", "curate", "train", "models list", "models prepare", "egress check"} <= paths


def test_version(capsys):
    assert cli(["--version"], capsys)[:2] == (0, f"sovllm {__version__}\n")


@pytest.fixture
def project(tmp_path, tiny_model_dir, capsys):
    code, out, _ = cli(["init", tmp_path / "proj"], capsys)
    assert code == 0 and "sovllm.yaml" in out
    config = tmp_path / "proj" / "sovllm.yaml"
    config.write_text(config.read_text().replace("base: smollm2-135m-instruct", f"base: {tiny_model_dir}"))
    (tmp_path / "proj" / "documents" / "vpn.md").write_text(
        "# VPN\n\nTunnelwerk disconnects after 9 hours; reconnect with your blue FIDO2 key.\n", encoding="utf-8")
    return tmp_path / "proj"


@pytest.mark.integration  # the whole pipeline, twice
def test_run_quick_writes_manifests_and_skips_when_up_to_date(project, tiny_model_dir, capsys):
    # the random tiny model writes no valid pairs; curate accepts that only when told to
    code, out, err = cli(["run", project, "--quick"], capsys)
    assert code == 2 and "synth produced no QA pairs" in err
    code, _, err = cli(["run", project, "--quick", "--until", "nothing"], capsys)
    assert code == 2 and "--until 'nothing': not a stage" in err
    code, out, err = cli(["run", project, "--quick", "--set", "curate.min_kept=0", "--until", "curate"], capsys)
    assert code == 0, err
    run_manifest = json.loads((project / "out" / "manifest.json").read_text())
    assert run_manifest["stage"] == "run" and run_manifest["extra"]["quick"] is True
    assert [(s["stage"], s["status"]) for s in run_manifest["extra"]["stages"]] == [
        ("model", "skipped"), ("ingest", "skipped"), ("synth", "skipped"), ("curate", "ran")]  # after the failed run
    model_manifest = json.loads((project / "out" / "model" / "manifest.json").read_text())
    assert model_manifest["model"]["path"] == str(tiny_model_dir.resolve())
    assert model_manifest["endpoints"] == {"contacted": [], "blocked": []}

    code, out, _ = cli(["run", project, "--quick", "--set", "curate.min_kept=0", "--until", "curate"], capsys)
    assert code == 0 and "skipped (up to date)" in out
    stages = json.loads((project / "out" / "manifest.json").read_text())["extra"]["stages"]
    assert [(s["stage"], s["status"]) for s in stages] == [("model", "skipped"), ("ingest", "skipped"),
                                                           ("synth", "skipped"), ("curate", "skipped")]


def test_run_without_project_is_a_one_line_error(tmp_path, capsys):
    code, out, err = cli(["run", tmp_path], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and "sovllm init" in err


def test_config_errors_are_listed_one_per_line(project, capsys):
    (project / "sovllm.yaml").write_text("ingest:\n  chunk_sise: 1\nmodle: {}\n")
    code, _, err = cli(["run", project, "--set", "ingest.chunk_size=0"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 4
    assert "3 config problems" in lines[0]
    assert any("sovllm.yaml:2: ingest.chunk_sise: unknown key; did you mean 'chunk_size'?" in l for l in lines)
    assert any("--set: ingest.chunk_size" in l for l in lines)


def test_endpoint_outside_allow_list_fails_run_and_doctor(project, capsys):
    override = "endpoint.base_url=https://api.openai.com/v1"
    code, _, err = cli(["run", project, "--set", override], capsys)
    assert code == 2 and "endpoint.base_url: https://api.openai.com/v1 is outside the egress allow-list" in err
    code, out, _ = cli(["doctor", project, "--set", override], capsys)
    assert code == 1 and "endpoint.base_url" in out and "fail" in out
    code, out, _ = cli(["doctor", project, "--set", override, "--set", "egress.allow=[api.openai.com]"], capsys)
    assert code == 0


def test_doctor_reports_versions_and_model_state(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("SOVLLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = cli(["doctor", tmp_path], capsys)
    assert code == 0
    for fragment in ("python", "torch", "transformers", "compute", "model smollm2-135m-instruct", "disk",
                     "hub/telemetry opt-outs"):
        assert fragment in out
    assert "not prepared" in out or "not installed" in out


def test_models_list_json(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("SOVLLM_HOME", str(tmp_path / "home"))
    code, out, _ = cli(["models", "list", "--json"], capsys)
    rows = json.loads(out)
    assert code == 0 and rows[0]["name"] == "smollm2-135m-instruct" and rows[0]["prepared"] is False
    assert "Q4_1" in rows[0]["note"]


def test_console_script_is_installed():
    proc = subprocess.run([sys.executable, "-m", "sovllm", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"sovllm {__version__}"


def test_synth_sweep_writes_its_report_in_one_piece(fake, tmp_path, capsys):
    from tests.synth.conftest import good_free
    from tests.synth.test_synth_process import make_project

    root = make_project(tmp_path, fake(good_free).base_url)
    code, out, err = cli(["synth", root, "--sweep", "1,2", "--sample", "2"], capsys)
    assert code == 0, err
    report = json.loads((root / "out" / "synth" / "sweep.json").read_text())
    assert [r["concurrency"] for r in report["levels"]] == [1, 2] and report["recommended_concurrency"] in (1, 2)
    assert all(r["pairs"] == 6 and r["error_rate"] == 0 for r in report["levels"])  # 2 chunks x 3 types
    assert [p.name for p in (root / "out" / "synth").iterdir()] == ["sweep.json"]  # no temp file left
    assert f"recommended synth.concurrency: {report['recommended_concurrency']}" in out
