"""The OpenAI API end to end: real Ray Serve, real vLLM engine, official openai client."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from tests.conftest import EMBED_MODEL_ID, ENGINE_MAX_ONGOING, ENGINE_MAX_QUEUED, KEYS, MODEL_ID, TEST_KEY, scrape

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def test_models_list(client):
    models = client.models.list()
    assert models.data[0].id == MODEL_ID and models.data[0].owned_by == "tuneserve"
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID


def test_chat_answers_paris(client):
    reply = client.chat.completions.create(model=MODEL_ID, messages=FRANCE, max_tokens=32, temperature=0)
    choice = reply.choices[0]
    assert "Paris" in choice.message.content
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert reply.model == MODEL_ID and reply.object == "chat.completion"
    usage = reply.usage
    assert usage.prompt_tokens > 5 and 0 < usage.completion_tokens <= 32
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_chat_length_limit(client):
    reply = client.chat.completions.create(model=MODEL_ID, messages=FRANCE, max_completion_tokens=3,
                                           temperature=0)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 3


def test_stream_matches_non_stream(client):
    kwargs = dict(model=MODEL_ID, messages=[{"role": "user", "content": "Name three colours."}],
                  max_tokens=40, temperature=0)
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_raw_sse_framing(server):
    body = {"model": MODEL_ID, "messages": FRANCE, "max_tokens": 8, "stream": True}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {TEST_KEY}"}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == events[0]["id"] for e in events)
    assert "usage" not in events[0]  # only with stream_options.include_usage


def _frame(content: str, finish: str | None = None) -> str:
    finish_reason = "null" if finish is None else f'"{finish}"'
    return ('data: {"id":"chatcmpl-1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":'
            f'"{content}"}},"finish_reason":{finish_reason}}}]}}\n\n')


async def test_a_stream_interval_coalesces_but_never_waits_after_the_choice_finishes():
    """With `stream_interval_ms` > 0 (the default is 0) the engine waits one interval after each frame, so that
    vLLM merges the tokens that come meanwhile, but not after the frame that finishes the choice: the usage
    chunk and [DONE] follow it at once. A wait there cost every stream one interval of latency and a
    closed-loop client one interval of each request's slot."""
    from serve_app.engine import EngineDeployment

    usage = 'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":3,' \
            '"completion_tokens":3,"total_tokens":6}}\n\n'
    frames = [_frame("", None), _frame("Pa"), _frame("ris"), _frame(".", "stop"), usage, "data: [DONE]\n\n"]

    async def vllm_frames():
        for frame in frames:
            yield frame

    engine = object.__new__(EngineDeployment)  # _stream reads only the interval
    for interval in (0.0, 0.2):
        engine.stream_interval_s = interval
        arrivals, pieces = [], []
        async for piece in engine._stream("chat", vllm_frames()):
            arrivals.append(asyncio.get_running_loop().time())
            pieces.append(piece)
        # the role frame rides with the first token; the usage chunk is held apart for the ingress
        assert [p.frames for p in pieces] == [2, 1, 1, 0] and pieces[-1].usage.completion_tokens == 3
        gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
        assert all(gap >= interval for gap in gaps[:2]), gaps  # a wait after each token frame
        assert gaps[2] < 0.05, gaps  # none after the finishing one


async def test_async_client_stream_and_non_stream(async_client):
    reply = await async_client.chat.completions.create(model=MODEL_ID, messages=FRANCE, max_tokens=16,
                                                       temperature=0)
    assert "Paris" in reply.choices[0].message.content
    stream = await async_client.chat.completions.create(model=MODEL_ID, messages=FRANCE, max_tokens=16,
                                                        temperature=0, stream=True)
    text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])
    assert text == reply.choices[0].message.content


async def test_concurrent_requests(async_client):
    async def one(i: int) -> str:
        reply = await async_client.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": f"Say the number {i}."}], max_tokens=12,
            temperature=0)
        return reply.choices[0].finish_reason

    finishes = await asyncio.gather(*(one(i) for i in range(8)))
    assert set(finishes) <= {"stop", "length"}


def test_completions(client):
    reply = client.completions.create(model=MODEL_ID, prompt="The capital of France is", max_tokens=4,
                                      temperature=0, logprobs=2)
    choice = reply.choices[0]
    assert "Paris" in choice.text
    assert choice.finish_reason == "length" and reply.usage.completion_tokens == 4
    assert len(choice.logprobs.tokens) == 4 and len(choice.logprobs.token_logprobs) == 4
    assert all(len(top) == 2 for top in choice.logprobs.top_logprobs)
    assert choice.logprobs.text_offset[0] == 0
    assert "".join(choice.logprobs.tokens) == choice.text


