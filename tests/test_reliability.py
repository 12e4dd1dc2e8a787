"""Reliability of the serving path, below the HTTP server: the real serving layer and router in front of
a real upstream on loopback, with the ASGI response driven by hand so that a client can leave at exactly the
moment that matters."""

from __future__ import annotations

import asyncio

import pytest

from serve_app.auth import ANONYMOUS
from serve_app.config import AppConfig
from serve_app.metrics import ServingMetrics
from serve_app.protocol import REQUEST_MODELS
from serve_app.providers.ranking import Router
from serve_app.providers.remote import RemoteProvider
from serve_app.serving import OpenAIServing
from serve_app.usage_store import Accounting
from tests.upstream import UpstreamServer


@pytest.fixture(scope="module")
def upstream():
    with UpstreamServer("reliability") as server:
        yield server


@pytest.fixture(scope="module")
def metrics():
    return ServingMetrics()


def _serving(upstream, metrics) -> OpenAIServing:
    config = AppConfig.model_validate({"providers": [{
        "name": "up", "base_url": upstream.url, "max_concurrency": 4, "models": [{"id": "slow"}]}]})
    provider = config.providers[0]
    return OpenAIServing({"up": RemoteProvider(provider)}, Router(config), Accounting(metrics), metrics, max_n=4,
                         retry_policies={"up": provider.retry}, tasks=config.tasks(), contexts={})


async def _open_stream(serving: OpenAIServing):
    raw = {"model": "slow", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50, "stream": True}
    return await serving.handle("chat", raw, REQUEST_MODELS["chat"].model_validate(raw), None)


async def _disconnected():
    return {"type": "http.disconnect"}


async def _stalled_send(message):
    """A client that stops reading: the response's headers never go out."""
    await asyncio.Event().wait()


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
async def test_client_gone_before_the_body_is_read_releases_everything(upstream, metrics, spec_version):
    """Defect 1: the client leaves after the first piece arrived but before the server iterates the body
    (Serve cancels the handler). The lease, the accounting and the upstream request must still be closed."""
    serving = _serving(upstream, metrics)
    response = await _open_stream(serving)
    assert serving.router.snapshot()["up"]["in_flight"] == 1
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": spec_version}, "method": "POST",
             "path": "/v1/chat/completions", "headers": []}
    task = asyncio.create_task(response(scope, _disconnected, _stalled_send))
    for _ in range(5):  # it starts and waits to send its headers: the body is not iterated yet
        await asyncio.sleep(0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert serving.router.snapshot()["up"]["in_flight"] == 0  # the lease is back
    usage = serving.accounting.local.usage[ANONYMOUS]
    assert usage.requests == 1  # the request was recorded, once


async def test_response_never_started_is_closed_by_aclose(upstream, metrics):
    """`aclose()` alone (the response never called) releases everything, and a second call is harmless:
    the response's own clean-up may run after its body generator already closed the stream."""
    serving = _serving(upstream, metrics)
    response = await _open_stream(serving)
    await response.aclose()
    await response.aclose()
    assert serving.router.snapshot()["up"]["in_flight"] == 0
    assert serving.accounting.local.usage[ANONYMOUS].requests == 1
