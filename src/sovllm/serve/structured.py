"""Structured output by constrained decoding (xgrammar): JSON objects and JSON-schema outputs.

Grammars are compiled once per schema (LRU cache) against the served tokenizer. Compact
whitespace: no newlines or indentation, `", "` and `": "` separators. `maxLength`, `minLength`,
`minItems`, `maxItems`, enums, required properties and `additionalProperties: false` are
enforced by the grammar itself, so any output that ends with a stop token parses and validates.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict

from sovllm.serve.protocol import APIError, ResponseFormat

_ANY_OBJECT = {"type": "object"}
# bounds on what is compiled: an 800-deep array schema took 25 s; a schema nested 64 levels
# (JSON depth, counting the schema's own objects) compiles in well under a second here
MAX_SCHEMA_DEPTH = 64
MAX_SCHEMA_BYTES = 64 * 1024
# compile time also grows with the square of an object's optional properties (1,500 took 16 s with a
# 400-token vocabulary) and of enum strings that share a prefix (two of 10,000 characters took 16 s)
MAX_PROPERTIES = 512
MAX_ENUM_STRING = 2048
# xgrammar (0.2.x) writes strings with minLength/maxLength with this character class, which lets
# raw control characters through, and JSON forbids them; its unbounded strings exclude them.
_LENGTH_BOUNDED_CHAR = r'[^\"\\\r\n]'
_JSON_STRING_CHAR = r'[^\u0000-\u001f\"\\\r\n]'
# xgrammar prints code points below 256 as \xHH but reads \x greedily (\xfcbe is one character),
# so before the printed grammar is parsed again they become the unambiguous \u00HH.
_HEX_ESCAPE = re.compile(r"(?<!\\)((?:\\\\)*)\\x([0-9a-fA-F]{2})")


def json_schema_ebnf(schema: str) -> str:
    """The grammar (EBNF) of compact JSON valid under `schema`, with JSON's string rules enforced."""
    import xgrammar as xgr

    ebnf = str(xgr.Grammar.from_json_schema(schema, any_whitespace=False))
    ebnf = _HEX_ESCAPE.sub(lambda m: f"{m.group(1)}\\u00{m.group(2)}", ebnf)
    return ebnf.replace(_LENGTH_BOUNDED_CHAR, _JSON_STRING_CHAR)


class GrammarCache:
    """Compiles and caches grammars for `response_format` values."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int], capacity: int = 64):
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._stop_ids = sorted(stop_token_ids)
        self._compiler = None
        self._cache: OrderedDict[str, object] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()  # guards the cache, never held while compiling
        self._compiling: dict[str, threading.Lock] = {}

    def _get_compiler(self):
        if self._compiler is None:
            import xgrammar as xgr

            info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self._vocab_size,
                                                      stop_token_ids=self._stop_ids)
            self._compiler = xgr.GrammarCompiler(info)
        return self._compiler

    def for_format(self, response_format: ResponseFormat | None):
        """The compiled grammar for a request's response_format, or None for free text.

        Schemas nested deeper than `MAX_SCHEMA_DEPTH` or longer than `MAX_SCHEMA_BYTES` are refused
        (compile time grows steeply with nesting). Different schemas compile concurrently; requests
        for the same schema wait for one compilation.
        """
        if response_format is None or response_format.type == "text":
            return None
        schema = _ANY_OBJECT if response_format.type == "json_object" else response_format.json_schema.schema_
        key = json.dumps(schema, sort_keys=True)
        if len(key) > MAX_SCHEMA_BYTES:
            raise APIError(f"response_format: the JSON schema has {len(key):,} bytes; at most {MAX_SCHEMA_BYTES:,} "
                           "are compiled", param="response_format")
        depth = _depth(schema)
        if depth > MAX_SCHEMA_DEPTH:
            raise APIError(f"response_format: the JSON schema is nested {depth} levels deep; at most "
                           f"{MAX_SCHEMA_DEPTH} are compiled", param="response_format")
        problem = _too_costly(schema)
        if problem:
            raise APIError(f"response_format: the JSON schema {problem}", param="response_format")
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            compiler = self._get_compiler()
            pending = self._compiling.setdefault(key, threading.Lock())
        with pending:  # one compilation per schema; other schemas are not held up
            with self._lock:
                if key in self._cache:
                    return self._cache[key]
            try:
                # compile in the caller's property order: it is the order the model writes them in
                grammar = compiler.compile_grammar(json_schema_ebnf(json.dumps(schema)))
            except Exception as exc:  # noqa: BLE001 - xgrammar reports schema problems as RuntimeError etc.
                raise APIError(f"response_format: the JSON schema cannot be used for constrained decoding: {exc}",
                               param="response_format") from None
            finally:
                with self._lock:
                    self._compiling.pop(key, None)
            with self._lock:
                self._cache[key] = grammar
                if len(self._cache) > self._capacity:
                    self._cache.popitem(last=False)
            return grammar


def _depth(value) -> int:
    """Nesting depth of a JSON value (objects and arrays), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            deepest = max(deepest, level)
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            deepest = max(deepest, level)
            stack.extend((v, level + 1) for v in item)
    return deepest


def _too_costly(schema) -> str | None:
    """Why compiling `schema` would take too long (too many properties in one object, an overlong enum
    string), or None."""
    stack = [schema]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            properties = item.get("properties")
            if isinstance(properties, dict) and len(properties) > MAX_PROPERTIES:
                return (f"has an object with {len(properties):,} properties; at most {MAX_PROPERTIES} per object "
                        "are compiled (nest them)")
            enum = item.get("enum")
            if isinstance(enum, list):
                longest = max((len(v) for v in enum if isinstance(v, str)), default=0)
                if longest > MAX_ENUM_STRING:
                    return (f"has an enum string of {longest:,} characters; at most {MAX_ENUM_STRING:,} are "
                            "compiled")
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None
