"""The OpenAI endpoints on top of providers: request → ranked attempts → the provider's JSON or SSE.

A request is tried on the router's candidates in turn (retrying a provider with capped backoff, then
falling back) until one produces its first piece. From then on the request is committed to that provider:
once bytes have gone to the client, a failure ends the stream with an error event instead.

Responses are the provider's own (vLLM's serving layer for local engines, the upstream's for remote ones).
The ingress reads only usage, errors and the first byte; it adds `provider` and `usage.cost`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import AsyncIterator

from fastapi.responses import JSONResponse, StreamingResponse

from serve_app.config import LOCAL_PROVIDER, ApiKey
from serve_app.metrics import ServingMetrics
from serve_app.protocol import ROUTING_FIELDS, APIError, parameters_sent
from serve_app.providers.base import (OVERLOADED, EngineRequestError, Piece, Provider, ProviderCall, ProviderError,
                                     sse)
from serve_app.providers.ranking import Candidate, Lease, Router
from serve_app.usage_store import Accounting

log = logging.getLogger("tuneserve.serving")

# Which models an endpoint takes: generating models, or embedding models.
ENDPOINT_TASK = {"chat": "generate", "completions": "generate", "responses": "generate", "embeddings": "embed"}
DEFAULT_CONTEXT = 8192  # what a remote model's context is taken to be, for tokens-per-minute reservations
_CLEANUP_TIMEOUT_S = 10.0  # a provider that does not close its request by then is left to GC
_ID_PREFIX = {"chat": "chatcmpl", "completions": "cmpl", "responses": "resp", "embeddings": "embd"}
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def api_error_from_engine(exc: EngineRequestError) -> APIError:
    return APIError(exc.status_code, exc.message, param=exc.param, code=exc.code, err_type=exc.err_type)


class OpenAIServing:
    def __init__(self, providers: dict[str, Provider], router: Router, accounting: Accounting,
                 metrics: ServingMetrics, max_n: int, retry_policies: dict, tasks: dict[str, str],
                 contexts: dict[str, int], request_timeout_s: float = 600.0, local_attempt_timeout_s: float = 120.0,
                 keepalive_s: float = 0.0):
        self.providers = providers
        self.router = router
        self.accounting = accounting
        self.metrics = metrics
        self.max_n = max_n
        self.retry_policies = retry_policies  # provider name -> RetryPolicy
        self.tasks = tasks  # public model id -> "generate" | "embed"
        self.contexts = contexts  # public model id -> its context length, where we know it (local models)
        self.request_timeout_s = request_timeout_s  # the default deadline of a whole request
        self.local_attempt_timeout_s = local_attempt_timeout_s  # to a local engine's first piece
        self.keepalive_s = keepalive_s  # SSE comments while a stream waits for its first token; 0: none

    def add_model(self, model_id: str, task: str, context: int) -> None:
        """A model served from now on (a live adapter): its task and context length."""
        self.tasks[model_id] = task
        self.contexts[model_id] = context

    def remove_model(self, model_id: str) -> None:
        self.tasks.pop(model_id, None)
        self.contexts.pop(model_id, None)

    async def handle(self, endpoint: str, raw: dict, body, key: ApiKey | None, timeout_s: float | None = None,
                     session_id: str = ""):
        """Serve one request. `raw` is the client's JSON as sent; `body` its validated form; `timeout_s` the
        request's own deadline (default: the configured one); `session_id` the client's session, if it named
        one (local engines route on it)."""
        requested = body.requested_models()
        models = self.router.expand(requested)  # unknown models are a 404 before any limit is spent
        self._check_task(endpoint, models)
        if getattr(body, "n", 1) > self.max_n:
            raise APIError(400, f"'n' must be at most {self.max_n} on this server.", param="n")
        plan = self.router.plan(requested, body.provider, parameters_sent(raw))
        reserve = self._token_reservation(endpoint, raw, models) if key is not None and key.tpm else 0
        reservation = await self.accounting.admit(key, requested, reserve)
        started = time.perf_counter()
        deadline = asyncio.get_running_loop().time() + (timeout_s or self.request_timeout_s)
        engine_id = uuid.uuid4().hex  # vLLM prefixes it itself: chatcmpl-<id>, cmpl-<id>
        request_id = f"{_ID_PREFIX[endpoint]}-{engine_id}"
        wants_usage = bool((raw.get("stream_options") or {}).get("include_usage"))
        forwarded = {k: v for k, v in raw.items() if k not in ROUTING_FIELDS}
        if body.stream and endpoint in ("chat", "completions"):  # usage is needed for accounting
            forwarded["stream_options"] = {**(raw.get("stream_options") or {}), "include_usage": True}
        call = _Call(endpoint, body.model, request_id, engine_id, started, key, wants_usage, reservation, deadline,
                     session_id)
        walk = self._walk(call, plan, forwarded)
        if body.stream and self.keepalive_s:
            # The walk runs on its own, so that a first token slower than keepalive_s can be waited for behind
            # SSE comments, with the response committed.
            task = asyncio.ensure_future(walk)
            try:
                await asyncio.wait({task}, timeout=self.keepalive_s)
            except BaseException:  # the client left
                await self._abandon(call, task)
                raise
            if not task.done():
                headers = {"X-Request-Id": request_id, **_SSE_HEADERS}
                return ProviderStreamResponse(self._events_after_wait(call, task),
                                              lambda: self._abandon(call, task), headers=headers)
            candidate, lease, stream, first = task.result()
        else:
            candidate, lease, stream, first = await walk
        call.commit(candidate, lease)
        self.metrics.ttft.labels(candidate.model).observe(time.perf_counter() - started)
        headers = {"X-Request-Id": request_id, "X-Tuneserve-Provider": candidate.provider,
                   "X-Tuneserve-Attempts": call.attempts_header()}
        if first.body is None:  # a stream
            async def close() -> None:  # the client left before the body was read: nothing else will
                await stream.aclose()
                call.finish(self, ok=True, status="499")

            return ProviderStreamResponse(self._stream_events(call, first, stream), close,
                                          headers={**headers, **_SSE_HEADERS})
        try:
            call.count(first)
            payload = first.body
            payload["model"] = call.model
            payload["provider"] = candidate.provider
            if isinstance(payload.get("usage"), dict):
                payload["usage"]["cost"] = round(call.cost(), 10)
            call.finish(self, ok=True, status="200")
        finally:
            await stream.aclose()
            call.finish(self, ok=True, status="499")  # no-op when already finished; else the client left
        return JSONResponse(payload, headers=headers)

    async def _walk(self, call: "_Call", plan: list[Candidate], forwarded: dict):
        """_first_piece, with the books kept when it ends without one (nothing was used)."""
        try:
            return await self._first_piece(call, plan, forwarded)
        except BaseException as exc:  # no provider answered, the deadline passed, or the client left
            if isinstance(exc, APIError):
                self.metrics.requests.labels(call.requested_model, call.endpoint, str(exc.status_code)).inc()
            self.accounting.record(call.key, 0, 0, 0.0, call.reservation)
            raise

    async def _events_after_wait(self, call: "_Call", walk: asyncio.Task) -> AsyncIterator[str]:
        """A stream whose first token is slow: SSE comments until the walk ends, then its events (or its
        error, as an error event: the status went out already)."""
        while True:
            yield ": keep-alive\n\n"
            done, _ = await asyncio.wait({walk}, timeout=self.keepalive_s)
            if done:
                break
        try:
            candidate, lease, stream, first = walk.result()
        except APIError as exc:
            yield sse(exc.body())
            if call.endpoint != "responses":
                yield "data: [DONE]\n\n"
            return
        call.commit(candidate, lease)
        self.metrics.ttft.labels(candidate.model).observe(time.perf_counter() - call.started)
        async for event in self._stream_events(call, first, stream):
            yield event

    async def _abandon(self, call: "_Call", walk: asyncio.Task) -> None:
        """The client left while the walk ran, or before its stream was read: release what it holds."""
        if not walk.done():
            walk.cancel()  # the walk gives back its own lease and stream
            return
        if walk.cancelled() or walk.exception() is not None:
            return
        candidate, lease, stream, _ = walk.result()
        if call.lease is None:
            call.commit(candidate, lease)
        await stream.aclose()
        call.finish(self, ok=True, status="499")  # no-op when the stream already finished it

    def _token_reservation(self, endpoint: str, raw: dict, models: list[str]) -> int:
        """What a request may use at most, for tokens-per-minute limits: its prompt (JSON characters / 4,
        which overestimates) plus its output limit, or the context left when it sets none."""
        prompt = len(json.dumps(raw.get("messages") or raw.get("prompt") or raw.get("input") or "")) // 4
        if endpoint == "embeddings":
            return prompt
        limit = raw.get("max_completion_tokens") or raw.get("max_tokens") or raw.get("max_output_tokens")
        if limit is None:
            limit = 16 if endpoint == "completions" else max(
                self.contexts.get(model, DEFAULT_CONTEXT) - prompt for model in models)
        return prompt + max(int(limit), 0) * int(raw.get("n") or 1)

    def _check_task(self, endpoint: str, models: list[str]) -> None:
        wanted = ENDPOINT_TASK[endpoint]
        for model in models:
            task = self.tasks[model]
            if task != wanted:
                what = "an embedding model" if task == "embed" else "a generative model"
                use = "/v1/embeddings" if task == "embed" else "/v1/chat/completions, /v1/completions or /v1/responses"
                raise APIError(400, f"The model '{model}' is {what}: use {use}.", param="model",
                               code="wrong_model_type")

    async def _first_piece(self, call: "_Call", plan: list[Candidate], forwarded: dict):
        """Walk the plan until a provider yields its first piece. Client errors end the walk at once, and so
        does the request's deadline (504)."""
        loop = asyncio.get_running_loop()
        for candidate in plan:
            policy = self.retry_policies.get(candidate.provider)
            tries = policy.attempts if policy else 1
            for attempt in range(tries):
                if loop.time() >= call.deadline:
                    raise call.deadline_error()
                lease, why = self.router.acquire(candidate)
                if lease is None:
                    call.attempts.append((candidate.provider, why))
                    self.metrics.provider_attempts.labels(candidate.provider, why).inc()
                    break
                body = {**forwarded, "model": candidate.upstream}
                stream = self.providers[candidate.provider].stream(
                    ProviderCall(call.endpoint, body, call.engine_id, candidate.model, call.wants_usage,
                                 call.session_id))
                limit = call.deadline - loop.time()
                if candidate.provider == LOCAL_PROVIDER:
                    limit = min(limit, self.local_attempt_timeout_s)
                try:
                    try:
                        async with asyncio.timeout(limit):
                            first = await anext(stream)
                    except TimeoutError:  # the generator was cancelled: its clean-up aborted the request
                        raise ProviderError(f"{candidate.provider}: no answer within {limit:.3g} s",
                                            reason="timeout") from None
                except EngineRequestError as exc:  # the request is wrong: no other provider would help
                    await stream.aclose()
                    self.router.release(lease, ok=True)
                    raise api_error_from_engine(exc) from None
                except (ProviderError, StopAsyncIteration) as exc:
                    await stream.aclose()
                    reason = exc.reason if isinstance(exc, ProviderError) else "empty"
                    # Overloaded is busy, not broken, and a passed deadline says nothing of the provider: no
                    # breaker count for either. Overload is not retried here; on to the next.
                    overloaded = reason == OVERLOADED
                    expired = loop.time() >= call.deadline
                    self.router.release(lease, ok=None if overloaded or expired else False)
                    reason = "deadline" if expired else reason
                    call.attempts.append((candidate.provider, reason))
                    self.metrics.provider_attempts.labels(candidate.provider, reason).inc()
                    if expired:
                        raise call.deadline_error() from None
                    log.warning("attempt %d on %s for %s failed: %s", attempt + 1, candidate.provider,
                                candidate.model, exc)
                    wait = None if overloaded else self._backoff(policy, attempt, getattr(exc, "retry_after_s", None))
                    if wait is None or attempt + 1 == tries or loop.time() + wait >= call.deadline:
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

    async def _stream_events(self, call: "_Call", first: Piece, stream) -> AsyncIterator[str]:
        status, ok = "200", True
        usage_event = None
        try:
            piece = first
            while piece is not None:
                call.count(piece)
                if piece.usage_event is not None:
                    usage_event = piece.usage_event
                if piece.failed:
                    status, ok = "502", False
                if piece.sse:
                    yield piece.sse
                try:
                    async with asyncio.timeout_at(call.deadline):
                        piece = await anext(stream, None)
                except TimeoutError:  # no verdict on the provider; closing the stream aborts its request
                    status, ok = "504", None
                    yield sse(call.deadline_error().body())
                    break
            if usage_event is not None and call.wants_usage and ok is not None:
                usage_event["model"] = call.model
                usage_event["usage"]["cost"] = round(call.cost(), 10)
                yield sse(usage_event)
        except (asyncio.CancelledError, GeneratorExit):
            status = "499"  # the client went away; closing the stream aborts the engine request
            raise
        except Exception as exc:  # bytes already went out: no fallback now; report in-band, as OpenAI does
            log.warning("stream %s from %s failed: %s", call.id, call.candidate.provider, exc)
            status, ok = "502", False
            yield sse(APIError(502, f"The provider failed mid-stream: {exc}", code="provider_error").body())
        finally:
            await stream.aclose()
            call.finish(self, ok=ok, status=status)
        if call.endpoint != "responses":  # the Responses API ends with its response.completed event
            yield "data: [DONE]\n\n"


