"""The pipeline's pushed metrics: valid Prometheus text, the right series per stage, and a Pushgateway
that is down or refused by the egress guard is a warning, not a failed stage."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from sovllm import egress
from sovllm.monitoring.push import exposition, push_stage


def parse(text: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_each_stage_pushes_its_series():
    synth = parse(exposition("synth", seconds=12.5, failed=False, skipped=False, counts={"pairs": 42, "failures": 3},
                             extra={}, now=1000.0))
    assert synth[("sovllm:pipeline_stage_duration_seconds", ())] == 12.5
    assert synth[("sovllm:pipeline_pairs_generated", ())] == 42 and synth[("sovllm:pipeline_stage_errors", ())] == 3
    assert synth[("sovllm:pipeline_stage_failed", ())] == 0 and synth[("sovllm:pipeline_stage_last_run_timestamp_seconds", ())] == 1000
    train = parse(exposition("train", seconds=1, failed=True, skipped=False, counts={"steps": 4},
                             extra={"metrics": {"best_val_loss": 0.25}}))
    assert train[("sovllm:pipeline_stage_failed", ())] == 1 and train[("sovllm:pipeline_train_loss", ())] == 0.25
    evaluated = parse(exposition("eval", seconds=1, failed=False, skipped=False, counts={}, extra={
        "headline": {"context": "gold", "versus": "base", "base": {"f1": 0.4}, "klinik": {"f1": 0.5}},
        "promotion": {"promoted": False, "reason": "not better"}}))
    assert evaluated[("sovllm:pipeline_eval_f1", (("model", "klinik"),))] == 0.5
    text = exposition("eval", seconds=1, failed=False, skipped=False, counts={},
                      extra={"headline": {"base": {"f1": 0.4}, "klinik": {"f1": 0.5}}})
    types = [line for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(types) == len(set(types))  # the Pushgateway refuses a family typed twice
    assert evaluated[("sovllm:pipeline_eval_gate_refused", ())] == 1 and evaluated[("sovllm:pipeline_eval_promoted", ())] == 0
    quick = parse(exposition("eval", seconds=1, failed=False, skipped=True, counts={}, extra={"promotion": None}))
    assert quick[("sovllm:pipeline_eval_gate_refused", ())] == 0 and quick[("sovllm:pipeline_stage_skipped", ())] == 1


def test_an_unreachable_or_refused_pushgateway_is_a_warning():
    said = []
    assert push_stage(None, "p", "ingest", seconds=1, failed=False, skipped=False) is False  # not configured
    egress.install([])  # loopback only
    assert not push_stage("http://127.0.0.2:9091", "p", "ingest", seconds=1, failed=False, skipped=False, warn=said.append)
    assert said and "could not push stage ingest" in said[0]


def test_a_stage_command_pushes_its_outcome(tmp_path, tiny_model_dir):
    """`sovllm ingest` (what an Argo step runs) pushes its group to a real HTTP endpoint on loopback;
    a failed stage pushes failed=1."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from sovllm.cli import main
    from sovllm.project import init_project

    received = []

    class Gateway(BaseHTTPRequestHandler):
        def do_PUT(self):  # noqa: N802 - http.server's naming
            received.append((self.path, self.rfile.read(int(self.headers["Content-Length"])).decode()))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Gateway)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        root = tmp_path / "p"
        init_project(root)
        config = root / "sovllm.yaml"
        config.write_text(config.read_text().replace("base: smollm2-135m-instruct", f"base: {tiny_model_dir}"))
        (root / "documents" / "a.md").write_text("".join(f"# Part {i}\n\n" + f"Rule {i}: hotels cost 110 EUR. " * 40 + "\n\n"
                                                         for i in range(4)))
        url = f"http://127.0.0.1:{server.server_port}"

        def run() -> int:
            try:
                main(["ingest", str(root), "--set", f"monitoring.pushgateway={url}"])
            except SystemExit as exc:
                return exc.code or 0
            return 0

        assert run() == 0
        path, body = received[-1]
        assert path == "/metrics/job/sovllm-pipeline/project/p/stage/ingest"
        assert parse(body)[("sovllm:pipeline_stage_failed", ())] == 0
        (root / "documents" / "a.md").write_bytes(b"\xff\xfe broken")  # the only document unreadable: ingest fails
        assert run() != 0
        path, body = received[-1]
        assert path.endswith("/stage/ingest") and parse(body)[("sovllm:pipeline_stage_failed", ())] == 1
    finally:
        server.shutdown()
