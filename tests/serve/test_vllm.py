"""sovllm adapters on a real vLLM server (the CPU build `make vllm` installs): every way users load
them, the same greedy tokens as `sovllm serve`, and the refusal calibration travelling with them.

One vLLM server per test run (`vllm_server` in tests/conftest.py); `bundled_server` is the shared
`sovllm serve` on the same model and adapters.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from sovllm.config import PromptSection
from sovllm.models.prompt import user_turn

pytestmark = [pytest.mark.integration, pytest.mark.vllm]

PROMPT = PromptSection()
TIE = 0.05  # a first divergence where the two tokens' log-probabilities differ by less than this is an fp32 near-tie

CONTEXTS = [
    ("[1] Kantine\nDie Kantine im Erdgeschoss öffnet werktags um 7:00 Uhr und schließt um 18:30 Uhr. "
     "Ein Mittagessen kostet für Beschäftigte 4,20 Euro.", ["Wann öffnet die Kantine?", "Was kostet ein Mittagessen?",
                                                          "Welche Kaffeemarke gibt es in der Kantine?"]),
    ("[1] Badges\nReplacement badges are issued by the badge office in room A0.21, Monday to Thursday from "
     "8:00 to 15:00. The first replacement in a calendar year costs 25 euros.",
     ["Where are replacement badges issued?", "What does the first replacement cost?",
      "Who designed the badge layout?"]),
    ("[1] VPN\nThe VPN client Tunnelwerk needs a FIDO2 key. Passwords rotate every 90 days; the helpdesk is on "
     "extension 4417.", ["How often do passwords rotate?", "Which car does the CEO drive?"]),
]
TRAINING_FORMAT = [[{"role": "system", "content": PROMPT.system}, {"role": "user", "content": user_turn(c, q)}]
                   for c, questions in CONTEXTS for q in questions]  # 8 prompts
CHATS = [[{"role": "system", "content": "You are a concise assistant."}, {"role": "user", "content": text}]
         for text in ("What is the capital of France?", "Write one sentence about the sea.",
                      "Name three colours.", "Wie viele Tage hat eine Woche?", "Explain what a LoRA adapter is.",
                      "Give me a short greeting in German.", "What is 12 plus 30?", "List two fruits.")]
PROMPTS = TRAINING_FORMAT + CHATS  # 16


def chat(base_url: str, model: str, messages: list[dict], max_tokens: int = 24) -> httpx.Response:
    return httpx.post(f"{base_url}/chat/completions", timeout=600,
                      json={"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                            "logprobs": True, "top_logprobs": 2})


def steps(response: httpx.Response) -> list[dict]:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["logprobs"]["content"]


def _partial(step: dict) -> bool:
    """A token that ends inside a UTF-8 character: vLLM shows it as "", sovllm as U+FFFD."""
    return step["token"] == "" or "\ufffd" in step["token"]


def same_step(x: dict, y: dict) -> bool:
    """The same token, or the same log-probability for a token both servers can only show partly."""
    return x["token"] == y["token"] or ((_partial(x) or _partial(y)) and abs(x["logprob"] - y["logprob"]) < 1e-3)


def compare(a: list[dict], b: list[dict]) -> str:
    """'same', 'near-tie' (first divergence between two tokens within TIE of each other on both
    servers), or 'different'."""
    for x, y in zip(a, b):
        if same_step(x, y):
            continue
        gaps = []
        for step in (x, y):
            top = {t["token"]: t["logprob"] for t in step.get("top_logprobs") or []}
            if x["token"] in top and y["token"] in top:
                gaps.append(abs(top[x["token"]] - top[y["token"]]))
        return "near-tie" if gaps and min(gaps) < TIE else "different"
    return "same" if len(a) == len(b) else "different"


def tally(vllm_url: str, sovllm_url: str, model_vllm: str, model_sovllm: str, prompts) -> dict:
    counts = {"same": 0, "near-tie": 0, "different": 0}
    for messages in prompts:
        counts[compare(steps(chat(vllm_url, model_vllm, messages)), steps(chat(sovllm_url, model_sovllm, messages)))] += 1
    return counts


def test_static_adapters_are_listed_and_change_the_answers(vllm_server, bundled_model):
    models = httpx.get(f"{vllm_server.base_url}/models", timeout=30).json()
    assert {bundled_model.name, "acme-a", "acme-cal"} <= {m["id"] for m in models["data"]}
    base = [steps(chat(vllm_server.base_url, bundled_model.name, m)) for m in CHATS[:3]]
    adapted = [steps(chat(vllm_server.base_url, "acme-a", m)) for m in CHATS[:3]]
    assert any([s["token"] for s in a] != [s["token"] for s in b] for a, b in zip(base, adapted))


def test_an_adapter_loads_and_unloads_at_runtime(vllm_server, vllm_adapters):
    adapters, _ = vllm_adapters
    url = vllm_server.base_url
    loaded = httpx.post(f"{url}/load_lora_adapter", json={"lora_name": "acme-b", "lora_path": str(adapters["acme-b"])},
                        timeout=120)
    assert loaded.status_code == 200, loaded.text
    assert steps(chat(url, "acme-b", CHATS[0], max_tokens=4))
    assert httpx.post(f"{url}/unload_lora_adapter", json={"lora_name": "acme-b"}, timeout=60).status_code == 200
    gone = chat(url, "acme-b", CHATS[0], max_tokens=4)
    assert gone.status_code == 404 and "acme-b" in gone.json()["error"]["message"]


def test_the_filesystem_resolver_loads_adapters_for_the_served_base_only(vllm_server):
    url = vllm_server.base_url
    assert steps(chat(url, "resolved", CHATS[1], max_tokens=4))
    assert "resolved" in {m["id"] for m in httpx.get(f"{url}/models", timeout=30).json()["data"]}
    for name in ("foreign-base", "no-such-adapter"):
        refused = chat(url, name, CHATS[1], max_tokens=4)
        assert refused.status_code == 404 and refused.json()["error"]["message"], name


def test_greedy_tokens_match_sovllm_serve_for_base_and_adapter(vllm_server, bundled_server, bundled_model):
    results = {
        "base": tally(vllm_server.base_url, bundled_server.base_url, bundled_model.name, bundled_server.served_name,
                      PROMPTS),
        "acme-a": tally(vllm_server.base_url, bundled_server.base_url, "acme-a", "acme-a", PROMPTS),
    }
    print("greedy parity over 16 prompts, 24 tokens:", results)
    for model, counts in results.items():
        assert counts["different"] == 0, (model, counts)
        assert counts["same"] >= 12, (model, counts)


def test_the_refusal_calibration_travels_with_the_adapter(vllm_server, bundled_server, vllm_adapters):
    adapters, _ = vllm_adapters
    loaded = httpx.post(f"{bundled_server.base_url}/load_lora_adapter",
                        json={"lora_name": "acme-cal", "lora_path": str(adapters["acme-cal"])}, timeout=120)
    assert loaded.status_code == 200, loaded.text
    counts = tally(vllm_server.base_url, bundled_server.base_url, "acme-cal", "acme-cal", TRAINING_FORMAT)
    print("calibrated adapter, vLLM with sovllm's plugin against sovllm serve:", counts)
    assert counts["different"] == 0 and counts["same"] >= 6, counts
    refusal = PROMPT.refusal.strip()[:30]
    answers = [chat(vllm_server.base_url, "acme-cal", m).json()["choices"][0]["message"]["content"]
               for m in TRAINING_FORMAT]
    plain = [chat(vllm_server.base_url, "acme-a", m).json()["choices"][0]["message"]["content"]
             for m in TRAINING_FORMAT]
    # the same weights without the calibration answer differently: the bias acted inside vLLM, both ways
    assert any(a.startswith(refusal) for a in answers) and not all(a.startswith(refusal) for a in answers)
    assert sum(a.startswith(refusal) for a in answers) != sum(p.startswith(refusal) for p in plain)


def test_publish_copies_an_adapter_for_the_resolver(vllm_server, vllm_adapters, bundled_model):
    from sovllm.config import EndpointSection
    from sovllm.serve.publish import publish

    adapters, resolver = vllm_adapters
    section = EndpointSection(base_url=vllm_server.base_url, model=bundled_model.name, adapter_loading="folder",
                              adapter_dir=str(resolver), base_model_path=str(bundled_model.path))
    publish(section, {"published": str(adapters["acme-b"])})
    config = json.loads((resolver / "published" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(bundled_model.path)
    assert steps(chat(vllm_server.base_url, "published", CHATS[2], max_tokens=4))


def _champion(project: Path, registered: str) -> str | None:
    from mlflow import MlflowClient

    from sovllm.train.tracking import default_uri

    try:
        client = MlflowClient(default_uri(project / "out" / "mlflow"))
        return str(client.get_model_version_by_alias(registered, "champion").version)
    except Exception:  # noqa: BLE001 - no champion alias
        return None


def _register_champion(project: Path, adapter: Path, registered: str) -> str:
    """Register `adapter` as a new version of the project's model and make it the champion."""
    from sovllm.train.tracking import Tracker, default_uri

    store = project / "out" / "mlflow"
    tracker = Tracker(default_uri(store), "klinik", store)
    tracker.start("a damaged champion")
    tracker.artifacts(adapter, "adapter")
    version = tracker.register(registered, "adapter", alias="champion")
    tracker.end()
    return version


