"""The router end to end: real upstream servers on 127.0.0.1 (vLLM's own server, and misbehaving ones),
real Serve app, official openai client."""

from __future__ import annotations

import hashlib
import json
import time

import httpx
import openai
import pytest

from tests.conftest import KEYS, MODEL_ID, TEST_KEY, scrape

HI = [{"role": "user", "content": "Say hi."}]


def routed(client, **kwargs):
    """A chat completion plus the response headers that say who served it."""
    raw = client.chat.completions.with_raw_response.create(messages=HI, max_tokens=4, **kwargs)
    return raw.parse(), raw.headers


def prefs(**provider) -> dict:
    return {"extra_body": {"provider": provider}}


def test_models_list_has_local_remote_and_aliases(client):
    models = {m.id: m for m in client.models.list().data}
    assert models[MODEL_ID].providers == ["local", "vllm"] and models[MODEL_ID].owned_by == "tuneserve"
    assert set(models["echo-model"].providers) >= {"fast", "cheap", "flaky"}
    assert models["smart"].owned_by == "alias" and models["smart"].alias_of == ["lonely-model", "echo-model"]


def test_local_first_by_default_and_order_picks_remote_vllm(client):
    reply, headers = routed(client, model=MODEL_ID, temperature=0)
    assert headers["x-tuneserve-provider"] == "local" and reply.provider == "local"
    reply, headers = routed(client, model=MODEL_ID, temperature=0, **prefs(order=["vllm"]))
    assert headers["x-tuneserve-provider"] == "vllm"
    assert reply.model == MODEL_ID and reply.choices[0].message.content
    assert reply.usage.completion_tokens > 0
    # cost from the vllm provider's prices: 0.5 and 1.0 USD per million tokens
    expected = (reply.usage.prompt_tokens * 0.5 + reply.usage.completion_tokens * 1.0) / 1e6
    assert reply.usage.cost == pytest.approx(expected)