def test_completions_stream_and_token_prompt(client):
    chunks = list(client.completions.create(model=MODEL_ID, prompt="1, 2, 3,", max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens == 6
    by_ids = client.completions.create(model=MODEL_ID, prompt=[16, 28, 216, 28, 239, 28], max_tokens=3,
                                       temperature=0)
    assert by_ids.usage.prompt_tokens == 6
    assert text


def test_chat_logprobs(client):
    reply = client.chat.completions.create(model=MODEL_ID, messages=FRANCE, max_tokens=5, temperature=0,
                                           logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-4)
    assert "".join(e.token for e in content) == reply.choices[0].message.content


def test_n_seed_stop_and_penalties(client):
    common = dict(model=MODEL_ID, messages=[{"role": "user", "content": "Write a short poem about the sea."}],
                  max_tokens=20, temperature=1.0, top_p=0.95, seed=1234)
    first = client.chat.completions.create(n=2, presence_penalty=0.5, frequency_penalty=0.5, user="tests",
                                           **common)
    assert sorted(c.index for c in first.choices) == [0, 1]
    again = client.chat.completions.create(n=2, presence_penalty=0.5, frequency_penalty=0.5, **common)
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    stopped = client.chat.completions.create(model=MODEL_ID, messages=FRANCE, max_tokens=32, temperature=0,
                                             stop=["Paris"])
    assert "Paris" not in stopped.choices[0].message.content
    assert stopped.choices[0].finish_reason == "stop"


def test_stream_n2(client):
    chunks = list(client.chat.completions.create(model=MODEL_ID, messages=FRANCE, max_tokens=6, n=2, seed=3,
                                                 temperature=0.8, stream=True))
    indexes = {c.choices[0].index for c in chunks}
    assert indexes == {0, 1}
    finished = [c.choices[0].index for c in chunks if c.choices[0].finish_reason]
    assert sorted(finished) == [0, 1]


def test_disconnect_aborts_engine_request(server, engine_handle):
    """A client that goes away mid-stream frees its engine slot (the request is aborted, not finished)."""
    body = {"model": MODEL_ID, "messages": FRANCE, "max_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {TEST_KEY}"}) as response:
        lines = response.iter_lines()
        received = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in received)
        assert engine_handle.num_unfinished_requests.remote().result() >= 1
    deadline = time.monotonic() + 20
    while engine_handle.num_unfinished_requests.remote().result() > 0:
        assert time.monotonic() < deadline, "the engine kept generating for a client that left"
        time.sleep(0.25)


def test_deadline_aborts_the_engine_request(server, engine_handle):
    """A local stream whose deadline (X-Tuneserve-Timeout) passes ends with an error event, and its engine
    request is aborted rather than left to generate its 900 tokens."""
    body = {"model": MODEL_ID, "messages": FRANCE, "max_tokens": 900, "ignore_eos": True, "stream": True,
            "provider": {"only": ["local"]}}
    headers = {"Authorization": f"Bearer {TEST_KEY}", "X-Tuneserve-Timeout": "4"}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=60, headers=headers) as response:
        lines = [line for line in response.iter_lines() if line]
    assert response.status_code == 200 and lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["error"]["code"] == "deadline_exceeded"
    assert sum(line.startswith("data: {") for line in lines) > 2  # tokens came before the deadline
    deadline = time.monotonic() + 10
    while engine_handle.num_unfinished_requests.remote().result() > 0:
        assert time.monotonic() < deadline, "the engine kept generating after the request's deadline"
        time.sleep(0.25)


def test_health_and_metrics(server, client):
    client.chat.completions.create(model=MODEL_ID, messages=FRANCE, max_tokens=2)
    health = httpx.get(f"{server}/health", timeout=30)
    assert health.status_code == 200 and health.json()["models"] == {MODEL_ID: "ok", EMBED_MODEL_ID: "ok"}
    # /metrics names keys and their spend: with keys configured it takes an admin key
    assert httpx.get(f"{server}/metrics", timeout=30).status_code == 401
    not_admin = httpx.get(f"{server}/metrics", timeout=30, headers={"Authorization": f"Bearer {KEYS['restricted'][0]}"})
    assert not_admin.status_code == 403 and not_admin.json()["error"]["code"] == "not_admin"
    # Cluster-wide figures from Ray's metrics export: the ingress's own, and vLLM's engine metrics. The engine's
    # gauges are exported while it works (Ray drops a gauge nobody refreshed), so a long stream runs meanwhile.
    body = {"model": MODEL_ID, "messages": FRANCE, "max_tokens": 600, "ignore_eos": True, "stream": True,
            "provider": {"only": ["local"]}}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {TEST_KEY}"}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        metrics = scrape(server, [
            f'ray_tuneserve_requests_total{{app="tuneserve",endpoint="chat",model="{MODEL_ID}",status="200"}}',
            "ray_tuneserve_time_to_first_token_seconds_bucket", "ray_tuneserve_request_latency_seconds_bucket",
            "ray_tuneserve_completion_tokens_total", "ray_tuneserve_prompt_tokens_total",
            "ray_vllm_num_requests_running{", "ray_vllm_num_requests_waiting{",
            "ray_vllm_kv_cache_usage_perc{", "ray_vllm_prefix_cache_queries_total{"])
    assert "WorkerId" not in metrics  # summed over processes


