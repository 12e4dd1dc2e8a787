"""OpenAI wire protocol at the ingress: what we validate, what the local engines accept, the error format.

The ingress validates what OpenAI is strict about (roles, message shapes, types, ranges, tool and schema
consistency) and what it needs to route. It never rebuilds the body: providers get the client's JSON as
sent, minus our routing fields. Unknown top-level fields therefore pass through to remote providers; local
engines take the fields in LOCAL_PARAMETERS and refuse the rest with a 400 naming them.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


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
    first = dict(errors[0])
    # pydantic prefixes the messages of our own validators with "Value error, "
    first["msg"] = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
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


class _Open(BaseModel):
    """OpenAI objects: the fields we check are typed; anything else is kept and passed on."""

    model_config = ConfigDict(extra="allow")


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Open):
    include_usage: bool = False


class ContentPart(_Open):
    type: Literal["text", "image_url", "input_audio", "file", "refusal"]
    text: str | None = None

    @model_validator(mode="after")
    def _text_has_text(self):
        if self.type == "text" and self.text is None:
            raise ValueError("a content part of type 'text' needs 'text'")
        return self


class FunctionCall(_Open):
    name: str = Field(min_length=1)
    arguments: str


class ToolCall(_Open):
    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _shape(self):
        if self.role in ("system", "developer", "user", "tool") and self.content is None:
            raise ValueError(f"a '{self.role}' message needs 'content'")
        if self.role == "assistant" and self.content is None and not self.tool_calls:
            raise ValueError("an 'assistant' message needs 'content' or 'tool_calls'")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only 'assistant' messages carry 'tool_calls'")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a 'tool' message needs 'tool_call_id'")
        return self


_FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"


def check_json_schema(schema: Any, where: str) -> None:
    """A JSON Schema that its own metaschema accepts; anything else is the client's error."""
    import jsonschema

    if not isinstance(schema, dict):
        raise ValueError(f"'{where}' must be a JSON Schema object")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ValueError(f"'{where}' is not a valid JSON Schema: {exc.message}") from None


class FunctionDefinition(_Open):
    name: str = Field(pattern=_FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema(self):
        if self.parameters is not None:
            check_json_schema(self.parameters, f"function {self.name}: parameters")
        return self


class Tool(_Open):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Open):
    name: str


class NamedToolChoice(_Open):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Open):
    name: str = Field(pattern=_FUNCTION_NAME)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema(self):
        if self.schema_ is not None:
            check_json_schema(self.schema_, "response_format.json_schema.schema")
        return self


