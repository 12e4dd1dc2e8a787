"""A provider backed by an OpenAI-compatible upstream (OpenRouter, a hosted vLLM, another tuneserve).

One pooled httpx client per provider. The body goes upstream as the client sent it (only `model` is the
upstream's name for it), and the upstream's JSON or SSE events come back as they were, with only `model`
set back to the id the client asked for. We read what we need from them: usage, errors and the end.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from email.utils import parsedate_to_datetime
from typing import AsyncIterator

import httpx

from serve_app.config import ProviderConfig
from serve_app.providers.base import PATHS, EngineRequestError, Piece, ProviderCall, ProviderError, Usage, sse

log = logging.getLogger("tuneserve.remote")

# Upstream answers that mean "the client's request is wrong": passed through, never retried elsewhere.
_CLIENT_ERRORS = {400, 413, 422}
# After a stream's last event, how long we read on to the end of the response. A response left unread
# makes httpx close its connection instead of pooling it: a new TCP (and TLS) handshake per request.
DRAIN_AFTER_END_S = 1.0


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

    async def stream(self, call: ProviderCall) -> AsyncIterator[Piece]:
        timeouts = self.config.timeouts
        streamed = bool(call.body.get("stream"))
        # A non-streamed answer arrives whole: its read timeout is the total one.
        timeout = None if streamed else httpx.Timeout(connect=timeouts.connect_s, read=timeouts.total_s,
                                                        write=timeouts.read_s, pool=timeouts.connect_s)
        deadline = time.monotonic() + timeouts.total_s
        try:
            async with self.client.stream("POST", PATHS[call.endpoint], json=call.body,
                                          **({"timeout": timeout} if timeout else {})) as response:
                if response.status_code != 200:
                    await self._raise_for_status(response)
                if streamed:
                    async for piece in self._events(response, call, deadline):
                        yield piece
                else:
                    yield self._whole(await response.aread(), call)
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

    def _whole(self, raw: bytes, call: ProviderCall) -> Piece:
        try:
            payload = json.loads(raw)
        except ValueError:
            raise ProviderError(f"{self.name}: answered with a body that is not JSON", reason="bad_body") from None
        if not isinstance(payload, dict) or payload.get("error"):
            raise ProviderError(f"{self.name}: answered 200 without a response: {raw[:200]!r}", reason="bad_body")
        if call.endpoint in ("chat", "completions") and not _valid_choices(payload.get("choices")):
            raise ProviderError(f"{self.name}: answered with malformed choices", reason="bad_body")
        payload["model"] = call.model
        return Piece(body=payload, usage=Usage.read(payload.get("usage")))

    async def _events(self, response: httpx.Response, call: ProviderCall, deadline: float) -> AsyncIterator[Piece]:
        """Relay the upstream's SSE events, rewritten only in `model`; the usage chunk is held apart."""
        event_name = None
        lines = response.aiter_lines()
        async for line in lines:
            if time.monotonic() > deadline:
                raise ProviderError(f"{self.name}: exceeded its total timeout", reason="timeout")
            if line.startswith("event:"):
                event_name = line[6:].strip()
                continue
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                await _drain(lines)
                return
            try:
                event = json.loads(data)
            except ValueError:
                raise ProviderError(f"{self.name}: sent an event that is not JSON", reason="bad_event") from None
            if not isinstance(event, dict):
                raise ProviderError(f"{self.name}: sent an event that is not an object", reason="bad_event")
            if event.get("error"):
                raise ProviderError(f"{self.name}: {_error_message(data.encode())}", reason="stream_error")
            piece = self._piece(event, event_name, call)
            event_name = None
            if piece is not None:
                yield piece
            if call.endpoint == "responses" and piece is not None and piece.usage is not None:
                await _drain(lines)
                return  # response.completed: the Responses API has no [DONE]
        if call.endpoint != "responses":
            raise ProviderError(f"{self.name}: the stream ended without [DONE]", reason="disconnect")

    def _piece(self, event: dict, event_name: str | None, call: ProviderCall) -> Piece | None:
        if call.endpoint == "responses":
            response = event.get("response")
            if isinstance(response, dict) and "model" in response:
                response["model"] = call.model
            usage = None
            if event.get("type") in ("response.completed", "response.incomplete", "response.failed"):
                usage = Usage.read((response or {}).get("usage")) or Usage()
            name = event_name or event.get("type") or "message"
            return Piece(sse=sse(event, name), frames=1, usage=usage)
        if "model" in event:
            event["model"] = call.model
        choices = event.get("choices")
        if not _valid_choices(choices, delta=True):
            raise ProviderError(f"{self.name}: sent a chunk with malformed choices", reason="bad_event")
        usage = Usage.read(event.get("usage"))
        if not choices:
            if usage is None:
                return None  # a keep-alive or metadata chunk with nothing for the client
            return Piece(usage=usage, usage_event=event)
        if usage is not None and not call.client_wants_usage:
            event.pop("usage")  # continuous usage the client did not ask for
        return Piece(sse=sse(event), frames=1, usage=usage)


async def _drain(lines: AsyncIterator[str]) -> None:
    """Read what follows a stream's last event (normally nothing but the chunked terminator), so that the
    connection goes back to the pool; an upstream that keeps the stream open after its end is cut."""
    try:
        async with asyncio.timeout(DRAIN_AFTER_END_S):
            async for _ in lines:
                pass
    except TimeoutError:
        log.debug("upstream kept its stream open after the last event; closing the connection")


def _valid_choices(choices, delta: bool = False) -> bool:
    if choices is None:
        return delta  # a stream's usage or metadata chunk may have none
    if not isinstance(choices, list):
        return False
    return all(isinstance(choice, dict) for choice in choices)
