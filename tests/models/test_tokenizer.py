"""Tokenizer normalisation on the tiny in-code model: pad never equals an end-of-turn token."""

from __future__ import annotations

import pytest

from sovllm.errors import ModelError
from sovllm.models.tiny import build_tiny_tokenizer
from sovllm.models.tokenizer import choose_pad_token, end_of_turn_ids, load_tokenizer, normalise_tokenizer


def test_tiny_tokenizer_has_the_smollm2_trap():
    tok = build_tiny_tokenizer()
    assert tok.pad_token == tok.eos_token == "<|im_end|>"


def test_pad_becomes_a_spare_special_token_without_new_tokens():
    tok = build_tiny_tokenizer()
    size = len(tok)
    normalise_tokenizer(tok)
    assert tok.pad_token == "<reserved_0>" and len(tok) == size
    assert tok.pad_token_id not in end_of_turn_ids(tok) | {tok.eos_token_id, tok.bos_token_id}


def test_end_of_turn_ids_include_template_markers_and_generation_eos():
    tok = build_tiny_tokenizer()
    ids = tok.convert_tokens_to_ids
    assert end_of_turn_ids(tok) == {ids("<|im_start|>"), ids("<|im_end|>")}

    class GenerationConfig:
        eos_token_id = [ids("<|im_end|>"), ids("<reserved_0>")]

    # <reserved_0> is a stop token here, so the only spare one left is <|endoftext|> (unk).
    assert choose_pad_token(tok, GenerationConfig()) == ("<|endoftext|>", ids("<|endoftext|>"))


def test_no_spare_special_token_is_a_clear_error():
    tok = build_tiny_tokenizer()
    tok.chat_template += "{# <|endoftext|> <reserved_0> #}"  # every special token is now a template marker
    with pytest.raises(ModelError, match="no special token that is neither eos nor an end-of-turn"):
        choose_pad_token(tok)


def test_load_tokenizer_normalises_a_model_directory(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    assert tok.pad_token == "<reserved_0>"
    ids = tok("<|im_start|>user\nHallo<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids[-1] == tok.eos_token_id
    with pytest.raises(ModelError, match="cannot load the tokenizer"):
        load_tokenizer(tiny_model_dir / "missing")


@pytest.mark.integration  # the bundled model's tokenizer
def test_token_bytes_rebuild_the_text_even_where_a_token_holds_part_of_a_character(bundled_model):
    from sovllm.models.tokenizer import token_bytes

    tokenizer = load_tokenizer(bundled_model.path)
    text = "Grüße aus Köln: 20 € 🦜 数据 <|im_end|>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    alone = [tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in piece for piece in alone)  # some tokens are parts of a character
    raw = b"".join(bytes(token_bytes(tokenizer, i)) for i in ids)
    assert raw == tokenizer.decode(ids).encode("utf-8") and raw.decode("utf-8") == text
