"""Fixtures for synth tests: chunks and answer scripts for the fake endpoint."""

from __future__ import annotations

import json
import re

import pytest

from sovllm.endpoint import Endpoint

CHUNKS = [
    {"id": f"doc{i}-00000", "doc_id": f"doc{i}", "lang": "de" if i == 3 else "en", "heading_path": ["Policy", f"Part {i}"],
     "n_tokens": 60, "source": {"path": f"d{i}.md", "sha256": "0" * 64, "page": None}, "meta": {},
     "text": (f"Die Tunnelwerk-Sitzung {i} endet nach {i + 8} Stunden. Danach muss man sich mit dem blauen Schlüssel "
              f"neu anmelden, weil der Server die Verbindung trennt." if i == 3 else
              f"The Tunnelwerk session {i} ends after {i + 8} hours of use. Engineers must reconnect with the blue "
              f"FIDO2 key because the gateway drops the tunnel. Backups of system {i} run at 01:30 CET while "
              f"restores take longer than forty minutes.")}
    for i in range(6)
]


def first_sentence(text: str) -> str:
    return re.split(r"(?<=\.)\s", text)[0]


def text_of(body: dict) -> str:
    return body["messages"][-1]["content"]


def chunk_for(body: dict) -> dict:
    user = text_of(body)
    return next(c for c in CHUNKS if c["text"] in user or first_sentence(c["text"]) in user)


def good_free(body: dict, n: int):
    """A valid free-mode answer for the chunk in the prompt: grounded answers, distinct questions."""
    chunk = chunk_for(body)
    types = body["response_format"]["json_schema"]["schema"]["required"]
    sentence = first_sentence(chunk["text"])
    return 200, json.dumps({t: {"question": f"What does part {chunk['id']} say about {t} matters?",
                                "answer": sentence} for t in types})

def endpoint_of(fake_endpoint, embedded=False) -> Endpoint:
    return Endpoint(fake_endpoint.base_url, fake_endpoint.model, None, embedded)
