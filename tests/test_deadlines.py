"""Deadlines, SSE keep-alives and shedding at the ingress, through an app of remote providers only (the
misbehaving upstream of tests/upstream.py), deployed next to the main test app."""

from __future__ import annotations

import contextlib
import json
import time

import httpx
import pytest

from serve_app.app import build_from_config
from serve_app.config import AppConfig

APP, PREFIX = "deadlines", "/deadlines"
KEEPALIVE_S = 0.5
MAX_ONGOING = 3
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def base(server, upstreams):
    from ray import serve

    url = upstreams["alpha"].url

    def provider(name: str, upstream: str, **extra) -> dict:
        return {"name": name, "base_url": url, "models": [{"id": f"{name}-model", "upstream": upstream}],
                "retry": {"attempts": 1}, "timeouts": {"read_s": 60}, **extra}

    config = {"providers": [provider("late", "late-3"), provider("later", "late-8"), provider("slow", "slow"),
                            provider("hang", "hang"), provider("echo", "echo")],
              "aliases": {"hang-then-echo": ["hang-model", "echo-model"]},
              "ingress": {"sse_keepalive_s": KEEPALIVE_S, "max_ongoing_requests": MAX_ONGOING,
                          "request_timeout_s": 30, "max_request_timeout_s": 60, "usage_store": {"path": None}}}
    serve.run(build_from_config(AppConfig.model_validate(config)), name=APP, route_prefix=PREFIX)
    try:
        yield f"{server}{PREFIX}"
    finally:
        serve.delete(APP)


def _lines(base: str, body: dict, timeout: str | None = None) -> tuple[int, list[str], float]:
    headers = {"X-Tuneserve-Timeout": timeout} if timeout else {}
    started = time.perf_counter()
    with httpx.stream("POST", f"{base}/v1/chat/completions", json={**body, "stream": True}, headers=headers,
                      timeout=60) as response:
        lines = [line for line in response.iter_lines() if line]
        return response.status_code, lines, time.perf_counter() - started


def _in_flight(base: str) -> dict[str, int]:
    providers = httpx.get(f"{base}/admin/usage", timeout=30).json()["providers"]
    return {name: state["in_flight"] for name, state in providers.items()}


def test_deadline_before_the_first_byte_is_a_504(base):
    started = time.perf_counter()
    response = httpx.post(f"{base}/v1/chat/completions", json={"model": "later-model", "messages": HI},
                          headers={"X-Tuneserve-Timeout": "1.5"}, timeout=60)
    elapsed = time.perf_counter() - started
    assert response.status_code == 504, response.text
    error = response.json()["error"]
    assert error["code"] == "deadline_exceeded" and "1.5 s" in error["message"] and "later: deadline" in error["message"]
    assert 1.4 < elapsed < 3.0, elapsed
    assert _in_flight(base)["later"] == 0


def test_deadline_covers_every_candidate(base):
    """The first candidate hangs (its read timeout is 60 s): the deadline, not the timeout, ends the request."""
    started = time.perf_counter()
    response = httpx.post(f"{base}/v1/chat/completions", json={"model": "hang-then-echo", "messages": HI},
                          headers={"X-Tuneserve-Timeout": "2"}, timeout=60)
    assert response.status_code == 504 and time.perf_counter() - started < 4.0, response.text
    assert _in_flight(base)["hang"] == 0


def test_deadline_mid_stream_ends_with_an_error_event(base):
    status, lines, elapsed = _lines(base, {"model": "slow-model", "messages": HI, "max_tokens": 100}, timeout="2")
    assert status == 200 and elapsed < 4.0, (status, elapsed)
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert "choices" in events[0] and 5 <= len(events) - 1 < 100  # some tokens came, then the deadline
    assert events[-1]["error"]["code"] == "deadline_exceeded"
    assert _in_flight(base)["slow"] == 0


def test_keepalives_while_the_first_token_is_slow(base):
    status, lines, elapsed = _lines(base, {"model": "late-model", "messages": HI, "max_tokens": 4})
    assert status == 200 and elapsed >= 3.0
    comments = [line for line in lines if line.startswith(":")]
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data:"))
    assert len(comments) >= 3 and all(line.startswith(":") for line in lines[:first_data]), lines[:first_data]
    text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                   for line in lines[first_data:-1] if json.loads(line[6:]).get("choices"))
    assert text.split() == ["tok0", "tok1", "tok2", "tok3"] and lines[-1] == "data: [DONE]"


def test_keepalives_then_a_deadline_is_an_error_event(base):
    status, lines, elapsed = _lines(base, {"model": "later-model", "messages": HI}, timeout="2")
    assert status == 200 and elapsed < 4.0
    assert lines[0].startswith(":") and lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["error"]["code"] == "deadline_exceeded"
    assert _in_flight(base)["later"] == 0


def test_official_client_sees_a_stream_deadline_as_an_error(base):
    import openai

    client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.APIError, match="deadline"):
        for _ in client.chat.completions.create(model="later-model", messages=HI, stream=True,
                                                extra_headers={"X-Tuneserve-Timeout": "1"}):
            pass


@pytest.mark.parametrize("value", ["soon", "0", "-3", "61", "nan"])
def test_bad_timeout_header_is_a_400(base, value):
    response = httpx.post(f"{base}/v1/chat/completions", json={"model": "echo-model", "messages": HI},
                          headers={"X-Tuneserve-Timeout": value}, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "X-Tuneserve-Timeout"


def test_ingress_sheds_past_its_limit_in_openai_format(base):
    body = {"model": "slow-model", "messages": HI, "max_tokens": 40, "stream": True}
    readers = []  # a dropped line iterator closes its response: these keep the streams open
    with httpx.Client(timeout=60) as http, contextlib.ExitStack() as streams:
        for _ in range(MAX_ONGOING):
            response = streams.enter_context(http.stream("POST", f"{base}/v1/chat/completions", json=body))
            assert response.status_code == 200
            readers.append(response.iter_lines())
            assert next(readers[-1]).startswith("data: ")
        started = time.perf_counter()
        shed = http.post(f"{base}/v1/chat/completions", json={"model": "echo-model", "messages": HI})
        assert time.perf_counter() - started < 1.0
        assert shed.status_code == 503 and shed.headers["Retry-After"] == "1", shed.text
        assert shed.json()["error"]["code"] == "overloaded"
        assert httpx.get(f"{base}/health", timeout=30).status_code == 200  # not an API request: not shed
    # The closed streams give their slots back once the ingress sees the disconnects: promptly, not when
    # the upstream streams would have ended (40 slow tokens).
    deadline = time.monotonic() + 5
    while True:
        served = httpx.post(f"{base}/v1/chat/completions", json={"model": "echo-model", "messages": HI}, timeout=30)
        if served.status_code != 503 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert served.status_code == 200, served.text
