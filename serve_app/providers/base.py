"""The one contract every provider meets, local or remote: an OpenAI request body in, OpenAI response
objects or SSE chunks out, as the client will get them.

Pieces cross a Ray boundary on every streamed step (local engines), so they are plain dataclasses that
pickle fast and carry no vLLM types.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import AsyncIterator, Literal, Protocol

Endpoint = Literal["chat", "completions", "embeddings", "responses"]
# Where each endpoint lives under an OpenAI-compatible base URL.
PATHS: dict[str, str] = {"chat": "/chat/completions", "completions": "/completions",
                         "embeddings": "/embeddings", "responses": "/responses"}


@dataclass(slots=True)
class ProviderCall:
    endpoint: Endpoint
    # The client's body as it was sent, less our routing fields, with `model` set to the provider's
    # name for it. A streamed chat or text completion always asks for usage (`stream_options.include_usage`).
    body: dict
    request_id: str
    model: str  # the model id the client sees in responses
    client_wants_usage: bool  # whether the client itself asked for the usage chunk of a stream
    session_id: str = ""  # the client's X-Session-Id: local engines keep a session to one replica


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @classmethod
    def read(cls, usage) -> "Usage | None":
        """An OpenAI usage object (chat/completions/embeddings, or the Responses API's input/output
        tokens); None when it is missing or malformed."""
        if not isinstance(usage, dict):
            return None
        prompt = usage.get("prompt_tokens", usage.get("input_tokens")) or 0
        completion = usage.get("completion_tokens", usage.get("output_tokens")) or 0
        if not isinstance(prompt, int) or not isinstance(completion, int):
            return None
        return cls(prompt, completion)


@dataclass(slots=True)
class Piece:
    """Part of one response. A non-streamed request gets exactly one piece, with `body`."""

    sse: str = ""  # SSE frames, ready for the client
    body: dict | None = None  # the whole response of a non-streamed request
    frames: int = 0  # how many output frames `sse` holds (the token estimate when a stream is cut short)
    usage: Usage | None = None  # set on the piece where the provider reported it
    # The chunk that carried usage (chat/completions streams). It is held back from `sse` so that the
    # ingress can add cost, or drop it when the client did not ask for usage.
    usage_event: dict | None = None
    # A stream that broke after it began ends with an error frame in `sse`; this says so to the ingress.
    failed: str | None = None
    # A refused request (bad parameters, too long, unknown adapter): its one piece carries the status and
    # the OpenAI error object, rather than raising across Ray, which would log it as a replica error.
    status: int = 200
    error: dict | None = None


class EngineRequestError(Exception):
    """The request is wrong (4xx): no other provider would do better. Rendered as the OpenAI error."""

    def __init__(self, message: str, *, status_code: int = 400, param: str | None = None,
                 code: str | None = None, err_type: str = "invalid_request_error"):
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.param = param
        self.code = code
        self.err_type = err_type


# A ProviderError reason that says nothing about the provider's health (it is busy, not broken): it does not
# count towards the circuit breaker.
OVERLOADED = "overloaded"


class ProviderError(Exception):
    """The provider failed (connect error, timeout, 429, 5xx, a malformed answer, engine gone).

    Before the first byte reached the client this means: retry or fall back. `retry_after_s` carries a 429's
    Retry-After. Client errors are not ProviderErrors: they raise EngineRequestError and pass through.
    """

    def __init__(self, message: str, *, status: int | None = None, retry_after_s: float | None = None,
                 reason: str = "error"):
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s
        self.reason = reason  # short tag for the attempts header: "429", "500", "timeout", "connect", ...


def sse(payload: dict, event: str | None = None) -> str:
    """One SSE frame of compact JSON (with an `event:` line for the Responses API's named events)."""
    data = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return f"event: {event}\ndata: {data}\n\n" if event else f"data: {data}\n\n"


def error_from_status(status: int, error: dict, provider: str) -> Exception:
    """An upstream's or engine's error object, as the exception the ingress acts on."""
    message = str(error.get("message") or error)
    if status in (400, 404, 413, 422):
        return EngineRequestError(message, status_code=400 if status == 422 else status, param=error.get("param"),
                                  code=error.get("code") if isinstance(error.get("code"), str) else None)
    return ProviderError(f"{provider}: HTTP {status}: {message}", status=status, reason=str(status))


class Provider(Protocol):
    name: str

    def stream(self, call: ProviderCall) -> AsyncIterator[Piece]: ...

    async def aclose(self) -> None: ...
