"""What every provider takes and raises. A provider streams GenerateChunks (engine_api) for one attempt."""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Literal, Protocol

from serve_app.engine_api import GenerateChunk, GenerateRequest


@dataclass(slots=True)
class ProviderRequest:
    endpoint: Literal["chat", "completions"]
    generate: GenerateRequest  # engine-neutral form, for local engines
    body: dict  # the client's OpenAI body without routing fields, for OpenAI-compatible upstreams
    upstream_model: str


class ProviderError(Exception):
    """The provider failed (connect error, timeout, 429, 5xx, bad gateway answer, engine gone).

    Before the first byte reached the client this means: retry or fall back. `retry_after_s` carries a 429's
    Retry-After. Client errors (400) are not ProviderErrors: they raise EngineRequestError and pass through.
    """

    def __init__(self, message: str, *, status: int | None = None, retry_after_s: float | None = None,
                 reason: str = "error"):
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s
        self.reason = reason  # short tag for the attempts header: "429", "500", "timeout", "connect", ...


class Provider(Protocol):
    name: str

    def stream(self, request: ProviderRequest) -> AsyncIterator[GenerateChunk]: ...

    async def aclose(self) -> None: ...