def test_a_quick_run_against_vllm_and_the_eval_gate_updates_the_endpoint(tmp_path, vllm_server, bundled_model):
    """synth, the judge and eval on vLLM; the trained adapter loaded into it at runtime for eval; the
    eval gate (--promote) against the base model, then against a champion fetched from MLflow and
    served by vLLM, and the promoted adapter published to vLLM under the gate's alias."""
    from sovllm.models.tiny import make_random_adapter

    project = tmp_path / "klinik"
    shutil.copytree(Path(__file__).resolve().parents[2] / "examples" / "klinik", project,
                    ignore=shutil.ignore_patterns("out"))
    exe = shutil.which("sovllm", path=str(Path(sys.executable).parent)) or "sovllm"
    on_vllm = ("--set", f"endpoint.base_url={vllm_server.base_url}", "--set", f"endpoint.model={bundled_model.name}")
    # 4 --quick steps teach stopping only partly (adapter 60 % against the base's 40 % here); the gate needs a
    # registered candidate, so this project accepts an adapter that stops at least as often as the base
    accept = ("--set", "train.stop_min_rate=0")
    proc = subprocess.run([exe, "run", str(project), "--quick", "--promote", *on_vllm, *accept],
                          capture_output=True, text=True, timeout=1800, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "starting the embedded server" not in proc.stdout + proc.stderr
    assert f"adapter klinik: loaded into {vllm_server.base_url}" in proc.stdout + proc.stderr
    served = {m["id"] for m in httpx.get(f"{vllm_server.base_url}/models", timeout=30).json()["data"]}
    assert "klinik" in served
    summary = json.loads((project / "out" / "eval" / "summary.json").read_text())
    assert [m["served_as"] for m in summary["models"]] == [bundled_model.name, "klinik"]
    assert summary["table"]["gold"]["klinik"]["items"] > 0
    train = json.loads((project / "out" / "train" / "manifest.json").read_text())["extra"]["mlflow"]
    assert train["version"], "the adapter passed its stop check and was registered"
    decision = summary["promotion"]  # the gate against the base model (no champion yet)
    assert decision["versus"] == "base" and decision["candidate_version"] == train["version"]
    assert _champion(project, train["registered_model"]) == (train["version"] if decision["promoted"] else None)

    # a champion that answers badly (a random adapter with large weights), registered in the project's MLflow:
    # eval fetches it, loads it into vLLM next to the candidate, and the candidate must take the alias
    damaged = make_random_adapter(bundled_model.path, tmp_path / "damaged", rank=8, seed=7, scale=4.0,
                                  target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
                                  base_id=bundled_model.base_id)
    champion = _register_champion(project, damaged, train["registered_model"])
    # 16 eval items (about 10 answerable), so the paired test has enough items to call the candidate better
    gate = subprocess.run([exe, "eval", str(project), "--quick", "--promote", "--force", *on_vllm, *accept,
                           "--set", "eval.quick_limit=16"],
                          capture_output=True, text=True, timeout=1800, env={**os.environ, "COLUMNS": "200"})
    assert gate.returncode == 0, gate.stderr[-3000:]
    said = " ".join((gate.stdout + gate.stderr).split())
    assert f"adapter champion: loaded into {vllm_server.base_url}" in said
    decision = json.loads((project / "out" / "eval" / "summary.json").read_text())["promotion"]
    assert decision["versus"] == "champion" and decision["champion_version"] == champion, decision
    assert decision["promoted"] and decision["alias"] == "champion", decision
    assert _champion(project, train["registered_model"]) == train["version"]
    # vLLM now serves the promoted adapter under the alias: the same greedy tokens as the candidate
    tokens = lambda model: [s["token"] for s in steps(chat(vllm_server.base_url, model, CHATS[0]))]  # noqa: E731
    assert tokens("champion") == tokens("klinik") != tokens("acme-a")


def test_a_killed_parent_leaves_no_vllm_server_behind(vllm_python, bundled_model):
    code = ("import os, signal\n"
            "from sovllm.serve.vllm_server import VLLMServer\n"
            f"s = VLLMServer({str(bundled_model.path)!r}, served_name='m', calibration=False, startup_timeout=600)\n"
            "s.start()\n"
            "print(s.process.pid, flush=True)\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, check=False)
    pid = int(proc.stdout.split()[0])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return
        if state in ("Z", "X"):  # exited; its new parent has not reaped it yet
            return
        time.sleep(1)
    os.kill(pid, 9)
    pytest.fail("the vLLM server outlived the process that started it")
