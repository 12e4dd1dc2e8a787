"""The remote provider keeps its upstream connections pooled: a streamed answer is read to its end, so the
connection is reused instead of a new TCP (or TLS) handshake per request; an upstream that keeps its stream
open after the end is cut, not waited on."""

import asyncio
import time

from tests.upstream import UpstreamServer
from serve_app.config import ProviderConfig
from serve_app.providers import remote
from serve_app.providers.base import ProviderCall
from serve_app.providers.remote import RemoteProvider


def _provider(url: str) -> RemoteProvider:
    return RemoteProvider(ProviderConfig.model_validate(
        {"name": "pooled", "base_url": url, "models": [{"id": "echo-model", "upstream": "echo"}]}))


def _call(stream: bool) -> ProviderCall:
    body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": stream}
    return ProviderCall(endpoint="chat", body=body, request_id="r", model="echo-model", client_wants_usage=False)


async def _drain_all(provider: RemoteProvider, calls: list[ProviderCall]) -> list[list]:
    out = []
    for call in calls:
        out.append([piece async for piece in provider.stream(call)])
    await provider.aclose()
    return out


def test_streamed_requests_reuse_one_pooled_connection():
    with UpstreamServer("pool") as upstream:
        answers = asyncio.run(_drain_all(_provider(upstream.url), [_call(True)] * 8 + [_call(False)] * 2))
        ports = upstream.app.state.client_ports
    assert all(answers)
    assert sum(ports.values()) == 10
    assert len(ports) == 1, f"10 sequential requests opened {len(ports)} connections"


def test_a_stream_held_open_after_its_end_is_cut_not_waited_on(monkeypatch):
    monkeypatch.setattr(remote, "DRAIN_AFTER_END_S", 0.2)

    async def lines():
        yield ""
        await asyncio.sleep(30)  # an upstream that keeps the response open after [DONE]
        yield "never"

    started = time.monotonic()
    asyncio.run(remote._drain(lines()))
    assert time.monotonic() - started < 2
