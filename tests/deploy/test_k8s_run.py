"""The rendered serving Deployment's containers, run here: the init container's `sovllm models fetch`
against a real S3-compatible server on loopback, then the server container's command, arguments and
environment (volume mounts replaced by local folders, the port by a free loopback one, the Secret's
key by a test key) with the local vLLM, and the same for the `sovllm serve` variant. Each must
become healthy and serve the adapter: a renamed or removed vLLM flag or variable fails here."""

from __future__ import annotations

import contextlib
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
    """One pod's containers as local processes: container paths (`mounts`) under `root`, secrets from `secrets`."""

    def __init__(self, root: Path, secrets: dict[str, dict[str, str]], programs: dict[str, str],
                 mounts: tuple[str, ...] = ("/models", "/tmp", "/dev/shm")):
        self.root, self.secrets, self.programs = root, secrets, programs
        self.mounts = {mount: root / mount.strip("/").replace("/", "-") for mount in mounts}
        for folder in self.mounts.values():
            folder.mkdir(parents=True, exist_ok=True)

    def path(self, value: str) -> str:
        for mount, folder in self.mounts.items():
            if value == mount or value.startswith(mount + "/"):
                return str(folder) + value[len(mount):]
            if "=" in value and value.split("=", 1)[1].startswith(mount):
                name, rest = value.split("=", 1)
                return f"{name}={self.path(rest)}"
        return value

    def volumes(self, spec: dict, config_maps: dict[str, dict]) -> None:
        """Fill the mounted folders as the kubelet would: ConfigMap data and Secret items as files."""
        sources = {v["name"]: v for v in spec["volumes"]}
        for container in spec["containers"]:
            for mount in container["volumeMounts"]:
                volume, folder = sources[mount["name"]], self.mounts[mount["mountPath"]]
                if "configMap" in volume:
                    for name, text in config_maps[volume["configMap"]["name"]]["data"].items():
                        (folder / name).write_text(text)
                elif "secret" in volume:
                    secret = self.secrets[volume["secret"]["secretName"]]
                    for item in volume["secret"]["items"]:
                        (folder / item["path"]).write_text(secret[item["key"]])

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


@contextlib.contextmanager
def running(pod: Pod, container: dict, extra_env: dict[str, str], timeout: float = 900):
    """The container's command on a free loopback port until its readiness probe's path answers 200."""
    port = free_port("127.0.0.1")
    log = open(pod.root / f"{container['name']}.log", "w")
    proc = subprocess.Popen(pod.argv(container, port), env={**pod.env(container), **extra_env}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        ready = container["readinessProbe"]["httpGet"]["path"]  # the rendered probe's path
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, (pod.root / f"{container['name']}.log").read_text()[-4000:]
            try:
                if httpx.get(f"{url}{ready}", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"not ready in {timeout:.0f} s"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _serve_and_check(pod: Pod, container: dict, extra_env: dict[str, str], adapter: str, base: str) -> None:
    with running(pod, container, extra_env) as url:
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


GATEWAY = Path(__file__).parent / "gateway-project"
TENANT_KEYS = {"finance": "sk-sovllm-finance-rendered", "hr": "sk-sovllm-hr-rendered",
               "admin": "sk-sovllm-admin-rendered"}


@pytest.mark.parametrize("store", ["database", "sqlite"])
def test_the_rendered_gateway_serves_tenants_through_the_upstream(tmp_path, store):
    """The gateway container's command, environment and mounts (the ConfigMap and the keys Secret as
    files) against a scripted upstream that demands the serving Secret's key: the upstream's Service URL
    is the one thing replaced (by the upstream's loopback address)."""
    from sovllm.deploy import k8s_gateway
    from tests.gateway.procs import Proc

    cfg = load_config(GATEWAY, ("gateway.usage_database_env=null",) if store == "sqlite" else ())
    upstream = Proc([sys.executable, "-m", "benchmarks.scripted_upstream", "--port", "0", "--base",
                     "smollm2-135m-instruct", "--adapters", "acme-v1,acme-v2", "--tokens", "4", "--api-key", KEY,
                     "--ready-file", str(tmp_path / "upstream.ready")], tmp_path / "upstream.ready", "upstream")
    try:
        objects = k8s_gateway.objects(cfg, k8s.upstream(cfg))
        spec = objects["gateway-deployment"]["spec"]["template"]["spec"]
        [container] = spec["containers"]
        database = tmp_path / "shared.db"
        secrets = {"sovllm-api-key": {"apiKey": KEY},
                   "sovllm-gateway-keys": {"tenant.finance": TENANT_KEYS["finance"] + "\n",
                                           "admin.keys": TENANT_KEYS["admin"] + "\n",
                                           "HR_GATEWAY_KEY": TENANT_KEYS["hr"]},
                   "sovllm-gateway-database": {"url": f"sqlite:///{database}"}}  # a URL SQLAlchemy opens here
        pod = Pod(tmp_path / "pod", secrets, {"sovllm": str(Path(sys.executable).with_name("sovllm"))},
                  mounts=tuple(m["mountPath"] for m in container["volumeMounts"]))
        config = objects["gateway-config"]
        text = config["data"]["sovllm.yaml"].replace(k8s.upstream(cfg).url(cfg.cluster.namespace), f"{upstream.url}/v1")
        for mount in pod.mounts:  # container paths in the config, as the mounts map them here
            text = text.replace(mount, pod.path(mount))
        pod.volumes(spec, {config["metadata"]["name"]: {"data": {"sovllm.yaml": text}}})
        with running(pod, container, {}, timeout=60) as url:
            assert httpx.get(f"{url}/version", timeout=10).status_code == 200  # the liveness probe's path
            chat = {"model": "assistant", "messages": [{"role": "user", "content": "Wie lange gilt ein Passwort?"}]}
            assert httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=30).status_code == 401
            for tenant in ("finance", "hr"):  # a key file from the Secret, a variable from the Secret
                auth = {"Authorization": f"Bearer {TENANT_KEYS[tenant]}"}
                reply = httpx.post(f"{url}/v1/chat/completions", headers=auth, json=chat, timeout=30)
                assert reply.status_code == 200, reply.text  # the upstream took the serving Secret's key
                assert reply.json()["choices"][0]["message"]["content"]
            hr = {"Authorization": f"Bearer {TENANT_KEYS['hr']}"}
            denied = httpx.post(f"{url}/v1/chat/completions", headers=hr, json={**chat, "model": "acme-v1"}, timeout=30)
            assert denied.status_code in (403, 404), denied.text  # hr may call the alias only
            served = httpx.get(f"{upstream.url}/stats", timeout=10).json()["models"]
            assert sum(m["requests"] for name, m in served.items() if name in ("acme-v1", "acme-v2")) == 2
            metrics = httpx.get(f"{url}/metrics", timeout=10).text
            assert 'tenant="finance"' in metrics and 'tenant="hr"' in metrics
        usage = database if store == "database" else pod.mounts["/var/lib/sovllm"] / "gateway" / "usage.db"
        assert usage.is_file() and usage.stat().st_size > 0  # the usage store is where the Deployment keeps it
    finally:
        upstream.stop()
