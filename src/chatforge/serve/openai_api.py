"""The OpenAI API's request bodies, response shapes and errors, as the server speaks them.

Request models accept unknown fields (clients send more than a small server uses) and check only
types; value checks (ranges, roles, the model's context) happen in `app.py`, where they turn into
400 errors naming the field. `ApiError` carries an HTTP status and OpenAI's error body:
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

REASONS = ("inaccurate", "not_in_documents", "too_long", "unhelpful")


class ApiError(Exception):
    """An error answered in OpenAI's shape with `status`."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 501: "server_error",
             411: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
             500: "server_error", 503: "service_unavailable"}

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
    include_usage: bool = False


class _Sampling(_Open):
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    # not OpenAI's (vLLM and llama.cpp's servers take it too): HF's repetition penalty, 1 = off
    repetition_penalty: float | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None


class ChatRequest(_Sampling):
    messages: list[Message]
    max_completion_tokens: int | None = None
    # chatforge's own: the conversation this turn continues (returned by an earlier response)
    conversation_id: str | None = Field(default=None, max_length=128)


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool | None = None
    logprobs: int | None = None
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
    feedback_id: int | None = Field(default=None, ge=1)


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