class ProviderStreamResponse(StreamingResponse):
    """An SSE response whose clean-up (lease, accounting, metrics, the provider's request) belongs to the
    response, not to its body generator: a generator whose first step never ran (the client left while the
    headers were going out, and the server cancelled the response) never runs its `finally` either."""

    def __init__(self, events: AsyncIterator[str], close, headers: dict[str, str]):
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self._close = close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # In a task of its own: this one may be cancelled (and stay so for anyio), and the clean-up must
            # run to the end all the same.
            cleanup = asyncio.ensure_future(self.aclose())
            try:
                await asyncio.shield(cleanup)
            except asyncio.CancelledError:
                await asyncio.wait([cleanup], timeout=_CLEANUP_TIMEOUT_S)
                raise

    async def aclose(self) -> None:
        """Idempotent: closes the body generator, then releases whatever it did not."""
        await self.body_iterator.aclose()
        await self._close()


class _Call:
    """Book-keeping of one request: ids, attempts, token counts, and what is recorded at its end."""

    def __init__(self, endpoint: str, model: str, request_id: str, engine_id: str, started: float,
                 key: ApiKey | None, wants_usage: bool, reservation: list | None, deadline: float,
                 session_id: str = ""):
        self.endpoint = endpoint
        self.requested_model = model
        self.id = request_id
        self.started = started
        self.key = key
        self.wants_usage = wants_usage
        self.engine_id = engine_id  # the id the provider gets; vLLM prefixes it as OpenAI does
        self.session_id = session_id  # the client's X-Session-Id, for local engines' routing
        self.reservation = reservation  # this request's tokens-per-minute reservation, settled at the end
        self.deadline = deadline  # on the event loop's clock
        self.timeout_s = deadline - asyncio.get_running_loop().time()
        self.attempts: list[tuple[str, str]] = []
        self.candidate: Candidate | None = None
        self.lease: Lease | None = None
        self.first_chunk_at = 0.0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.frames = 0
        self.reported = False
        self.finished = False

    @property
    def model(self) -> str:
        return self.candidate.model if self.candidate else self.requested_model

    def commit(self, candidate: Candidate, lease: Lease) -> None:
        self.candidate, self.lease = candidate, lease
        self.first_chunk_at = time.perf_counter()

    def deadline_error(self) -> APIError:
        tried = ", ".join(f"{p}: {why}" for p, why in self.attempts)
        return APIError(504, f"The request's deadline of {self.timeout_s:.3g} s passed"
                        + (f" (tried {tried})." if tried else "."), code="deadline_exceeded")

    def attempts_header(self) -> str:
        return ",".join(f"{provider}:{outcome}" for provider, outcome in self.attempts)

    def count(self, piece: Piece) -> None:
        self.frames += piece.frames
        if piece.usage is not None:
            self.prompt_tokens = piece.usage.prompt_tokens
            self.completion_tokens = piece.usage.completion_tokens
            self.reported = True
        elif not self.reported:
            # A stream cut short never reports usage: count one token per output frame (a lower bound).
            self.completion_tokens = self.frames

    def cost(self) -> float:
        return self.candidate.price.cost(self.prompt_tokens, self.completion_tokens) if self.candidate else 0.0

    def finish(self, serving: "OpenAIServing", ok: bool | None, status: str) -> None:
        if self.finished:
            return
        self.finished = True
        done = time.perf_counter()
        # A whole (non-streamed) answer arrives at once: its throughput is over the request's whole time.
        decode_s = done - (self.first_chunk_at if self.frames else self.started)
        tokens_per_s = self.completion_tokens / decode_s if ok and decode_s > 0 and self.completion_tokens > 1 else None
        serving.router.release(self.lease, ok=ok, ttft_s=self.first_chunk_at - self.started,
                               tokens_per_s=tokens_per_s)
        serving.accounting.record(self.key, self.prompt_tokens, self.completion_tokens, self.cost(), self.reservation)
        metrics, model = serving.metrics, self.model
        metrics.requests.labels(model, self.endpoint, status).inc()
        metrics.prompt_tokens.labels(model).inc(self.prompt_tokens)
        metrics.completion_tokens.labels(model).inc(self.completion_tokens)
        metrics.latency.labels(model, self.endpoint).observe(done - self.started)