def test_health_while_every_engine_slot_is_busy(server):
    """A saturated but healthy engine is healthy: /health reads Serve's replica states and sends the engines
    nothing. A probe that made an ordinary engine call failed here: 503, "unhealthy: TimeoutError" after 10 s,
    the call queued behind the 8 busy slots."""
    import contextlib

    body = {"model": MODEL_ID, "messages": FRANCE, "max_tokens": 300, "ignore_eos": True, "stream": True,
            "provider": {"only": ["local"]}}
    readers = []  # a dropped line iterator closes its response (httpx): these keep the streams open
    with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {TEST_KEY}"}) as http, \
            contextlib.ExitStack() as streams:
        for _ in range(ENGINE_MAX_ONGOING):  # every slot holds a long stream that has begun
            response = streams.enter_context(http.stream("POST", f"{server}/v1/chat/completions", json=body))
            assert response.status_code == 200 and response.headers["X-Tuneserve-Provider"] == "local"
            readers.append(response.iter_lines())
            assert next(readers[-1]).startswith("data: ")
        started = time.perf_counter()
        health = httpx.get(f"{server}/health", timeout=30)
        elapsed = time.perf_counter() - started
    assert health.status_code == 200, health.text
    assert health.json()["models"][MODEL_ID] == "ok" and elapsed < 3.0, elapsed


# Requests of the burst beyond the queue's bound.
BURST_EXTRA = 6


def test_overload_is_shed_at_once(server):
    """Every engine slot busy and the ingress's queue for it full: the next requests get a 503 with
    Retry-After at once (no retries against a busy engine, no breaker count); the queued ones are served."""
    import concurrent.futures
    import contextlib

    headers = {"Authorization": f"Bearer {TEST_KEY}"}
    local = {"model": MODEL_ID, "messages": FRANCE, "provider": {"only": ["local"]}}
    long_body = {**local, "max_tokens": 300, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=120, headers=headers) as http, contextlib.ExitStack() as streams, \
            concurrent.futures.ThreadPoolExecutor(ENGINE_MAX_QUEUED + BURST_EXTRA) as pool:
        readers = []  # a dropped line iterator closes its response (httpx): these keep the streams open
        for _ in range(ENGINE_MAX_ONGOING):
            response = streams.enter_context(http.stream("POST", f"{server}/v1/chat/completions", json=long_body))
            assert response.status_code == 200
            readers.append(response.iter_lines())
            assert next(readers[-1]).startswith("data: ")
        def short() -> tuple[httpx.Response, float]:
            started = time.perf_counter()
            response = http.post(f"{server}/v1/chat/completions", json={**local, "max_tokens": 2})
            return response, time.perf_counter() - started

        burst = [pool.submit(short) for _ in range(ENGINE_MAX_QUEUED + BURST_EXTRA)]
        deadline = time.monotonic() + 30
        while sum(f.done() for f in burst) < BURST_EXTRA:  # the queue fills; the rest are shed at once
            assert time.monotonic() < deadline, [f.result().status_code for f in burst if f.done()]
            time.sleep(0.05)
        streams.close()  # the long streams end: the queued requests get their slots
        results = [future.result(timeout=120) for future in burst]
    shed = [(r, t) for r, t in results if r.status_code == 503]
    assert {r.status_code for r, _ in results} <= {200, 503}, [r.text for r, _ in results]
    assert len(shed) >= 2 and len(results) - len(shed) >= ENGINE_MAX_QUEUED, [r.status_code for r, _ in results]
    for response, elapsed in shed:
        assert elapsed < 2.0 and response.headers["Retry-After"] == "1", (elapsed, response.headers)
        assert "local: overloaded" in response.json()["error"]["message"]
    usage = httpx.get(f"{server}/admin/usage", headers=headers, timeout=30).json()
    assert usage["providers"]["local"]["models"][MODEL_ID]["consecutive_failures"] == 0


def test_engine_reports_its_model(engine_handle):
    from tests.conftest import TEST_MAX_MODEL_LEN

    info = engine_handle.model_info.remote().result()
    assert info["id"] == MODEL_ID and info["max_model_len"] == TEST_MAX_MODEL_LEN
    assert info["root"].endswith("smollm2-135m-instruct") and info["task"] == "generate"
