"""`sovllm serve` as a real process on the tiny model: SIGTERM drains within the grace period, then exits 0;
clients that leave are aborted; hostile requests leave a bystander stream intact."""

from __future__ import annotations

import concurrent.futures
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from sovllm.serve.launch import EmbeddedServer

# Every test here starts `sovllm serve` (or a stage holding one) as a real process: seconds each.
pytestmark = pytest.mark.integration


def server(model_dir, grace: float) -> EmbeddedServer:
    return EmbeddedServer(str(model_dir), extra_args=["--max-num-seqs", "1", "--max-model-len", "1024",
                                                      "--grace-period", str(grace)])


def long_request(base_url: str, tokens: int):
    client = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=60)
    try:
        reply = client.completions.create(model=client.models.list().data[0].id, prompt="Hello", max_tokens=tokens,
                                          temperature=0, extra_body={"ignore_eos": True})
        return reply.choices[0].finish_reason, reply.usage.completion_tokens
    except openai.APIError as exc:
        return "error", type(exc).__name__


def running(srv: EmbeddedServer) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(srv.base_url.removesuffix("/v1") + "/metrics").text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "vllm:num_requests_running")


def test_sigterm_lets_running_requests_finish_then_exits_0(tiny_model_dir):
    # A grace period far beyond the request's need: on a loaded runner 300 tokens can take tens of
    # seconds, and what is tested is draining, not speed.
    with server(tiny_model_dir, grace=180) as srv:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            future = pool.submit(long_request, srv.base_url, 300)
            deadline = time.monotonic() + 30
            while running(srv) < 1:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            srv.process.send_signal(signal.SIGTERM)
            assert future.result(timeout=240) == ("length", 300)  # drained, not cut off
        srv.process.wait(timeout=60)
        assert srv.process.returncode == 0, srv.log_tail()
        try:
            httpx.get(srv.base_url + "/models", timeout=2)
            raise AssertionError("the server still accepts connections")
        except httpx.TransportError:
            pass


def test_sigterm_aborts_what_the_grace_period_cannot_finish(tiny_model_dir):
    with server(tiny_model_dir, grace=0.5) as srv:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(long_request, srv.base_url, 1000) for _ in range(3)]  # one slot: they queue
            _wait_for(lambda: running(srv) >= 1 and metric(srv, "vllm:num_requests_waiting") >= 2, srv)
            srv.process.send_signal(signal.SIGTERM)
            srv.process.wait(timeout=30)  # a hang guard: draining all three would take far longer
            results = [f.result(timeout=30) for f in futures]
        assert srv.process.returncode == 0, srv.log_tail()
        assert sum(r == ("length", 1000) for r in results) < 3  # not everything was allowed to finish