def test_stream_through_remote_vllm(client):
    chunks = list(client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=24,
        temperature=0, stream=True, stream_options={"include_usage": True}, extra_body={"provider": {"only": ["vllm"]}}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert chunks[-1].usage.completion_tokens > 0 and chunks[-1].usage.cost > 0


def test_sort_by_price_and_max_price(client):
    _, headers = routed(client, model="echo-model", **prefs(sort="price", ignore=["switchy"]))
    assert headers["x-tuneserve-provider"] == "cheap"
    _, headers = routed(client, model="echo-model", **prefs(max_price={"completion": 0.03}, only=["fast", "cheap"]))
    assert headers["x-tuneserve-provider"] == "cheap"
    with pytest.raises(openai.BadRequestError) as caught:
        routed(client, model="echo-model", **prefs(max_price={"prompt": 0.001}))
    assert "max_price.prompt" in caught.value.message


def test_sort_by_latency_and_throughput_uses_live_measurements(client):
    for provider in ("slowpoke", "fast"):
        routed(client, model="echo-model", **prefs(only=[provider]))
    for sort in ("latency", "throughput"):
        _, headers = routed(client, model="echo-model", **prefs(sort=sort, only=["slowpoke", "fast"]))
        assert headers["x-tuneserve-provider"] == "fast", sort


def test_fallback_on_429_500_and_timeout_is_invisible(client):
    for failing, reason in (("flaky", "429"), ("broken", "500"), ("hanging", "timeout")):
        reply, headers = routed(client, model="echo-model", **prefs(order=[failing, "fast"]))
        assert headers["x-tuneserve-provider"] == "fast"
        assert reply.choices[0].message.content.startswith("tok0")
        attempts = headers["x-tuneserve-attempts"].split(",")
        assert attempts[-1] == "fast:ok" and f"{failing}:{reason}" in attempts


def test_retry_after_is_respected_or_skipped(client):
    started = time.monotonic()
    _, headers = routed(client, model="echo-model", **prefs(order=["flaky", "fast"]))
    assert headers["x-tuneserve-attempts"] == "flaky:429,flaky:429,fast:ok"
    assert time.monotonic() - started >= 1.0  # waited the upstream's Retry-After: 1 once
    started = time.monotonic()
    _, headers = routed(client, model="echo-model", **prefs(order=["patient", "fast"]))
    assert headers["x-tuneserve-attempts"] == "patient:429,fast:ok"  # 30 s is past the cap: move on
    assert time.monotonic() - started < 5


def test_no_fallback_when_disallowed(client):
    with pytest.raises(openai.APIStatusError) as caught:
        routed(client, model="echo-model", **prefs(order=["broken"], allow_fallbacks=False))
    assert caught.value.status_code == 503 and "broken: 500" in caught.value.message


def test_client_error_passes_through_without_fallback(client, upstreams):
    before = upstreams["alpha"].app.state.calls["echo"]
    with pytest.raises(openai.BadRequestError) as caught:
        routed(client, model="echo-model", **prefs(order=["picky", "fast"]))
    assert "Upstream says" in caught.value.message
    assert upstreams["alpha"].app.state.calls["echo"] == before  # "fast" was never tried


def test_error_after_first_byte_ends_stream_with_error_event(server):
    body = {"model": "echo-model", "messages": HI, "max_tokens": 8, "stream": True,
            "provider": {"order": ["dropper", "fast"]}}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {TEST_KEY}"}) as response:
        assert response.status_code == 200 and response.headers["x-tuneserve-provider"] == "dropper"
        lines = [line for line in response.iter_lines() if line]
    events = [json.loads(line[6:]) for line in lines if line != "data: [DONE]"]
    assert [e["choices"][0]["delta"]["content"] for e in events[:-1]] == ["tok0 ", "tok1 "]
    assert events[-1]["error"]["code"] == "provider_error" and lines[-1] == "data: [DONE]"


def test_dropped_non_stream_answer_falls_back(client):
    """A non-streamed answer reaches the client only whole, so an upstream that drops it half-way is an
    ordinary failure: retried, then the next provider answers."""
    reply, headers = routed(client, model="echo-model", **prefs(order=["dropper", "fast"]))
    assert headers["x-tuneserve-attempts"] == "dropper:disconnect,dropper:disconnect,fast:ok"
    assert reply.choices[0].message.content.startswith("tok0")


def test_model_level_fallback_and_aliases(client):
    reply, headers = routed(client, model="lonely-model", extra_body={"models": ["echo-model"],
                                                                      "provider": {"only": ["broken-only", "fast"]}})
    assert reply.model == "echo-model" and headers["x-tuneserve-provider"] == "fast"
    reply, headers = routed(client, model="smart", **prefs(ignore=["switchy", "broken", "flaky", "hanging",
                                                                   "dropper", "picky", "patient"]))
    assert reply.model == "echo-model"
    assert headers["x-tuneserve-attempts"].startswith("broken-only:500")


def test_require_parameters(client):
    _, headers = routed(client, model="echo-model", seed=3, **prefs(only=["limited-params", "fast"],
                                                                      order=["limited-params", "fast"]))
    assert headers["x-tuneserve-provider"] == "limited-params"  # without require_parameters: ignored
    _, headers = routed(client, model="echo-model", seed=3, **prefs(only=["limited-params", "fast"],
                                                                      order=["limited-params", "fast"],
                                                                      require_parameters=True))
    assert headers["x-tuneserve-provider"] == "fast"


def test_circuit_breaker_opens_and_probes(client, upstreams):
    beta = upstreams["beta"]
    httpx.post(beta.url.removesuffix("/v1") + "/control", json={"failing": True})
    try:
        for _ in range(2):
            with pytest.raises(openai.APIStatusError):
                routed(client, model="echo-model", **prefs(only=["switchy"]))
        calls = beta.app.state.calls["switch"]
        with pytest.raises(openai.APIStatusError) as caught:
            routed(client, model="echo-model", **prefs(only=["switchy"]))
        assert "switchy: circuit_open" in caught.value.message
        assert beta.app.state.calls["switch"] == calls  # an open circuit sends nothing upstream
    finally:
        httpx.post(beta.url.removesuffix("/v1") + "/control", json={"failing": False})
    time.sleep(2.2)  # cooldown: the next request is a probe, and it succeeds
    _, headers = routed(client, model="echo-model", **prefs(only=["switchy"]))
    assert headers["x-tuneserve-provider"] == "switchy"
    _, headers = routed(client, model="echo-model", **prefs(only=["switchy"]))
    assert headers["x-tuneserve-provider"] == "switchy"


@pytest.mark.parametrize("provider,needle", [
    ({"sort": "cheapest"}, "provider.sort"),
    ({"orderr": ["fast"]}, "provider.orderr"),
    ({"order": ["nope"]}, "unknown providers: nope"),
    ({"max_price": {"prompt": -1}}, "provider.max_price.prompt"),
    ({"allow_fallbacks": "sometimes"}, "provider.allow_fallbacks"),
    ("fast", "provider"),
])
def test_bad_preferences_are_400(http, provider, needle):
    response = http.post("/v1/chat/completions", json={"model": "echo-model", "messages": HI, "provider": provider})
    assert response.status_code == 400, response.text
    assert needle in response.json()["error"]["message"] + str(response.json()["error"]["param"])


def test_bad_models_list(http):
    response = http.post("/v1/chat/completions", json={"model": "echo-model", "messages": HI, "models": "x"})
    assert response.status_code == 400
    response = http.post("/v1/chat/completions", json={"model": "echo-model", "messages": HI, "models": ["nope"]})
    assert response.status_code == 404


def _key_client(server, name):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEYS[name][0], max_retries=0)


