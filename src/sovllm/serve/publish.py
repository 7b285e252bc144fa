"""Make adapters available to a configured endpoint (vLLM) before eval asks it for them.

The embedded server loads the adapters it is started with; a server the team runs itself has to
be told. `endpoint.adapter_loading` says how:

- `api` (default): vLLM's runtime API. An adapter the server already lists under that name is
  unloaded first (a retrained adapter keeps its name), then `POST /v1/load_lora_adapter` with the
  adapter's absolute folder: the server must see that path (same machine, or a shared volume
  mounted at the same path). Needs `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True` on the server.
- `folder`: the adapter is copied to `endpoint.adapter_dir/<name>` (the folder the server's
  filesystem resolver reads, `VLLM_LORA_RESOLVER_CACHE_DIR`), its `base_model_name_or_path` set to
  `endpoint.base_model_path` (the `--model` string the server was started with: the resolver
  compares the two), and a loaded copy is unloaded so the next request loads the new weights.
- `none`: the endpoint serves the adapters already; nothing is done.

Every request goes through the egress guard, like every other call to the endpoint.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import httpx

from sovllm import egress
from sovllm.config import EndpointSection
from sovllm.errors import BackendError, ConfigError


def _client(api_key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.Client(timeout=300, headers=headers, **egress.http_client_options(asynchronous=False))


def served_models(client: httpx.Client, base_url: str) -> set[str]:
    response = client.get(f"{base_url}/models")
    if response.status_code != 200:
        raise BackendError(f"{base_url}/models answered {response.status_code}: {response.text[:200]}")
    return {m.get("id") for m in response.json().get("data", []) if isinstance(m, dict)}


def _unload(client: httpx.Client, base_url: str, name: str) -> None:
    response = client.post(f"{base_url}/unload_lora_adapter", json={"lora_name": name})
    if response.status_code not in (200, 404):
        raise BackendError(f"{base_url}: unloading adapter {name!r} failed ({response.status_code}: "
                           f"{response.text[:200]})", hint="start vLLM with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True")


def copy_for_resolver(adapter: Path, target: Path, base_model: str) -> Path:
    """`adapter` copied to `target` (replacing it) with `base_model_name_or_path` = `base_model`."""
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(adapter, staging, ignore=shutil.ignore_patterns("checkpoint-*"))
    config_path = staging / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base_model
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)  # the resolver never sees a half-copied adapter
    return target


def publish(section: EndpointSection, adapters: dict[str, str], *, api_key: str | None = None,
            log: Callable[[str], None] = lambda _: None) -> None:
    """Make each adapter (name → folder) available to the endpoint `section` configures."""
    if not adapters or section.adapter_loading == "none" or not section.base_url:
        return
    base_url = section.base_url.rstrip("/")
    if section.adapter_loading == "folder" and (not section.adapter_dir or not section.base_model_path):
        raise ConfigError("endpoint.adapter_loading: folder needs endpoint.adapter_dir and endpoint.base_model_path",
                          hint="adapter_dir = the server's VLLM_LORA_RESOLVER_CACHE_DIR, base_model_path = the "
                               "--model string it was started with")
    with _client(api_key) as client:
        try:
            listed = served_models(client, base_url)
            for name, folder in adapters.items():
                path = Path(folder).resolve()
                if section.adapter_loading == "folder":
                    copy_for_resolver(path, Path(section.adapter_dir) / name, section.base_model_path)
                    if name in listed:
                        _unload(client, base_url, name)
                    log(f"adapter {name}: copied to {Path(section.adapter_dir) / name} for the endpoint's resolver")
                    continue
                if name in listed:
                    _unload(client, base_url, name)
                response = client.post(f"{base_url}/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})
                if response.status_code != 200:
                    raise BackendError(
                        f"{base_url}: loading adapter {name!r} from {path} failed ({response.status_code}: "
                        f"{response.text[:200]})",
                        hint="the server must run with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and see that path; "
                             "or set endpoint.adapter_loading: folder (resolver) or none")
                log(f"adapter {name}: loaded into {base_url} from {path}")
        except httpx.HTTPError as exc:
            blocked = egress.explain(exc)
            if blocked is not None:
                raise blocked from None
            raise BackendError(f"{base_url}: could not reach the endpoint to load adapters ({exc})") from None
