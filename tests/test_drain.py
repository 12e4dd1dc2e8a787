"""Graceful drain: a redeploy replaces the ingress replica while a long stream runs through it. The old
replica takes no new requests but finishes that stream (Serve's default drain window, 20 s, cut it)."""

from __future__ import annotations

import json
import threading
import time

import httpx

from serve_app.app import build_from_config
from serve_app.config import AppConfig

APP, PREFIX = "drain", "/drain"
TOKENS = 250  # the upstream's `slow` model: 100 ms a token, so 25 s, longer than Serve's default window


def test_redeploy_lets_a_stream_under_way_finish(server, upstreams):
    from ray import serve

    def app(max_n: int):
        config = {"providers": [{"name": "drainup", "base_url": upstreams["beta"].url,
                                 "models": [{"id": "drain-model", "upstream": "slow"}], "timeouts": {"read_s": 60}}],
                  "ingress": {"max_n": max_n, "usage_store": {"path": None}}}
        return build_from_config(AppConfig.model_validate(config))

    serve.run(app(4), name=APP, route_prefix=PREFIX)
    lines: list[str] = []
    first = threading.Event()

    def stream() -> None:
        body = {"model": "drain-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": TOKENS,
                "stream": True}
        with httpx.stream("POST", f"{server}{PREFIX}/v1/chat/completions", json=body, timeout=90) as response:
            for line in response.iter_lines():
                if line:
                    lines.append(line)
                    first.set()

    try:
        reader = threading.Thread(target=stream, daemon=True)
        reader.start()
        assert first.wait(30), "the stream did not begin"
        started = time.monotonic()
        old = httpx.get(f"{server}{PREFIX}/admin/usage", timeout=30).json()["replica"]  # the stream's replica
        serve.run(app(5), name=APP, route_prefix=PREFIX)  # returns once the new replica runs
        usage = httpx.get(f"{server}{PREFIX}/admin/usage", timeout=30).json()
        assert usage["replica"] != old, usage  # a new replica answers now; the old one drains
        assert usage["keys"]["anonymous"]["requests"] == 1, usage  # the usage store outlived the old replica
        reader.join(timeout=90)
        assert not reader.is_alive()
        assert time.monotonic() - started > 15  # the stream outlived the redeploy by far
    finally:
        serve.delete(APP)
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert not any("error" in event for event in events)
    text = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
    assert text.split() == [f"tok{i}" for i in range(TOKENS)]
    assert events[-1]["choices"][-1]["finish_reason"] == "length"
