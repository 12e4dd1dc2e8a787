"""OpenAI chat and text completions on top of providers: request → ranked attempts → JSON or SSE.

A request is tried on the router's candidates in turn (retrying a provider with capped backoff, then
falling back) until one produces its first chunk. From then on the request is committed to that provider:
once bytes have gone to the client, a failure ends the stream with an error event instead.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import defaultdict
from typing import AsyncIterator

from fastapi.responses import JSONResponse, StreamingResponse

from serve_app.engine_api import ChoiceDelta, EngineRequestError, GenerateChunk, GenerateRequest, TokenLogprob
from serve_app.auth import Accounting
from serve_app.config import ApiKey
from serve_app.metrics import ServingMetrics
from serve_app.protocol import APIError, ChatCompletionRequest, CompletionRequest, _SamplingFields, now
from serve_app.providers.base import Provider, ProviderError, ProviderRequest
from serve_app.router import Candidate, Lease, Router

log = logging.getLogger("tuneserve.serving")


# -- rendering: the two endpoints differ only in the shape of a choice ------------------------------


def _token_bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="replace"))


class ChatRenderer:
    chunk_object = "chat.completion.chunk"
    final_object = "chat.completion"

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
    def __init__(self, providers: dict[str, Provider], router: Router, accounting: Accounting,
                 metrics: ServingMetrics, max_n: int, retry_policies: dict):
        self.providers = providers
        self.router = router
        self.accounting = accounting
        self.metrics = metrics
        self.max_n = max_n
        self.retry_policies = retry_policies  # provider name -> RetryPolicy

    async def chat_completion(self, body: ChatCompletionRequest, key: ApiKey | None):
        request = GenerateRequest(request_id=f"chatcmpl-{uuid.uuid4().hex}", sampling=body.sampling_options(),
                                  messages=[m.plain() for m in body.messages])
        return await self._complete("chat", body, request, ChatRenderer(), key)

    async def completion(self, body: CompletionRequest, key: ApiKey | None):
        request = GenerateRequest(request_id=f"cmpl-{uuid.uuid4().hex}", sampling=body.sampling_options(),
                                  prompt=body.prompt)
        return await self._complete("completions", body, request, CompletionRenderer(), key)

    async def _complete(self, endpoint: str, body: _SamplingFields, request: GenerateRequest, renderer,
                        key: ApiKey | None):
        requested = body.requested_models()
        self.router.expand(requested)  # unknown models are a 404 before any limit is spent
        self.accounting.admit(key, requested)
        if body.n > self.max_n:
            raise APIError(400, f"'n' must be at most {self.max_n} on this server.", param="n")
        plan = self.router.plan(requested, body.provider, body.parameters_sent())
        started = time.perf_counter()
        call = _Call(endpoint, body, request.request_id, renderer, started, key)
        upstream_body = body.upstream_body()
        try:
            candidate, lease, stream, first = await self._first_chunk(call, plan, request, upstream_body)
        except APIError as exc:
            self.metrics.requests.labels(body.model, endpoint, str(exc.status_code)).inc()
            raise
        call.commit(candidate, lease)
        self.metrics.ttft.labels(candidate.model).observe(time.perf_counter() - started)
        headers = {"X-Request-Id": request.request_id, "X-Tuneserve-Provider": candidate.provider,
                   "X-Tuneserve-Attempts": call.attempts_header()}
        if body.stream:
            headers.update({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            return StreamingResponse(self._stream_events(call, first, stream), media_type="text/event-stream",
                                     headers=headers)
        try:
            payload = await self._collect(call, first, stream)
        except ProviderError as exc:
            call.finish(self, ok=False, status="502")
            raise APIError(502, f"The provider failed mid-response: {exc}", code="provider_error") from None
        finally:
            await stream.aclose()
            call.finish(self, ok=True, status="499")  # no-op when already finished; else the client left
        return JSONResponse(payload, headers=headers)

    async def _first_chunk(self, call: "_Call", plan: list[Candidate], request: GenerateRequest, upstream_body: dict):
        """Walk the plan until a provider yields its first chunk. Client errors end the walk at once."""
        for candidate in plan:
            policy = self.retry_policies.get(candidate.provider)
            tries = policy.attempts if policy else 1
            for attempt in range(tries):
                lease, why = self.router.acquire(candidate.provider)
                if lease is None:
                    call.attempts.append((candidate.provider, why))
                    self.metrics.provider_attempts.labels(candidate.provider, why).inc()
                    break
                stream = self.providers[candidate.provider].stream(
                    ProviderRequest(call.endpoint, request, upstream_body, candidate.upstream))
                try:
                    first = await anext(stream)
                except EngineRequestError as exc:  # the request is wrong: no other provider would help
                    await stream.aclose()
                    self.router.release(lease, ok=True)
                    raise api_error_from_engine(exc) from None
                except (ProviderError, StopAsyncIteration) as exc:
                    await stream.aclose()
                    self.router.release(lease, ok=False)
                    reason = exc.reason if isinstance(exc, ProviderError) else "empty"
                    call.attempts.append((candidate.provider, reason))
                    self.metrics.provider_attempts.labels(candidate.provider, reason).inc()
                    log.warning("attempt %d on %s for %s failed: %s", attempt + 1, candidate.provider,
                                candidate.model, exc)
                    wait = self._backoff(policy, attempt, getattr(exc, "retry_after_s", None))
                    if wait is None or attempt + 1 == tries:
                        break
                    await asyncio.sleep(wait)
                    continue
                except BaseException:
                    await stream.aclose()
                    self.router.release(lease, ok=True)
                    raise
                call.attempts.append((candidate.provider, "ok"))
                self.metrics.provider_attempts.labels(candidate.provider, "ok").inc()
                return candidate, lease, stream, first
        tried = ", ".join(f"{p}: {why}" for p, why in call.attempts)
        raise APIError(503, f"Every provider for this request failed or is unavailable ({tried}).",
                       code="providers_unavailable", headers={"Retry-After": "1"})

    @staticmethod
    def _backoff(policy, attempt: int, retry_after_s: float | None) -> float | None:
        """Seconds to wait before retrying the same provider; None: move on to the next one now."""
        if policy is None:
            return None
        if retry_after_s is not None:
            return retry_after_s if retry_after_s <= policy.max_backoff_s else None
        return min(policy.backoff_s * (2 ** attempt), policy.max_backoff_s)

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
        call.finish(self, ok=True, status="200")
        return {"id": call.id, "object": call.renderer.final_object, "created": call.created,
                "model": call.model, "provider": call.candidate.provider, "choices": choices, "usage": call.usage()}

    async def _stream_events(self, call: "_Call", first: GenerateChunk, stream) -> AsyncIterator[str]:
        include_usage = call.body.include_usage_in_stream()
        started_choices: set[int] = set()
        offsets: dict[int, dict] = defaultdict(dict)
        status, ok = "200", True
        try:
            chunk = first
            while True:
                call.count(chunk)
                for delta in chunk.choices:
                    first_for_choice = delta.index not in started_choices
                    started_choices.add(delta.index)
                    event = {"id": call.id, "object": call.renderer.chunk_object, "created": call.created,
                             "model": call.model,
                             "choices": [call.renderer.delta_choice(delta, first_for_choice, offsets[delta.index])]}
                    if include_usage:
                        event["usage"] = None
                    yield _sse(event)
                if chunk.finished:
                    break
                chunk = await anext(stream)
            if include_usage:
                yield _sse({"id": call.id, "object": call.renderer.chunk_object, "created": call.created,
                            "model": call.model, "choices": [], "usage": call.usage()})
        except (asyncio.CancelledError, GeneratorExit):
            status = "499"  # the client went away; closing the stream aborts the engine request
            raise
        except EngineRequestError as exc:
            status = str(exc.status_code)
            yield _sse(api_error_from_engine(exc).body())
        except Exception as exc:  # bytes already went out: no fallback now; report in-band, as OpenAI does
            log.warning("stream %s from %s failed: %s", call.id, call.candidate.provider, exc)
            status, ok = "502", False
            yield _sse(APIError(502, f"The provider failed mid-stream: {exc}", code="provider_error").body())
        finally:
            await stream.aclose()
            call.finish(self, ok=ok, status=status)
        yield "data: [DONE]\n\n"


class _Call:
    """Book-keeping of one request: ids, attempts, token counts, and what is recorded at its end."""

    def __init__(self, endpoint: str, body: _SamplingFields, request_id: str, renderer, started: float,
                 key: ApiKey | None):
        self.endpoint = endpoint
        self.body = body
        self.id = request_id
        self.renderer = renderer
        self.started = started
        self.key = key
        self.created = now()
        self.attempts: list[tuple[str, str]] = []
        self.candidate: Candidate | None = None
        self.lease: Lease | None = None
        self.first_chunk_at = 0.0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.finished = False

    @property
    def model(self) -> str:
        return self.candidate.model if self.candidate else self.body.model

    def commit(self, candidate: Candidate, lease: Lease) -> None:
        self.candidate, self.lease = candidate, lease
        self.first_chunk_at = time.perf_counter()

    def attempts_header(self) -> str:
        return ",".join(f"{provider}:{outcome}" for provider, outcome in self.attempts)

    def count(self, chunk: GenerateChunk) -> None:
        if chunk.prompt_tokens:
            self.prompt_tokens = chunk.prompt_tokens
        if chunk.completion_tokens is not None:
            self.completion_tokens = chunk.completion_tokens
        else:
            self.completion_tokens += sum(delta.num_tokens for delta in chunk.choices)

    def cost(self) -> float:
        return self.candidate.price.cost(self.prompt_tokens, self.completion_tokens) if self.candidate else 0.0

    def usage(self) -> dict:
        usage = _usage(self.prompt_tokens, self.completion_tokens)
        usage["cost"] = round(self.cost(), 10)
        return usage

    def finish(self, serving: "OpenAIServing", ok: bool, status: str) -> None:
        if self.finished:
            return
        self.finished = True
        done = time.perf_counter()
        decode_s = done - self.first_chunk_at
        tokens_per_s = self.completion_tokens / decode_s if ok and decode_s > 0 and self.completion_tokens > 1 else None
        serving.router.release(self.lease, ok=ok, ttft_s=self.first_chunk_at - self.started,
                               tokens_per_s=tokens_per_s)
        serving.accounting.record(self.key, self.prompt_tokens, self.completion_tokens, self.cost())
        metrics, model = serving.metrics, self.model
        metrics.requests.labels(model, self.endpoint, status).inc()
        metrics.prompt_tokens.labels(model).inc(self.prompt_tokens)
        metrics.completion_tokens.labels(model).inc(self.completion_tokens)
        metrics.latency.labels(model, self.endpoint).observe(done - self.started)
