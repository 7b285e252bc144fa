"""Tokenizer normalisation: padding must never hide the end of a turn.

Many chat checkpoints (the bundled SmolLM2 among them) ship with pad = eos = the end-of-turn token.
A collator that masks padding by token id then also masks the real end of every answer, and the
fine-tuned model never learns to stop. sovllm picks as pad an *existing* special token that is
neither eos, nor an end-of-turn/stop token of the generation config, nor a marker the chat
template uses. It never adds tokens or resizes embeddings, because vLLM cannot serve adapters
trained with an extended vocabulary.
"""

from __future__ import annotations

import re
from pathlib import Path

from sovllm.errors import ModelError

# Names that read like an end or separator marker are poor pad tokens even if unused by the template.
_END_LIKE = re.compile(r"end|eos|eot|stop|sep|eom", re.IGNORECASE)


def _ids(value) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}


def special_tokens(tokenizer) -> dict[int, str]:
    """All special tokens of the vocabulary by id (added special tokens plus the named ones)."""
    found = {i: t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
    for token_id, token in zip(tokenizer.all_special_ids, tokenizer.all_special_tokens):
        found.setdefault(token_id, token)
    return dict(sorted(found.items()))


def end_of_turn_ids(tokenizer, generation_config=None) -> set[int]:
    """Token ids that end a turn or generation: eos, generation-config eos, template markers."""
    ids = _ids(tokenizer.eos_token_id)
    if generation_config is not None:
        ids |= _ids(getattr(generation_config, "eos_token_id", None))
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    for token_id, token in special_tokens(tokenizer).items():
        # A special token written into the template closes or opens turns; `<|im_end|>` is the
        # classic case. Treat all of them as turn markers.
        if token and token in template:
            ids.add(token_id)
    return ids


def choose_pad_token(tokenizer, generation_config=None) -> tuple[str, int]:
    """The existing special token to pad with (never eos or an end-of-turn/template token)."""
    excluded = end_of_turn_ids(tokenizer, generation_config) | _ids(tokenizer.bos_token_id)
    candidates = [(i, t) for i, t in special_tokens(tokenizer).items() if i not in excluded]
    if not candidates:
        raise ModelError(
            "the tokenizer has no special token that is neither eos nor an end-of-turn token, so "
            "padding would hide the end of turns",
            hint="use a base model whose vocabulary has a spare special token (sovllm never adds tokens)",
        )
    unk = tokenizer.unk_token_id
    # Prefer tokens that are not unk and do not read like an end/separator marker.
    candidates.sort(key=lambda it: (it[0] == unk, bool(_END_LIKE.search(it[1])), it[0]))
    token_id, token = candidates[0]
    return token, token_id


def normalise_tokenizer(tokenizer, generation_config=None):
    """Set a safe pad token in place (vocabulary size unchanged) and return the tokenizer."""
    size = len(tokenizer)
    pad_id = tokenizer.pad_token_id
    if pad_id is None or pad_id in end_of_turn_ids(tokenizer, generation_config):
        token, _ = choose_pad_token(tokenizer, generation_config)
        tokenizer.pad_token = token
    if len(tokenizer) != size:  # pragma: no cover - guards the no-new-tokens rule
        raise ModelError(f"setting the pad token changed the vocabulary size ({size} -> {len(tokenizer)})")
    return tokenizer


def load_tokenizer(model_dir: str | Path):
    """Load a model directory's tokenizer, normalised (see module docstring)."""
    from transformers import AutoTokenizer, GenerationConfig

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{model_dir}: cannot load the tokenizer ({exc})") from None
    try:
        generation_config = GenerationConfig.from_pretrained(str(model_dir))
    except (OSError, ValueError):
        generation_config = None
    return normalise_tokenizer(tokenizer, generation_config)


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in character → the byte it stands for (GPT-2's table:
    printable Latin-1 bytes stand for themselves, the other 68 bytes for U+0100 onwards)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {chr(b): b for b in printable}, 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


_BYTE_LEVEL = _byte_level_alphabet()
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    try:
        return '"ByteLevel"' in (decoder.__getstate__().decode() if decoder is not None else "")
    except (AttributeError, UnicodeDecodeError):
        return False


def token_bytes(tokenizer, token_id: int) -> list[int]:
    """The raw bytes one token stands for (OpenAI logprobs' `bytes`): a token that holds part of a
    multi-byte character yields that part, where decoding it alone gives U+FFFD. Byte-level BPE
    pieces map through its byte alphabet, byte-fallback pieces (`<0xE2>`) are their byte,
    SentencePiece's `▁` is a space; special tokens are their text."""
    piece = tokenizer.convert_ids_to_tokens(int(token_id))
    if piece is None:
        return []
    if int(token_id) in set(tokenizer.all_special_ids):
        return list(piece.encode("utf-8"))
    if (match := _BYTE_FALLBACK.fullmatch(piece)) is not None:
        return [int(match.group(1), 16)]
    if _is_byte_level(tokenizer) and all(c in _BYTE_LEVEL for c in piece):
        return [_BYTE_LEVEL[c] for c in piece]
    return list(piece.replace("▁", " ").encode("utf-8"))