def metric(srv: EmbeddedServer, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(srv.base_url.removesuffix("/v1") + "/metrics").text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_client_disconnect_aborts_its_sequence(tiny_model_dir):
    with server(tiny_model_dir, grace=5) as srv:
        body = {"model": "model", "prompt": "Hello", "max_tokens": 900, "temperature": 0, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", srv.base_url + "/completions", json=body, timeout=60) as response:
            for i, _ in enumerate(response.iter_lines()):
                if i >= 5:
                    break  # leaving the block closes the connection mid-stream
        deadline = time.monotonic() + 20
        while metric(srv, "sovllm:adapter_requests_total", finished_reason="abort") < 1:
            assert time.monotonic() < deadline, srv.log_tail()
            time.sleep(0.05)
        assert running(srv) == 0
        generated = metric(srv, "vllm:generation_tokens_total")
        assert generated < 900 + 4  # the warm-up's 4 tokens + what was made before the abort
        # the engine steps for a later request; a sequence still decoding for the gone client would add tokens
        assert long_request(srv.base_url, 3) == ("length", 3)
        assert metric(srv, "vllm:generation_tokens_total") == generated + 3


CHILD = """
import signal, sys
from sovllm.cli.app import _terminate_cleanly
from sovllm.serve.launch import EmbeddedServer
_terminate_cleanly()
with EmbeddedServer(sys.argv[1], extra_args=["--max-num-seqs", "1", "--max-model-len", "256"]) as srv:
    print(srv.process.pid, flush=True)
    signal.pause()  # until the test's signal
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_the_embedded_server_does_not_outlive_a_killed_stage(tiny_model_dir, signum):
    """`kill` (SIGTERM) runs the stage's cleanup, which stops the server; after SIGKILL, where no
    cleanup runs, the server notices its parent is gone and shuts itself down."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tiny_model_dir)], stdout=subprocess.PIPE, text=True)
    try:
        server_pid = int(child.stdout.readline())
        assert alive(server_pid)
        child.send_signal(signum)
        child.wait(timeout=30)
        assert child.returncode == (143 if signum == signal.SIGTERM else -signal.SIGKILL)
        assert gone_within(server_pid, 15), f"server {server_pid} still running after its parent got {signum.name}"
    finally:
        child.kill()


def _post_raw(base_url: str, body: dict):
    """A socket that has sent a non-streaming completion request (close it to leave without the answer)."""
    import json as _json
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(base_url)
    payload = _json.dumps(body).encode()
    sock = socket.create_connection((url.hostname, url.port), timeout=10)
    sock.sendall(f"POST {url.path}/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


def _wait_for(condition, srv, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, srv.log_tail()
        time.sleep(0.02)


def test_clients_that_leave_are_aborted_whether_queued_or_running(tiny_model_dir):
    """Non-streaming clients that disconnect stop costing compute: queued ones are dropped before their
    prefill (their prompt tokens are never processed), a running one is aborted at its next step."""
    with server(tiny_model_dir, grace=5) as srv:
        long = {"model": "model", "prompt": "Hello", "max_tokens": 900, "temperature": 0, "ignore_eos": True}
        first = _post_raw(srv.base_url, long)  # takes the only slot
        _wait_for(lambda: running(srv) >= 1, srv)
        prompt_tokens = metric(srv, "vllm:prompt_tokens_total")
        queued = {**long, "prompt": "A different prompt that would cost a prefill", "max_tokens": 500}
        others = [_post_raw(srv.base_url, queued) for _ in range(4)]
        _wait_for(lambda: metric(srv, "vllm:num_requests_waiting") >= 4, srv)
        for sock in others:
            sock.close()
        _wait_for(lambda: metric(srv, "sovllm:adapter_requests_total", finished_reason="abort") >= 4, srv)
        assert metric(srv, "vllm:num_requests_waiting") == 0
        assert running(srv) == 1  # the first one is still going
        first.close()
        _wait_for(lambda: metric(srv, "sovllm:adapter_requests_total", finished_reason="abort") >= 5, srv)
        assert running(srv) == 0 and metric(srv, "vllm:kv_cache_usage_perc") == 0
        assert metric(srv, "vllm:prompt_tokens_total") == prompt_tokens  # no queued prompt was prefilled
        generated = metric(srv, "vllm:generation_tokens_total")
        assert generated < 900  # the running one was cut short
        assert long_request(srv.base_url, 3) == ("length", 3)  # see test_client_disconnect_aborts_its_sequence
        assert metric(srv, "vllm:generation_tokens_total") == generated + 3


def test_sigterm_with_queued_requests_answers_every_client_and_logs_no_traceback(tiny_model_dir):
    with server(tiny_model_dir, grace=0.5) as srv:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(long_request, srv.base_url, 1000) for _ in range(4)]  # one slot: 3 queue
            _wait_for(lambda: running(srv) >= 1 and metric(srv, "vllm:num_requests_waiting") >= 3, srv)
            srv.process.send_signal(signal.SIGTERM)
            srv.process.wait(timeout=30)
            results = [f.result(timeout=30) for f in futures]
        log = srv.log_tail(100_000)
        assert srv.process.returncode == 0, log
        assert "Traceback" not in log and "Event loop is closed" not in log, log
        assert all(r[0] in ("length", "error") for r in results), results  # every client got an answer


def _stream_text(base_url: str, body: dict) -> tuple[str, str]:
    text, finish = [], None
    with httpx.stream("POST", base_url + "/completions", json={**body, "stream": True}, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                import json as _json

                choice = _json.loads(line[6:])["choices"][0]
                text.append(choice["text"])
                finish = choice["finish_reason"] or finish
    return "".join(text), finish


def test_hostile_requests_against_a_real_server_leave_a_bystander_stream_intact(tiny_model_dir, tiny_adapters,
                                                                                tmp_path):
    """Hostile requests replayed while bystander streams run: each gets a 4xx JSON error, every bystander
    stream gives exactly the text it gives alone, and the server ends idle and healthy."""
    import json as _json
    import shutil

    bad = tmp_path / "adapters" / "pissa"
    shutil.copytree(tiny_adapters["r2"], bad)
    config = _json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(_json.dumps({**config, "init_lora_weights": "pissa"}))
    srv = EmbeddedServer(str(tiny_model_dir), extra_args=["--max-num-seqs", "4", "--max-model-len", "1024",
                                                          "--adapter-root", str(tmp_path / "adapters")])
    with srv:
        base = srv.base_url
        bystander = {"model": "model", "prompt": "Hello there", "max_tokens": 300, "temperature": 0,
                     "ignore_eos": True}
        reference = _stream_text(base, bystander)
        assert reference[1] == "length"
        deep: dict = {"type": "string"}
        for _ in range(800):
            deep = {"type": "array", "items": deep}
        chat = {"model": "model", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        hostile = [
            ("/completions", {"model": "model", "prompt": [1_000_000_000], "max_tokens": 4}),
            ("/completions", {"model": "model", "prompt": [-5], "max_tokens": 4}),
            ("/completions", {"model": "model", "prompt": "Hi", "seed": 2**64}),
            ("/completions", {"model": "model", "prompt": "Hi", "stop_token_ids": [-1], "min_tokens": 2}),
            ("/completions", {"model": "model", "prompt": ["Hi"] * 200}),
            ("/completions", {"model": "model\ud800", "prompt": "Hi"}),
            ("/chat/completions", {**chat, "messages": [{"role": "user", "content": "\udfff"}]}),
            ("/chat/completions", {**chat, "response_format": {"type": "json_schema",
                                                               "json_schema": {"name": "d", "schema": deep}}}),
            ("/load_lora_adapter", {"lora_name": "pissa", "lora_path": str(bad)}),
            ("/load_lora_adapter", {"lora_name": "x" * 100_000, "lora_path": str(bad)}),
        ]
        results, stop = [], threading.Event()

        def bystanders():
            while not stop.is_set():
                results.append(_stream_text(base, bystander))

        thread = threading.Thread(target=bystanders)
        thread.start()
        try:
            for path, body in hostile:
                response = httpx.post(base + path, content=_json.dumps(body),
                                      headers={"content-type": "application/json"}, timeout=60)
                assert 400 <= response.status_code < 500, (path, response.status_code, response.text)
                assert response.json()["error"]["message"]
            broken = httpx.post(base + "/completions", content=b'{"model": "model", "prompt": ',
                                headers={"content-type": "application/json"}, timeout=60)
            assert broken.status_code == 400
        finally:
            stop.set()
            thread.join(120)
        assert results and all(r == reference for r in results), results[:2]
        assert httpx.get(base.removesuffix("/v1") + "/health").status_code == 200
        _wait_for(lambda: metric(srv, "vllm:kv_cache_usage_perc") == 0 and running(srv) == 0, srv)
        assert "Traceback" not in srv.log_tail(100_000)
