"""OpenAI wire protocol: request models with their validation, and the error format.

Responses are built as plain dicts in serving.py: they are written once per token on hot paths, where
pydantic models would only add cost.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from serve_app.engine_api import SamplingOptions

# -- errors -------------------------------------------------------------------------------------------

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "server_error",
    504: "server_error",
}


class APIError(Exception):
    """Raised anywhere in request handling; rendered as OpenAI's error JSON with this status."""

    def __init__(self, status_code: int, message: str, *, param: str | None = None,
                 code: str | None = None, err_type: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code
        self.err_type = err_type or _ERROR_TYPES.get(status_code, "invalid_request_error")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.err_type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)


_UNION_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def format_validation_error(errors: list[dict[str, Any]]) -> APIError:
    """Turn pydantic/FastAPI validation errors into one readable 400 that names the offending field."""
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body",)]
    # pydantic puts the union member's type name in the location; it means nothing to the client
    loc = [part for part in loc if part not in _UNION_TAGS and not part.startswith(("function-", "list[", "constrained-"))]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return APIError(400, f"Request body is not valid JSON: {first.get('msg', '')}", code="invalid_json")
    if first.get("type") == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    message = first.get("msg", "invalid value")
    if param:
        message = f"Invalid value for '{param}': {message}"
    more = len(errors) - 1
    if more > 0:
        message += f" (and {more} more error{'s' if more > 1 else ''})"
    return APIError(400, message, param=param, code="invalid_value")


# -- requests -----------------------------------------------------------------------------------------


class _Request(BaseModel):
    # Unknown fields are ignored, as vLLM's server does: clients and SDKs send extras freely.
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def plain(self) -> dict[str, str]:
        """The message as chat templates expect it: text content, `developer` treated as `system`."""
        if isinstance(self.content, list):
            text = "".join(part.text for part in self.content)
        else:
            text = self.content or ""
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": text}


class MaxPrice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: float | None = Field(None, ge=0)  # USD per million tokens
    completion: float | None = Field(None, ge=0)


class ProviderPreferences(BaseModel):
    """OpenRouter's per-request `provider` object. Unknown keys are refused, so typos do not pass silently."""

    model_config = ConfigDict(extra="forbid")
    order: list[str] | None = None
    allow_fallbacks: bool = True
    only: list[str] | None = None
    ignore: list[str] | None = None
    sort: Literal["price", "latency", "throughput"] | None = None
    max_price: MaxPrice | None = None
    require_parameters: bool = False


# Parameters a provider may or may not honour (provider.require_parameters checks them).
ROUTABLE_PARAMETERS = ("max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop", "seed",
                       "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs", "user",
                       "ignore_eos", "min_tokens", "stream_options")


class _SamplingFields(_Request):
    """Parameters shared by /v1/chat/completions and /v1/completions, with OpenAI's ranges."""

    model: str = Field(min_length=1)
    models: list[str] | None = Field(None, min_length=1, max_length=8)  # model-level fallback, in order
    provider: ProviderPreferences | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    # vLLM extensions, honoured so that benchmarks can pin output lengths.
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check_stop(self):
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 16:
            raise ValueError("'stop' takes at most 16 sequences")
        if any(s == "" for s in stops):
            raise ValueError("'stop' sequences must not be empty")
        if self.stream_options is not None and not self.stream:
            raise ValueError("'stream_options' is only allowed when 'stream' is true")
        return self

    def requested_models(self) -> list[str]:
        return list(dict.fromkeys([self.model, *(self.models or [])]))

    def parameters_sent(self) -> set[str]:
        return {name for name in ROUTABLE_PARAMETERS if name in self.model_fields_set}

    def upstream_body(self) -> dict:
        """The body as an OpenAI-compatible upstream takes it: our routing fields removed."""
        return self.model_dump(exclude_unset=True, exclude={"model", "models", "provider"})

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _sampling(self, max_tokens: int | None, logprobs: int | None) -> SamplingOptions:
        return SamplingOptions(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            n=self.n,
            stop=self.stop_list(),
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logprobs=logprobs,
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
        )


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _check_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("'top_logprobs' requires 'logprobs' to be true")
        return self

    def sampling_options(self) -> SamplingOptions:
        limit = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self._sampling(limit, (self.top_logprobs or 0) if self.logprobs else None)


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] = Field(min_length=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions

    @model_validator(mode="after")
    def _check_prompt(self):
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            if len(self.prompt) != 1:
                raise ValueError("batched prompts are not supported: send one prompt per request")
            self.prompt = self.prompt[0]
        if self.echo:
            raise ValueError("'echo' is not supported")
        if self.suffix:
            raise ValueError("'suffix' is not supported")
        return self

    def sampling_options(self) -> SamplingOptions:
        return self._sampling(self.max_tokens, self.logprobs)


def now() -> int:
    return int(time.time())