class ResponseFormat(_Open):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _needs_schema(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("'response_format' of type 'json_schema' needs 'json_schema'")
        return self


class MaxPrice(_Closed):
    prompt: float | None = Field(None, ge=0)  # USD per million tokens
    completion: float | None = Field(None, ge=0)


class ProviderPreferences(_Closed):
    """OpenRouter's per-request `provider` object. Unknown keys are refused, so typos do not pass silently."""

    order: list[str] | None = None
    allow_fallbacks: bool = True
    only: list[str] | None = None
    ignore: list[str] | None = None
    sort: Literal["price", "latency", "throughput"] | None = None
    max_price: MaxPrice | None = None
    require_parameters: bool = False


# Fields that are ours (routing) or the request's substance, not parameters a provider may lack.
ROUTING_FIELDS = frozenset({"model", "models", "provider"})
_STRUCTURAL = frozenset({"model", "models", "provider", "messages", "prompt", "input", "stream"})

_SAMPLING = frozenset({
    "frequency_penalty", "presence_penalty", "logit_bias", "max_tokens", "n", "seed", "stop", "temperature",
    "top_p", "user", "stream_options", "response_format",
    # vLLM's extensions
    "top_k", "min_p", "repetition_penalty", "stop_token_ids", "min_tokens", "ignore_eos",
    "include_stop_str_in_output", "skip_special_tokens", "spaces_between_special_tokens", "bad_words",
    "allowed_token_ids", "prompt_logprobs", "truncate_prompt_tokens", "structured_outputs", "request_id",
})
# What a local engine honours, per endpoint. Anything else a client sends is refused by name (400), never
# dropped: these are fields vLLM both declares and applies. (tests check each against vLLM's own models)
LOCAL_PARAMETERS: dict[str, frozenset[str]] = {
    "chat": _SAMPLING | {"model", "messages", "stream", "max_completion_tokens", "logprobs", "top_logprobs",
                         "tools", "tool_choice", "parallel_tool_calls", "chat_template_kwargs",
                         "add_generation_prompt", "continue_final_message", "echo"},
    "completions": _SAMPLING | {"model", "prompt", "stream", "logprobs", "echo", "suffix"},
    "embeddings": frozenset({"model", "input", "encoding_format", "dimensions", "user", "truncate_prompt_tokens",
                             "request_id"}),
    "responses": frozenset({"model", "input", "instructions", "max_output_tokens", "stream", "tools", "tool_choice",
                            "parallel_tool_calls", "text", "temperature", "top_p", "top_k", "seed", "stop",
                            "repetition_penalty", "frequency_penalty", "presence_penalty", "logit_bias",
                            "store", "user", "request_id", "truncation"}),
}


class _Body(_Open):
    """What every generating endpoint shares: the model, fallbacks and provider preferences."""

    model: str = Field(min_length=1)
    models: list[str] | None = Field(None, min_length=1, max_length=8)  # model-level fallback, in order
    provider: ProviderPreferences | None = None
    stream: bool = False
    user: str | None = Field(None, max_length=256)

    def requested_models(self) -> list[str]:
        return list(dict.fromkeys([self.model, *(self.models or [])]))


def parameters_sent(raw: dict) -> set[str]:
    """The parameters a client actually sent (for provider.require_parameters)."""
    return set(raw) - _STRUCTURAL


def _stop_list(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else (stop or [])
    if len(stops) > 16:
        raise ValueError("'stop' takes at most 16 sequences")
    if any(s == "" for s in stops):
        raise ValueError("'stop' sequences must not be empty")
    return stops


class _Sampling(_Body):
    """Chat and text completions: OpenAI's ranges, and vLLM's sampling extensions with theirs."""

    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=2)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check_sampling(self):
        _stop_list(self.stop)
        if self.stream_options is not None and not self.stream:
            raise ValueError("'stream_options' is only allowed when 'stream' is true")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError("'min_tokens' must not exceed 'max_tokens'")
        return self

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, bias: dict[str, float] | None):
        for token, value in (bias or {}).items():
            if not token.isdigit():
                raise ValueError(f"keys are token ids; got {token!r}")
            if not -100 <= value <= 100:
                raise ValueError(f"values lie in [-100, 100]; got {value} for token {token}")
        return bias

    def include_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _check_chat(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("'top_logprobs' requires 'logprobs' to be true")
        names = [tool.function.name for tool in self.tools or ()]
        if len(set(names)) != len(names):
            raise ValueError("'tools' has two functions with the same name")
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            raise ValueError("'tool_choice' is only allowed when 'tools' are specified")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ValueError(f"'tool_choice' names the function '{self.tool_choice.function.name}', "
                             f"which is not in 'tools' ({', '.join(names)})")
        self._check_conversation()
        return self

    def _check_conversation(self) -> None:
        """Tool results answer an earlier assistant tool call; nothing else may follow them out of turn."""
        open_calls: set[str] = set()
        for number, message in enumerate(self.messages):
            if message.role == "assistant":
                open_calls = {call.id for call in message.tool_calls or ()}
            elif message.role == "tool":
                if message.tool_call_id not in open_calls:
                    raise ValueError(f"messages[{number}]: a 'tool' message must answer a tool call of the "
                                     f"assistant message before it (no call has id '{message.tool_call_id}')")
                open_calls.discard(message.tool_call_id)
            else:
                open_calls = set()


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(min_length=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions

    @model_validator(mode="after")
    def _check_prompt(self):
        if isinstance(self.prompt, list) and len(self.prompt) > 64:
            raise ValueError("'prompt' takes at most 64 prompts per request")
        return self


class EmbeddingRequest(_Body):
    input: str | list[str] | list[int] | list[list[int]] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _check_input(self):
        if isinstance(self.input, list) and len(self.input) > 2048:
            raise ValueError("'input' takes at most 2048 items per request")
        if self.input == "" or (isinstance(self.input, list) and any(item in ("", []) for item in self.input)):
            raise ValueError("'input' must not contain empty strings or token lists")
        if self.stream:
            raise ValueError("embeddings are not streamed")
        return self


class ResponseText(_Open):
    format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check_format(self):
        fmt = self.format
        if fmt is None:
            return self
        if fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise ValueError("'text.format.type' must be 'text', 'json_object' or 'json_schema'")
        if fmt["type"] == "json_schema":
            if not fmt.get("name"):
                raise ValueError("'text.format' of type 'json_schema' needs 'name'")
            check_json_schema(fmt.get("schema"), "text.format.schema")
        return self


class ResponsesRequest(_Body):
    """The Responses API, stateless: no stored responses to continue from."""

    input: str | list[dict[str, Any]] = Field(min_length=1)
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    tools: list[dict[str, Any]] | None = None
    text: ResponseText | None = None
    store: bool | None = None
    previous_response_id: str | None = None

    @field_validator("store")
    @classmethod
    def _not_stored(cls, store: bool | None):
        if store:
            raise ValueError("must be false: this server is stateless and keeps no responses")
        return store

    @field_validator("previous_response_id")
    @classmethod
    def _no_previous(cls, previous: str | None):
        if previous is not None:
            raise ValueError("not supported: this server keeps no responses; send the conversation in 'input'")
        return previous


REQUEST_MODELS = {"chat": ChatCompletionRequest, "completions": CompletionRequest,
                  "embeddings": EmbeddingRequest, "responses": ResponsesRequest}


def now() -> int:
    return int(time.time())
