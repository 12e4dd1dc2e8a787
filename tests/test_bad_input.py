"""Every bad request gets OpenAI's error JSON with the right status, and the server keeps serving."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import MODEL_ID, TEST_MAX_MODEL_LEN

GOOD = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def _error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    return error


@pytest.fixture(autouse=True)
def still_serving(http):
    """After each bad request, a good one still succeeds."""
    yield
    response = http.post("/v1/chat/completions", json=GOOD)
    assert response.status_code == 200, response.text


def test_malformed_json(http):
    response = http.post("/v1/chat/completions", content=b'{"model": "x", "messages": [',
                         headers={"Content-Type": "application/json"})
    assert _error(response, 400)["code"] == "invalid_json"


def test_body_not_an_object(http):
    _error(http.post("/v1/chat/completions", json=[1, 2, 3]), 400)
    _error(http.post("/v1/chat/completions", content=b""), 400)


def test_missing_messages(http):
    error = _error(http.post("/v1/chat/completions", json={"model": MODEL_ID}), 400)
    assert error["param"] == "messages" and "messages" in error["message"]


def test_empty_messages(http):
    error = _error(http.post("/v1/chat/completions", json={**GOOD, "messages": []}), 400)
    assert error["param"] == "messages"


def test_unsupported_role(http):
    body = {**GOOD, "messages": [{"role": "wizard", "content": "hi"}]}
    error = _error(http.post("/v1/chat/completions", json=body), 400)
    assert error["param"] == "messages.0.role"


def test_unknown_model(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model", messages=GOOD["messages"])
    assert caught.value.status_code == 404
    assert caught.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi")


@pytest.mark.parametrize("max_tokens", [0, -5])
def test_max_tokens_not_positive(http, max_tokens):
    error = _error(http.post("/v1/chat/completions", json={**GOOD, "max_tokens": max_tokens}), 400)
    assert error["param"] == "max_tokens"


def test_max_tokens_above_context_is_capped(client):
    """max_tokens is an upper bound: past the context that is left, vLLM caps it there (documented). The
    prompt fills all but the last few dozen tokens of the context, so the cap is reached in seconds (a short
    prompt made this test generate ~1,000 tokens: a minute on a 2-core CPU)."""
    long_prompt = [{"role": "user", "content": "hello " * (TEST_MAX_MODEL_LEN - 100)}]
    reply = client.chat.completions.create(model=MODEL_ID, messages=long_prompt, max_tokens=TEST_MAX_MODEL_LEN,
                                           extra_body={"ignore_eos": True})
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens > TEST_MAX_MODEL_LEN - 150  # the context left was small, not zero
    assert reply.usage.prompt_tokens + reply.usage.completion_tokens == TEST_MAX_MODEL_LEN


def test_prompt_longer_than_context(client):
    long_text = "hello " * (TEST_MAX_MODEL_LEN + 50)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": long_text}])
    message = caught.value.message
    assert f"maximum context length is {TEST_MAX_MODEL_LEN} tokens" in message
    assert "prompt contains" in message  # names the prompt's token count
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL_ID, prompt=long_text, stream=True)


@pytest.mark.parametrize("field,value", [("temperature", 2.5), ("temperature", -1), ("top_p", 0),
                                         ("top_p", 1.5), ("presence_penalty", 3), ("n", 0),
                                         ("stream", "maybe"), ("stop", 5), ("seed", "x")])
def test_sampling_out_of_range(http, field, value):
    error = _error(http.post("/v1/chat/completions", json={**GOOD, field: value}), 400)
    assert error["param"] == field


def test_n_above_server_limit(http):
    error = _error(http.post("/v1/chat/completions", json={**GOOD, "n": 5}), 400)
    assert error["param"] == "n"


def test_top_logprobs_needs_logprobs(http):
    error = _error(http.post("/v1/chat/completions", json={**GOOD, "top_logprobs": 2}), 400)
    assert "logprobs" in error["message"]


def test_bad_completion_prompts(http):
    body = {"model": MODEL_ID, "prompt": "hi", "max_tokens": 2}
    _error(http.post("/v1/completions", json={**body, "prompt": [999999999]}), 400)
    _error(http.post("/v1/completions", json={**body, "prompt": []}), 400)
    _error(http.post("/v1/completions", json={**body, "prompt": ["x"] * 65}), 400)


def test_body_too_large(http):
    body = {**GOOD, "messages": [{"role": "user", "content": "x" * (300 * 1024)}]}
    error = _error(http.post("/v1/chat/completions", json=body), 413)
    assert "limit" in error["message"]


def test_chunked_body_too_large(http):
    """Without Content-Length (chunked transfer), the limit is counted as the body arrives."""
    import json

    payload = json.dumps({**GOOD, "messages": [{"role": "user", "content": "x" * (300 * 1024)}]}).encode()

    def chunks():
        for start in range(0, len(payload), 16 * 1024):
            yield payload[start:start + 16 * 1024]

    response = http.post("/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert "content-length" not in {k.lower() for k in response.request.headers}
    error = _error(response, 413)
    assert error["code"] == "request_too_large" and "limit" in error["message"]
    small = json.dumps(GOOD).encode()
    assert http.post("/v1/chat/completions", content=iter([small[:10], small[10:]]),
                     headers={"Content-Type": "application/json"}).status_code == 200


def test_missing_and_wrong_api_key(server):
    import httpx

    no_key = httpx.post(f"{server}/v1/chat/completions", json=GOOD, timeout=30)
    assert _error(no_key, 401)["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_unknown_route_and_method(http):
    _error(http.get("/v1/nothing-here"), 404)
    _error(http.get("/v1/chat/completions"), 405)
