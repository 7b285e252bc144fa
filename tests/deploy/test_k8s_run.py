"""The rendered serving Deployment's containers, run here: the init container's `sovllm models fetch`
against a real S3-compatible server on loopback, then the server container's command, arguments and
environment (volume mounts replaced by local folders, the port by a free loopback one, the Secret's
key by a test key) with the local vLLM, and the same for the `sovllm serve` variant. Each must
become healthy and serve the adapter: a renamed or removed vLLM flag or variable fails here."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx
import pytest

from sovllm.config import load_config
from sovllm.deploy import k8s
from sovllm.serve.vllm_server import free_port

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "acme"
KEY = "sk-test-rendered"


def _tar(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:  # uncompressed: the base model is 0.5 GB of fp32
        tar.add(str(folder), arcname=folder.name)
    return buffer.getvalue()




class Pod:
    """One pod's containers as local processes: container paths under `root`, secrets from `secrets`."""

    def __init__(self, root: Path, secrets: dict[str, dict[str, str]], programs: dict[str, str]):
        self.root, self.secrets, self.programs = root, secrets, programs
        for mount in ("models", "tmp"):
            (root / mount).mkdir(parents=True, exist_ok=True)

    def path(self, value: str) -> str:
        for mount in ("/models", "/tmp", "/dev/shm"):
            if value == mount or value.startswith(mount + "/"):
                return str(self.root / mount.strip("/").replace("/", "-")) + value[len(mount):]
            if "=" in value and value.split("=", 1)[1].startswith(mount):
                name, rest = value.split("=", 1)
                return f"{name}={self.path(rest)}"
        return value

    def env(self, container: dict) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SOVLLM_EGRESS")}
        for item in container.get("env", []):
            if "valueFrom" in item:
                ref = item["valueFrom"]["secretKeyRef"]
                env[item["name"]] = self.secrets[ref["name"]][ref["key"]]
            else:
                env[item["name"]] = self.path(item["value"])
        return env

    def argv(self, container: dict, port: int | None = None) -> list[str]:
        argv = [self.programs.get(a, a) for a in container["command"]] + [self.path(a) for a in container["args"]]
        for flag, value in (("--host", "127.0.0.1"), ("--port", str(port))):  # loopback only, a free port
            if flag in argv:
                argv[argv.index(flag) + 1] = value
        return argv


def _serve_and_check(pod: Pod, container: dict, extra_env: dict[str, str], adapter: str, base: str) -> None:
    port = free_port("127.0.0.1")
    log = open(pod.root / f"{container['name']}.log", "w")
    proc = subprocess.Popen(pod.argv(container, port), env={**pod.env(container), **extra_env}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 900
        while True:
            assert proc.poll() is None, (pod.root / f"{container['name']}.log").read_text()[-4000:]
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:  # the rendered probes' path
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "not healthy in 900 s"
            time.sleep(2)
        auth = {"Authorization": f"Bearer {KEY}"}
        assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 401  # the key from the Secret is enforced
        served = {m["id"] for m in httpx.get(f"{url}/v1/models", headers=auth, timeout=30).json()["data"]}
        assert {base, adapter} <= served, served
        reply = httpx.post(f"{url}/v1/chat/completions", headers=auth, timeout=300, json={
            "model": adapter, "messages": [{"role": "user", "content": "Wie lange gilt ein Passwort?"}],
            "max_tokens": 8, "temperature": 0})
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"]
        assert "vllm:num_requests_waiting" in httpx.get(f"{url}/metrics", timeout=30).text  # what the autoscaler reads
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_the_rendered_containers_fetch_verify_and_serve_the_adapter(tmp_path, s3_server, bundled_model,
                                                                   bundled_adapters, vllm_python):
    from sovllm.serve.vllm_server import cpu_env

    port, client = s3_server
    client.create_bucket(Bucket="sovllm")
    client.put_object(Bucket="sovllm", Key="models/smollm2.tar", Body=_tar(Path(bundled_model.path)))
    client.put_object(Bucket="sovllm", Key="adapters/acme-a.tar", Body=_tar(Path(bundled_adapters["acme-a"])))
    cfg = load_config(EXAMPLE, (f"cluster.object_store.endpoint=127.0.0.1:{port}", "cluster.object_store.insecure=true",
                                "cluster.serving.base_model_key=models/smollm2.tar",
                                "cluster.serving.dtype=float32", "cluster.serving.max_model_len=2048"))
    cfg.cluster.serving.adapters = {"acme-a": "adapters/acme-a.tar"}
    secrets = {"sovllm-object-store": {"accessKey": "testing", "secretKey": "testing"},
               "sovllm-api-key": {"apiKey": KEY}}
    sovllm = str(Path(sys.executable).with_name("sovllm"))
    for engine in ("vllm", "sovllm"):
        cfg.cluster.serving.engine = engine
        spec = k8s.deployment(cfg)["spec"]["template"]["spec"]
        pod = Pod(tmp_path / engine, secrets, {"sovllm": sovllm, "python3": str(vllm_python)})
        fetch = spec["initContainers"][0]
        done = subprocess.run(pod.argv(fetch), env=pod.env(fetch), capture_output=True, text=True, timeout=600,
                              check=False)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        assert (pod.root / "models" / "adapters" / "acme-a" / "adapter_model.safetensors").is_file()
        container = spec["containers"][0]
        # what the image itself provides on a CPU machine (vLLM's CPU build: thread binding, tcmalloc)
        extra = cpu_env(vllm_python) if engine == "vllm" else {}
        _serve_and_check(pod, container, extra, "acme-a", "smollm2-135m-instruct")
