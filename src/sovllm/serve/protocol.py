"""Wire models of the OpenAI-compatible API (requests), following OpenAI's and vLLM's field names.

Unknown fields are ignored, as vLLM does, except those whose meaning sovllm cannot honour
(tools, logit_bias, penalties, best_of, echo, suffix, stream_options without stream): those are
refused with a 400 that names the field, instead of being silently dropped.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class APIError(Exception):
    """An error with an HTTP status and an OpenAI error type; rendered as OpenAI-style JSON."""

    def __init__(self, message: str, status: int = 400, type: str = "BadRequestError", param: str | None = None,
                 headers: dict[str, str] | None = None, code: str | int | None = None):
        super().__init__(message)
        self.message, self.status, self.type, self.param = message, status, type, param
        self.headers = headers or {}
        self.code = code if code is not None else status

    def body(self) -> dict:
        # a message may quote client input: never let it break the UTF-8 response
        message = self.message.encode("utf-8", "backslashreplace").decode("utf-8")
        return {"error": {"message": message, "type": self.type, "param": self.param, "code": self.code}}


LONG_MIN, LONG_MAX = -(2**63), 2**63 - 1  # vLLM's range for `seed` (a torch long)
MAX_STOP_TOKEN_IDS = 64


def _has_surrogate(text: str) -> bool:
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def reject_surrogates(value: Any) -> None:
    """Raise ValueError if any string in a decoded JSON value holds a lone UTF-16 surrogate.

    JSON allows `"\\ud800"`, but such a string is not Unicode text: the tokenizer, the chat template
    and the UTF-8 response writer all fail on it. It is refused at the door, without echoing it.
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _has_surrogate(item):
                raise ValueError("the request holds a lone UTF-16 surrogate (e.g. \\ud800) in a string; "
                                 "send valid Unicode text")
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Body(_Wire):
    """A whole request body: checked for lone surrogates before any field is parsed."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data):
        reject_surrogates(data)
        return data


class StreamOptions(_Wire):
    include_usage: bool = False


class JSONSchemaFormat(_Wire):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Wire):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError("response_format.type 'json_schema' needs response_format.json_schema.schema")
        return self


class _Sampling(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=4)
    seed: int | None = Field(None, ge=LONG_MIN, le=LONG_MAX)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM extensions
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    # refused when set to anything that changes the output
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    best_of: int | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        if isinstance(value, str):
            value = [value]
        if value is not None and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    def refuse_unsupported(self) -> None:
        if self.stream_options is not None and not self.stream:  # as vLLM; silently ignoring it hides a mistake
            raise APIError("Stream options can only be defined when `stream=True`.", param="stream_options")
        if self.frequency_penalty or self.presence_penalty:
            raise APIError("frequency_penalty and presence_penalty are not supported by this server",
                           param="frequency_penalty")
        if self.logit_bias:
            raise APIError("logit_bias is not supported by this server", param="logit_bias")
        if self.best_of not in (None, 1, self.n):
            raise APIError("best_of is not supported by this server", param="best_of")


class ChatMessage(_Wire):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise APIError(f"message content of type {part.get('type')!r} is not supported (text only)",
                               param="messages")
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=5)
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    add_generation_prompt: bool = True

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.tools:
            raise APIError("tools / function calling is not supported by this server", param="tools")
        if self.top_logprobs and not self.logprobs:
            raise APIError("top_logprobs needs logprobs: true", param="top_logprobs")


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise APIError("echo is not supported by this server", param="echo")
        if self.suffix:
            raise APIError("suffix is not supported by this server", param="suffix")


class LoadLoRARequest(_Body):
    lora_name: str
    lora_path: str


class UnloadLoRARequest(_Body):
    lora_name: str
    lora_int_id: int | None = None