def test_rate_limit_requests_per_minute(server):
    limited = _key_client(server, "limited")
    for _ in range(2):
        routed(limited, model="echo-model", **prefs(only=["fast"]))
    with pytest.raises(openai.RateLimitError) as caught:
        routed(limited, model="echo-model", **prefs(only=["fast"]))
    assert int(caught.value.response.headers["retry-after"]) >= 1


def test_rate_limit_tokens_per_minute(server):
    """tpm 40: each request reserves its prompt plus max_tokens at admission (~10 + 4 here)."""
    tokens = _key_client(server, "tokens")
    reply, _ = routed(tokens, model="echo-model", **prefs(only=["fast"]))
    assert reply.usage.total_tokens < 20
    with pytest.raises(openai.RateLimitError) as caught:  # could use 40 + its prompt: never admissible
        tokens.chat.completions.create(model="echo-model", messages=HI, max_tokens=40,
                                       extra_body={"provider": {"only": ["fast"]}})
    assert "Request too large" in caught.value.message
    routed(tokens, model="echo-model", **prefs(only=["fast"]))  # ~28 of 40 used
    with pytest.raises(openai.RateLimitError):
        routed(tokens, model="echo-model", **prefs(only=["fast"]))


def test_allowed_models_per_key(server):
    restricted = _key_client(server, "restricted")
    routed(restricted, model="echo-model", **prefs(only=["fast"]))
    with pytest.raises(openai.PermissionDeniedError) as caught:
        routed(restricted, model=MODEL_ID)
    assert caught.value.body["code"] == "model_not_allowed"


def test_usage_and_cost_per_key(server, client):
    reply, _ = routed(client, model="echo-model", **prefs(only=["cheap"]))
    assert reply.usage.cost == pytest.approx((reply.usage.prompt_tokens * 0.01 + 4 * 0.02) / 1e6)
    usage = httpx.get(f"{server}/admin/usage", headers={"Authorization": f"Bearer {TEST_KEY}"}, timeout=30).json()
    assert usage["keys"]["tests"]["requests"] > 0 and usage["keys"]["tests"]["cost_usd"] > 0
    assert usage["providers"]["cheap"]["circuit"] == "closed"
    denied = httpx.get(f"{server}/admin/usage", headers={"Authorization": f"Bearer {KEYS['limited'][0]}"})
    assert denied.status_code == 403
    # metrics name a key by its id (a digest's first 8 hex digits), never by its name
    key_id = f"key-{hashlib.sha256(TEST_KEY.encode()).hexdigest()[:8]}"
    text = scrape(server, [f'ray_tuneserve_key_cost_usd_total{{app="tuneserve",key="{key_id}"}}',
                           'ray_tuneserve_provider_attempts_total{app="tuneserve",outcome="ok",provider="cheap"}'])
    assert not [name for name in KEYS if f'key="{name}"' in text]
