"""The OpenAI API's request bodies, response shapes and errors, as the server speaks them.

Request models accept unknown fields (clients send more than a small server uses) and check only
types, strictly where OpenAI is strict: `"stream": "yes"` or `"max_tokens": "10"` is refused, not
coerced (an integer is accepted for a number, as JSON does). Value checks (ranges, roles, the model's context) happen in `app.py`, where they turn into
400 errors naming the field. `ApiError` carries an HTTP status and OpenAI's error body:
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, StrictBool, StrictInt

# A number field takes a JSON integer or a float, never a string ("0.5"); `Strict` on float still
# takes an int, as OpenAI does.
Number = Annotated[float, Strict()]

REASONS = ("inaccurate", "not_in_documents", "too_long", "unhelpful")


class ApiError(Exception):
    """An error answered in OpenAI's shape with `status`."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 501: "server_error",
             411: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
             500: "server_error", 502: "server_error", 503: "service_unavailable", 504: "timeout_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ContentPart(_Open):
    type: str
    text: str | None = None


class Message(_Open):
    role: str
    content: str | list[ContentPart] | None = None


class StreamOptions(_Open):
    include_usage: StrictBool = False


class _Sampling(_Open):
    model: str | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    max_tokens: StrictInt | None = None
    stop: str | list[str] | None = None
    seed: StrictInt | None = None
    frequency_penalty: Number | None = None
    presence_penalty: Number | None = None
    # not OpenAI's (vLLM and llama.cpp's servers take it too): HF's repetition penalty, 1 = off
    repetition_penalty: Number | None = None
    n: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None


class ChatRequest(_Sampling):
    messages: list[Message]
    max_completion_tokens: StrictInt | None = None
    # chatforge's own: the conversation this turn continues (returned by an earlier response)
    conversation_id: str | None = Field(default=None, max_length=128)


class CompletionRequest(_Sampling):
    prompt: str | list[StrictInt] | list[str]      # text, or the token ids of one prompt
    echo: StrictBool | None = None
    logprobs: StrictInt | None = None
    suffix: str | None = None


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    message_id: str = Field(max_length=128)
    rating: Literal["up", "down"]
    reason: Literal["inaccurate", "not_in_documents", "too_long", "unhelpful"] | None = None
    comment: str | None = Field(default=None, max_length=8000)
    correction: str | None = Field(default=None, max_length=8000)
    # chatforge's own: the id an earlier POST returned for this reply; that vote is updated
    # (the page saves the thumb at once, then completes it with the form's fields)
    feedback_id: int | None = Field(default=None, ge=1, le=2 ** 63 - 1)   # an SQLite row id


class FeedbackResponse(BaseModel):
    id: int
    status: Literal["stored"] = "stored"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish_reason: str | None = None,
               **extra: Any) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}], **extra}


def completion_chunk(rid: str, model: str, created: int, text: str, finish_reason: str | None = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}


def model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "chatforge"}


def now() -> int:
    return int(time.time())


def lone_surrogate(value: Any, where: str = "") -> str | None:
    """The path (`messages[0].content`) of the first string in `value` that holds a lone UTF-16
    surrogate ("\\ud800" in JSON), or None. Such text cannot be encoded as UTF-8, so neither
    the tokenizer nor the feedback database can take it: it is the client's error, not a crash."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where or "body"
        return None
    if isinstance(value, dict):
        items = [(f"{where}.{k}" if where else str(k), v) for k, v in value.items()]
    elif isinstance(value, (list, tuple)):
        items = [(f"{where}[{i}]", v) for i, v in enumerate(value)]
    else:
        return None
    for path, item in items:
        # A key is text too (an unknown field's name is stored with the message).
        found = lone_surrogate(path.rpartition(".")[2], where or "body") or lone_surrogate(item, path)
        if found:
            return found
    return None
