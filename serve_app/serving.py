"""OpenAI chat and text completions on top of providers: request → engine stream → JSON or SSE."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import defaultdict
from typing import AsyncIterator, Protocol

from fastapi.responses import JSONResponse, StreamingResponse

from serve_app.engine_api import ChoiceDelta, EngineRequestError, GenerateChunk, GenerateRequest, TokenLogprob
from serve_app.metrics import ServingMetrics
from serve_app.protocol import APIError, ChatCompletionRequest, CompletionRequest, _SamplingFields, now

log = logging.getLogger("tuneserve.serving")


class Provider(Protocol):
    def stream(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]: ...


# -- rendering: the two endpoints differ only in the shape of a choice ------------------------------


def _token_bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="replace"))


class ChatRenderer:
    chunk_object = "chat.completion.chunk"
    final_object = "chat.completion"
    id_prefix = "chatcmpl"

    def delta_choice(self, delta: ChoiceDelta, first: bool, state: dict) -> dict:
        message = {"role": "assistant", "content": delta.text} if first else {"content": delta.text}
        return {"index": delta.index, "delta": message, "logprobs": self.logprobs(delta.logprobs, state),
                "finish_reason": delta.finish_reason}

    def final_choice(self, index: int, text: str, logprobs: list[TokenLogprob] | None, finish: str | None,
                     state: dict) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": text},
                "logprobs": self.logprobs(logprobs, state), "finish_reason": finish}

    @staticmethod
    def logprobs(entries: list[TokenLogprob] | None, state: dict) -> dict | None:
        if entries is None:
            return None
        return {"content": [
            {"token": e.token, "logprob": e.logprob, "bytes": _token_bytes(e.token),
             "top_logprobs": [{"token": t, "logprob": lp, "bytes": _token_bytes(t)} for t, lp in e.top]}
            for e in entries]}


class CompletionRenderer:
    chunk_object = "text_completion"
    final_object = "text_completion"
    id_prefix = "cmpl"

    def delta_choice(self, delta: ChoiceDelta, first: bool, state: dict) -> dict:
        return {"index": delta.index, "text": delta.text, "logprobs": self.logprobs(delta.logprobs, state),
                "finish_reason": delta.finish_reason}

    def final_choice(self, index: int, text: str, logprobs: list[TokenLogprob] | None, finish: str | None,
                     state: dict) -> dict:
        return {"index": index, "text": text, "logprobs": self.logprobs(logprobs, state), "finish_reason": finish}

    @staticmethod
    def logprobs(entries: list[TokenLogprob] | None, state: dict) -> dict | None:
        """Legacy format; `state` carries the running text offset across streamed chunks."""
        if entries is None:
            return None
        offsets = []
        for entry in entries:
            offsets.append(state.get("offset", 0))
            state["offset"] = offsets[-1] + len(entry.token)
        return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [dict(e.top) for e in entries], "text_offset": offsets}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def api_error_from_engine(exc: EngineRequestError) -> APIError:
    return APIError(exc.status_code, exc.message, param=exc.param, code=exc.code, err_type=exc.err_type)


class OpenAIServing:
    def __init__(self, providers: dict[str, Provider], metrics: ServingMetrics, max_n: int):
        self.providers = providers
        self.metrics = metrics
        self.max_n = max_n

    async def chat_completion(self, body: ChatCompletionRequest) -> JSONResponse | StreamingResponse:
        request = GenerateRequest(request_id=f"chatcmpl-{uuid.uuid4().hex}", sampling=body.sampling_options(),
                                  messages=[m.plain() for m in body.messages])
        return await self._complete("chat", body, request, ChatRenderer())

    async def completion(self, body: CompletionRequest) -> JSONResponse | StreamingResponse:
        request = GenerateRequest(request_id=f"cmpl-{uuid.uuid4().hex}", sampling=body.sampling_options(),
                                  prompt=body.prompt)
        return await self._complete("completions", body, request, CompletionRenderer())

    def provider_for(self, model: str) -> Provider:
        provider = self.providers.get(model)
        if provider is None:
            raise APIError(404, f"The model '{model}' does not exist or you do not have access to it.",
                           param="model", code="model_not_found")
        return provider

    async def _complete(self, endpoint: str, body: _SamplingFields, request: GenerateRequest, renderer):
        provider = self.provider_for(body.model)
        if body.n > self.max_n:
            raise APIError(400, f"'n' must be at most {self.max_n} on this server.", param="n")
        started = time.perf_counter()
        stream = provider.stream(request)
        # Wait for the first chunk before answering: a refused request still gets a proper status code.
        try:
            first = await anext(stream)
        except EngineRequestError as exc:
            await stream.aclose()
            self.metrics.requests.labels(body.model, endpoint, str(exc.status_code)).inc()
            raise api_error_from_engine(exc) from None
        except BaseException:
            await stream.aclose()
            raise
        self.metrics.ttft.labels(body.model).observe(time.perf_counter() - started)
        call = _Call(endpoint, body, request.request_id, renderer, started)
        if body.stream:
            return StreamingResponse(self._stream_events(call, first, stream), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                              "X-Request-Id": request.request_id})
        try:
            payload = await self._collect(call, first, stream)
        finally:
            await stream.aclose()
        return JSONResponse(payload, headers={"X-Request-Id": request.request_id})

    async def _collect(self, call: "_Call", first: GenerateChunk, stream) -> dict:
        texts: dict[int, list[str]] = defaultdict(list)
        logprobs: dict[int, list[TokenLogprob]] = {}
        finish: dict[int, str | None] = {}
        chunk = first
        while True:
            call.count(chunk)
            for delta in chunk.choices:
                texts[delta.index].append(delta.text)
                if delta.logprobs is not None:
                    logprobs.setdefault(delta.index, []).extend(delta.logprobs)
                if delta.finish_reason:
                    finish[delta.index] = delta.finish_reason
            if chunk.finished:
                break
            chunk = await anext(stream)
        choices = [call.renderer.final_choice(i, "".join(texts[i]), logprobs.get(i), finish.get(i), {})
                   for i in sorted(texts)]
        call.done(self.metrics, "200")
        return {"id": call.id, "object": call.renderer.final_object, "created": call.created,
                "model": call.body.model, "choices": choices, "usage": call.usage()}

    async def _stream_events(self, call: "_Call", first: GenerateChunk, stream) -> AsyncIterator[str]:
        include_usage = call.body.include_usage_in_stream()
        started_choices: set[int] = set()
        offsets: dict[int, dict] = defaultdict(dict)
        status = "200"
        try:
            chunk = first
            while True:
                call.count(chunk)
                for delta in chunk.choices:
                    first_for_choice = delta.index not in started_choices
                    started_choices.add(delta.index)
                    event = {"id": call.id, "object": call.renderer.chunk_object, "created": call.created,
                             "model": call.body.model,
                             "choices": [call.renderer.delta_choice(delta, first_for_choice, offsets[delta.index])]}
                    if include_usage:
                        event["usage"] = None
                    yield _sse(event)
                if chunk.finished:
                    break
                chunk = await anext(stream)
            if include_usage:
                yield _sse({"id": call.id, "object": call.renderer.chunk_object, "created": call.created,
                            "model": call.body.model, "choices": [], "usage": call.usage()})
        except (asyncio.CancelledError, GeneratorExit):
            status = "499"  # the client went away; closing the stream aborts the engine request
            raise
        except EngineRequestError as exc:
            status = str(exc.status_code)
            yield _sse(api_error_from_engine(exc).body())
        except Exception as exc:  # the stream already started: report in-band, as OpenAI does
            log.exception("stream %s failed", call.id)
            status = "500"
            yield _sse(APIError(500, f"The stream failed: {type(exc).__name__}: {exc}").body())
        finally:
            await stream.aclose()
            call.done(self.metrics, status)
        yield "data: [DONE]\n\n"


class _Call:
    """Book-keeping of one request: ids, token counts and the metrics written at its end."""

    def __init__(self, endpoint: str, body: _SamplingFields, request_id: str, renderer, started: float):
        self.endpoint = endpoint
        self.body = body
        self.id = request_id
        self.renderer = renderer
        self.started = started
        self.created = now()
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def count(self, chunk: GenerateChunk) -> None:
        self.prompt_tokens = chunk.prompt_tokens
        self.completion_tokens += sum(delta.num_tokens for delta in chunk.choices)

    def usage(self) -> dict:
        return _usage(self.prompt_tokens, self.completion_tokens)

    def done(self, metrics: ServingMetrics, status: str) -> None:
        model = self.body.model
        metrics.requests.labels(model, self.endpoint, status).inc()
        metrics.prompt_tokens.labels(model).inc(self.prompt_tokens)
        metrics.completion_tokens.labels(model).inc(self.completion_tokens)
        metrics.latency.labels(model, self.endpoint).observe(time.perf_counter() - self.started)
