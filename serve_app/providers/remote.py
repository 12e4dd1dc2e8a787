"""A provider backed by an OpenAI-compatible upstream (OpenRouter, a hosted vLLM, another tuneserve).

One pooled httpx client per provider. The upstream is always asked to stream, with usage, whatever the
client asked: first-byte timeouts then work the same for both, and chunks pass through as they arrive.
"""

from __future__ import annotations

import json
import logging
import os
import time
from email.utils import parsedate_to_datetime
from typing import AsyncIterator

import httpx

from serve_app.config import ProviderConfig
from serve_app.engine_api import ChoiceDelta, EngineRequestError, GenerateChunk, TokenLogprob
from serve_app.providers.base import ProviderError, ProviderRequest

log = logging.getLogger("tuneserve.remote")

_PATHS = {"chat": "/chat/completions", "completions": "/completions"}
# Upstream answers that mean "the client's request is wrong": passed through, never retried elsewhere.
_CLIENT_ERRORS = {400, 413, 422}


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _error_message(raw: bytes) -> str:
    try:
        error = json.loads(raw).get("error")
        if isinstance(error, dict):
            return str(error.get("message") or error)
        return str(error or raw[:300].decode(errors="replace"))
    except (ValueError, AttributeError):
        return raw[:300].decode(errors="replace")


def _chat_logprobs(payload: dict | None) -> list[TokenLogprob] | None:
    if not payload or payload.get("content") is None:
        return None
    return [TokenLogprob(token=e["token"], logprob=e["logprob"],
                         top=[(t["token"], t["logprob"]) for t in e.get("top_logprobs") or []])
            for e in payload["content"]]


def _completion_logprobs(payload: dict | None) -> list[TokenLogprob] | None:
    if not payload or payload.get("tokens") is None:
        return None
    tops = payload.get("top_logprobs") or [None] * len(payload["tokens"])
    return [TokenLogprob(token=token, logprob=logprob, top=list((top or {}).items()))
            for token, logprob, top in zip(payload["tokens"], payload["token_logprobs"], tops)]


def _delta(choice: dict, endpoint: str) -> ChoiceDelta:
    if endpoint == "chat":
        text = (choice.get("delta") or {}).get("content") or ""
        logprobs = _chat_logprobs(choice.get("logprobs"))
    else:
        text = choice.get("text") or ""
        logprobs = _completion_logprobs(choice.get("logprobs"))
    return ChoiceDelta(index=choice.get("index", 0), text=text, num_tokens=0, logprobs=logprobs,
                       finish_reason=choice.get("finish_reason"))


class RemoteProvider:
    def __init__(self, config: ProviderConfig):
        self.name = config.name
        self.config = config
        headers = {}
        if config.api_key_env:
            key = os.environ.get(config.api_key_env)
            if key:
                headers["Authorization"] = f"Bearer {key}"
            else:
                log.warning("provider %s: %s is not set; calling it without a key", config.name, config.api_key_env)
        timeouts = config.timeouts
        self.client = httpx.AsyncClient(
            base_url=config.base_url.rstrip("/"), headers=headers,
            timeout=httpx.Timeout(connect=timeouts.connect_s, read=timeouts.read_s, write=timeouts.read_s,
                                  pool=timeouts.connect_s),
            limits=httpx.Limits(max_connections=config.max_concurrency,
                                max_keepalive_connections=config.max_concurrency),
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    async def stream(self, request: ProviderRequest) -> AsyncIterator[GenerateChunk]:
        body = {**request.body, "model": request.upstream_model, "stream": True,
                "stream_options": {"include_usage": True}}
        deadline = time.monotonic() + self.config.timeouts.total_s
        try:
            async with self.client.stream("POST", _PATHS[request.endpoint], json=body) as response:
                if response.status_code != 200:
                    await self._raise_for_status(response)
                async for chunk in self._events(response, request.endpoint, deadline):
                    yield chunk
        except httpx.ConnectError as exc:
            raise ProviderError(f"{self.name}: cannot connect: {exc}", reason="connect") from None
        except httpx.TimeoutException as exc:
            raise ProviderError(f"{self.name}: timed out ({type(exc).__name__})", reason="timeout") from None
        except httpx.HTTPError as exc:  # dropped connection, protocol errors
            raise ProviderError(f"{self.name}: {type(exc).__name__}: {exc}", reason="disconnect") from None

    async def _raise_for_status(self, response: httpx.Response) -> None:
        raw = await response.aread()
        message = _error_message(raw)
        status = response.status_code
        if status in _CLIENT_ERRORS:
            raise EngineRequestError(message, status_code=400 if status == 422 else status)
        raise ProviderError(f"{self.name}: HTTP {status}: {message}", status=status, reason=str(status),
                            retry_after_s=parse_retry_after(response.headers.get("retry-after")))

    async def _events(self, response: httpx.Response, endpoint: str, deadline: float) -> AsyncIterator[GenerateChunk]:
        prompt_tokens = completion_tokens = None
        async for line in response.aiter_lines():
            if time.monotonic() > deadline:
                raise ProviderError(f"{self.name}: exceeded its total timeout", reason="timeout")
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                yield GenerateChunk(choices=[], prompt_tokens=prompt_tokens or 0, finished=True,
                                    completion_tokens=completion_tokens)
                return
            try:
                event = json.loads(data)
            except ValueError:
                raise ProviderError(f"{self.name}: sent an event that is not JSON", reason="bad_event") from None
            if event.get("error"):
                raise ProviderError(f"{self.name}: {_error_message(data.encode())}", reason="stream_error")
            usage = event.get("usage")
            if usage:
                prompt_tokens = usage.get("prompt_tokens", 0)
                completion_tokens = usage.get("completion_tokens", 0)
            choices = [_delta(choice, endpoint) for choice in event.get("choices") or ()]
            if choices:
                yield GenerateChunk(choices=choices, prompt_tokens=prompt_tokens or 0)
        raise ProviderError(f"{self.name}: the stream ended without [DONE]", reason="disconnect")
