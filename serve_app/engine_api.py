"""The small, engine-neutral interface between the ingress and an engine deployment.

The ingress speaks only these types; the engine (serve_app/engine.py) turns them into vLLM calls.
Chunks are plain dataclasses because they cross a Ray boundary on every streamed step: they must
pickle fast and carry no vLLM types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(slots=True)
class SamplingOptions:
    max_tokens: int | None = None  # None: whatever room the context has left
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: off; k: the sampled token plus the k most likely
    ignore_eos: bool = False  # vLLM extension, used by benchmarks
    min_tokens: int = 0  # vLLM extension


@dataclass(slots=True)
class GenerateRequest:
    request_id: str
    sampling: SamplingOptions
    messages: list[dict[str, Any]] | None = None  # chat: rendered with the model's chat template
    prompt: str | list[int] | None = None  # completions: text or token ids
    echo: bool = False
    model: str | None = None  # the public model id: names a LoRA adapter when it is not the engine's own


@dataclass(slots=True)
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass(slots=True)
class ChoiceDelta:
    index: int
    text: str
    num_tokens: int
    logprobs: list[TokenLogprob] | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None


@dataclass(slots=True)
class GenerateChunk:
    """New output since the previous chunk. Several engine steps may be coalesced into one chunk."""

    choices: list[ChoiceDelta]
    prompt_tokens: int
    finished: bool = False
    # A refused request ends its stream with one chunk carrying the error, rather than raising across
    # Ray: that keeps user errors out of the replica's error log and off the exception-wrapping path.
    error: "EngineRequestError | None" = None
    # Authoritative completion-token total, from providers that only report usage at the end (remote).
    completion_tokens: int | None = None


@dataclass(slots=True)
class ModelInfo:
    id: str
    root: str
    max_model_len: int
    owned_by: str = "tuneserve"


class EngineRequestError(Exception):
    """A request the engine refuses (too long, bad parameters): the ingress maps it to an OpenAI error."""

    def __init__(self, message: str, *, status_code: int = 400, param: str | None = None,
                 code: str | None = None, err_type: str = "invalid_request_error"):
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.param = param
        self.code = code
        self.err_type = err_type

    def __reduce__(self):  # keep the keyword-only fields when Ray pickles the exception
        return (_rebuild_error, (self.message, self.status_code, self.param, self.code, self.err_type))


def _rebuild_error(message, status_code, param, code, err_type) -> EngineRequestError:
    return EngineRequestError(message, status_code=status_code, param=param, code=code, err_type=err_type)
