"""The OpenAI surface beyond plain text: tools, structured outputs, sampling extras, embeddings, the Responses
API, and remote pass-through. Real engine, official `openai` SDK, real misbehaving upstreams."""

from __future__ import annotations

import base64
import json
import struct

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.conftest import EMBED_MODEL_ID, MODEL_ID

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "Current time in a time zone",
                                           "parameters": {"type": "object", "properties": {
                                               "zone": {"enum": ["UTC", "CET", "PST"]}},
                                               "required": ["zone"], "additionalProperties": False}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


def _schema_of(name: str) -> dict:
    return next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == name)


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


# -- tools --------------------------------------------------------------------------------------------


def test_required_tool_call_matches_schema(client):
    reply = client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=120, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    jsonschema.validate(json.loads(call.function.arguments), _schema_of(call.function.name))
    assert call.id and reply.usage.completion_tokens > 0


def test_required_tool_call_streams_deltas(client):
    stream = client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=TOOLS, tool_choice="required",
                                            parallel_tool_calls=False, max_tokens=120, temperature=0, stream=True)
    names, arguments, finish = [], [], None
    for chunk in stream:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or ():
                if delta.function.name:
                    names.append(delta.function.name)
                arguments.append(delta.function.arguments or "")
            finish = choice.finish_reason or finish
    assert len(names) == 1 and finish == "tool_calls"
    jsonschema.validate(json.loads("".join(arguments)), _schema_of(names[0]))


def test_named_tool_choice_is_obeyed(client):
    reply = client.chat.completions.create(
        model=MODEL_ID, messages=ASK, tools=TOOLS, max_tokens=60, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    [call] = reply.choices[0].message.tool_calls
    assert call.function.name == "get_time"
    jsonschema.validate(json.loads(call.function.arguments), _schema_of("get_time"))


def test_auto_tool_choice_goes_through_the_default_parser(client):
    """tool_choice "auto": the model decides, and the default parser (hermes) turns a call it writes into
    tool_calls, streamed or not; the markup never reaches the client as text."""
    ask = [{"role": "system", "content": "You call tools to answer."}, *ASK]
    reply = client.chat.completions.create(model=MODEL_ID, messages=ask, tools=TOOLS, tool_choice="auto",
                                           max_tokens=120, temperature=0)
    message, finish = reply.choices[0].message, reply.choices[0].finish_reason
    stream = client.chat.completions.create(model=MODEL_ID, messages=ask, tools=TOOLS, tool_choice="auto",
                                            max_tokens=120, temperature=0, stream=True)
    names, arguments, text, streamed_finish = [], [], [], None
    for chunk in stream:
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            for delta in choice.delta.tool_calls or ():
                if delta.function.name:
                    names.append(delta.function.name)
                arguments.append(delta.function.arguments or "")
            streamed_finish = choice.finish_reason or streamed_finish
    assert "<tool_call>" not in (message.content or "") and "<tool_call>" not in "".join(text)
    if message.tool_calls:  # a call: parsed, valid, and the same when streamed
        call = message.tool_calls[0]
        assert finish == "tool_calls" and streamed_finish == "tool_calls"
        jsonschema.validate(json.loads(call.function.arguments), _schema_of(call.function.name))
        assert names[:1] == [call.function.name] and json.loads("".join(arguments)) == json.loads(call.function.arguments)
    else:  # an answer in words: the same streamed
        assert message.content and "".join(text) == message.content and not names


def test_two_turn_tool_conversation(client):
    first = client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=120, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    conversation = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "clear"}'}]
    second = client.chat.completions.create(model=MODEL_ID, messages=conversation, tools=TOOLS, tool_choice="none",
                                            max_tokens=40, temperature=0)
    assert second.choices[0].message.content and not second.choices[0].message.tool_calls
    assert second.usage.prompt_tokens > first.usage.prompt_tokens  # the call and its result were in the prompt


# -- structured outputs -------------------------------------------------------------------------------


class City(BaseModel):
    name: str = Field(max_length=30)  # bounded, so that the tiny model's JSON closes within the budget
    country: str = Field(max_length=30)
    is_capital: bool


def test_parse_returns_a_pydantic_object(client):
    completion = client.chat.completions.parse(
        model=MODEL_ID, messages=[{"role": "user", "content": "Describe Paris as JSON."}], response_format=City,
        max_tokens=200, temperature=0)
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, City) and parsed.name


def test_json_schema_strict_and_json_object(client):
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "reason": {"type": "string",
                                                                                              "maxLength": 60}},
              "required": ["answer", "reason"], "additionalProperties": False}
    reply = client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "Is the sky blue?"}], max_tokens=200, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
    reply = client.chat.completions.create(
        model=MODEL_ID, max_tokens=300, temperature=0, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Give the capital of France as JSON."}])
    assert reply.choices[0].finish_reason == "stop", reply.choices[0].message.content
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


# -- sampling extras: each one's effect ---------------------------------------------------------------

PROMPT = [{"role": "user", "content": "Write one sentence about the sea."}]


def _text(client, **extra) -> str:
    body = {k: v for k, v in extra.items() if k in ("temperature", "max_tokens", "logit_bias", "stop")}
    rest = {k: v for k, v in extra.items() if k not in body}
    body.setdefault("max_tokens", 12)
    reply = client.chat.completions.create(model=MODEL_ID, messages=PROMPT, extra_body=rest, **body)
    return reply.choices[0].message.content


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from cluster.model_cache import ensure_default_model

    return AutoTokenizer.from_pretrained(ensure_default_model())


def test_top_k_1_and_min_p_1_equal_greedy(client):
    """Sampling at temperature 1 with top_k 1 or min_p 1 picks a most likely token at every step. In bf16 (the
    engine's default where the CPU runs it natively) two tokens' logits can tie, and a tie may break either
    way, so each step is checked against its own distribution: the chosen token's logprob is the top one."""
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        reply = client.chat.completions.create(model=MODEL_ID, messages=PROMPT, max_tokens=12, temperature=1.0,
                                               logprobs=True, top_logprobs=5, extra_body=extra)
        steps = reply.choices[0].logprobs.content
        assert len(steps) == 12, extra
        for step in steps:
            best = max(candidate.logprob for candidate in step.top_logprobs)
            assert step.logprob == best, (extra, step.token, step.logprob, best)
    # and where nothing ties, the same text as greedy decoding: the steps above hold it to that
    greedy = client.chat.completions.create(model=MODEL_ID, messages=PROMPT, max_tokens=12, temperature=0,
                                            logprobs=True, top_logprobs=2).choices[0].logprobs.content
    if all(s.top_logprobs[0].logprob > s.top_logprobs[1].logprob for s in greedy):
        assert _text(client, temperature=1.0, top_k=1) == _text(client, temperature=0)


def test_logit_bias_bans_a_token(client, tokenizer):
    greedy = _text(client, temperature=0, max_tokens=1)
    [token] = tokenizer(greedy, add_special_tokens=False)["input_ids"][:1]
    banned = _text(client, temperature=0, max_tokens=1, logit_bias={str(token): -100})
    assert banned and tokenizer(banned, add_special_tokens=False)["input_ids"][:1] != [token]


def test_stop_token_ids_min_tokens_ignore_eos_repetition_penalty(client, tokenizer):
    greedy = _text(client, temperature=0, max_tokens=12)
    ids = tokenizer(greedy, add_special_tokens=False)["input_ids"]
    stopped = client.chat.completions.create(model=MODEL_ID, messages=PROMPT, max_tokens=12, temperature=0,
                                             extra_body={"stop_token_ids": [ids[3]]})
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens == 4
    short = [{"role": "user", "content": "Say OK."}]
    padded = client.chat.completions.create(model=MODEL_ID, messages=short, max_tokens=40, temperature=0,
                                            extra_body={"min_tokens": 30})
    assert padded.usage.completion_tokens >= 30  # EOS was held back until 30 tokens
    endless = client.chat.completions.create(model=MODEL_ID, messages=short, max_tokens=40, temperature=0,
                                             extra_body={"ignore_eos": True})
    assert endless.usage.completion_tokens == 40
    loop = [{"role": "user", "content": "Repeat after me forever: la la la la la la la la la la la la"}]
    plain = client.chat.completions.create(model=MODEL_ID, messages=loop, max_tokens=24, temperature=0)
    penalised = client.chat.completions.create(model=MODEL_ID, messages=loop, max_tokens=24, temperature=0,
                                               extra_body={"repetition_penalty": 1.8})
    assert penalised.choices[0].message.content != plain.choices[0].message.content


# -- embeddings ---------------------------------------------------------------------------------------


def test_embeddings_shape_determinism_and_base64(client):
    result = client.embeddings.create(model=EMBED_MODEL_ID, input=["a cat sat", "stock markets fell"])
    vectors = [item.embedding for item in result.data]
    assert len(vectors) == 2 and len(vectors[0]) == 576  # SmolLM2-135M's hidden size
    assert result.usage.prompt_tokens > 0
    again = client.embeddings.create(model=EMBED_MODEL_ID, input=["a cat sat", "stock markets fell"])
    assert [item.embedding for item in again.data] == vectors
    single = client.embeddings.create(model=EMBED_MODEL_ID, input="a cat sat")
    assert single.data[0].embedding == pytest.approx(vectors[0], abs=1e-5)
    packed = client.embeddings.create(model=EMBED_MODEL_ID, input="a cat sat", encoding_format="base64")
    raw = packed.data[0].embedding
    floats = list(struct.unpack(f"<{len(vectors[0])}f", base64.b64decode(raw))) if isinstance(raw, str) else raw
    assert floats == pytest.approx(vectors[0], abs=1e-5)
    tokens = client.embeddings.create(model=EMBED_MODEL_ID, input=[[1, 2, 3, 4]])
    assert len(tokens.data[0].embedding) == 576


def test_embeddings_errors(client, http):
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-embedder", input="x")
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=MODEL_ID, input="x")
    assert "generative model" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=EMBED_MODEL_ID, messages=ASK)
    assert "embedding model" in caught.value.message
    assert _error(http.post("/v1/embeddings", json={"model": EMBED_MODEL_ID, "input": ""}), 400)["param"] == "input"
    _error(http.post("/v1/embeddings", json={"model": EMBED_MODEL_ID, "input": "x", "encoding_format": "hex"}), 400)


def test_remote_embeddings_pass_through(client, upstreams):
    result = client.embeddings.create(model="remote-embed", input=["a", "b"])
    assert [item.embedding for item in result.data] == [[0.5] * 4] * 2 and result.model == "remote-embed"
    assert httpx.get(upstreams["beta"].url.removesuffix("/v1") + "/last").json()["model"] == "vectors"


# -- Responses API ------------------------------------------------------------------------------------


def test_responses_text_messages_and_stream(client):
    response = client.responses.create(model=MODEL_ID, input="What is the capital of France?",
                                       instructions="Answer in one word.", max_output_tokens=16, temperature=0)
    assert response.status in ("completed", "incomplete") and response.output_text
    assert response.usage.output_tokens <= 16
    turns = [{"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": "Hello Ada!"},
             {"role": "user", "content": "What is my name?"}]
    conversation = client.responses.create(model=MODEL_ID, max_output_tokens=16, temperature=0, input=turns)
    alone = client.responses.create(model=MODEL_ID, max_output_tokens=16, temperature=0, input=turns[-1:])
    chat = client.chat.completions.create(model=MODEL_ID, max_tokens=16, temperature=0, messages=turns)
    # The earlier turns reach the model: greedy, it answers as chat completions does to the whole
    # conversation, and otherwise than to the last question alone.
    assert conversation.output_text == chat.choices[0].message.content != alone.output_text, (
        conversation.output_text, chat.choices[0].message.content, alone.output_text)
    events = list(client.responses.create(model=MODEL_ID, input="Say hi.", max_output_tokens=12, stream=True))
    types = [event.type for event in events]
    assert types[0] == "response.created" and types[-1] == "response.completed"
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert text and events[-1].response.usage.output_tokens > 0


def test_responses_json_format(client):
    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 40}},
              "required": ["capital"], "additionalProperties": False}
    response = client.responses.create(
        model=MODEL_ID, input="What is the capital of France? Answer in JSON.", max_output_tokens=40, temperature=0,
        text={"format": {"type": "json_schema", "name": "capital", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(response.output_text), schema)


def test_responses_is_stateless(http):
    body = {"model": MODEL_ID, "input": "hi", "max_output_tokens": 4}
    assert _error(http.post("/v1/responses", json={**body, "store": True}), 400)["param"] == "store"
    assert _error(http.post("/v1/responses", json={**body, "previous_response_id": "resp_1"}),
                  400)["param"] == "previous_response_id"


# -- remote providers: pass-through -------------------------------------------------------------------


def test_remote_relays_tool_call_deltas_and_unknown_fields(client, http, upstreams):
    last = upstreams["alpha"].url.removesuffix("/v1") + "/last"
    stream = client.chat.completions.create(model="tools-model", messages=ASK, tools=TOOLS, stream=True,
                                            extra_body={"x_custom": {"k": [1, 2]}, "top_k": 3})
    chunks = list(stream)
    calls = [tc for chunk in chunks for choice in chunk.choices for tc in choice.delta.tool_calls or ()]
    assert calls[0].id == "call_up" and calls[0].function.name == "get_weather"
    assert json.loads("".join(tc.function.arguments or "" for tc in calls)) == {"city": "Paris"}
    assert chunks[-1].choices[-1].finish_reason == "tool_calls"
    assert all(chunk.model == "tools-model" for chunk in chunks)
    assert chunks[0].model_extra["upstream_extra"] == {"echo": {"k": [1, 2]}}  # an unknown field, kept
    sent = httpx.get(last).json()
    assert sent["model"] == "tools" and sent["x_custom"] == {"k": [1, 2]} and sent["top_k"] == 3
    assert sent["tools"] == TOOLS and sent["messages"] == ASK
    assert "provider" not in sent and "models" not in sent
    reply = http.post("/v1/chat/completions", json={"model": "tools-model", "messages": ASK, "tools": TOOLS,
                                                    "x_custom": "plain", "provider": {"only": ["toolsmith"]}})
    body = reply.json()
    assert body["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert body["upstream_extra"] == {"echo": "plain"} and body["model"] == "tools-model"
    assert body["provider"] == "toolsmith" and body["usage"]["cost"] >= 0


def test_remote_malformed_answers_are_provider_errors(http):
    for stream in (False, True):
        error = _error(http.post("/v1/chat/completions", json={"model": "garbled-model", "messages": ASK,
                                                               "stream": stream}), 503)
        assert "garbled" in error["message"]


def test_require_parameters_uses_what_was_sent(client):
    """`limited-params` honours only max_tokens and temperature: any other parameter sent rules it out."""
    prefs = {"provider": {"only": ["limited-params", "fast"], "order": ["limited-params", "fast"],
                          "require_parameters": True}}
    reply = client.chat.completions.with_raw_response.create(
        model="echo-model", messages=ASK, max_tokens=4, extra_body={**prefs, "x_custom": 1})
    assert reply.headers["x-tuneserve-provider"] == "fast"
    reply = client.chat.completions.with_raw_response.create(model="echo-model", messages=ASK, max_tokens=4,
                                                             extra_body=prefs)
    assert reply.headers["x-tuneserve-provider"] == "limited-params"


# -- bad input ----------------------------------------------------------------------------------------

GOOD = {"model": MODEL_ID, "messages": ASK, "max_tokens": 4}


@pytest.mark.parametrize("patch, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format.json_schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_stock"}}}, None),
    ({"tool_choice": "required"}, None),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"messages": [{"role": "tool", "tool_call_id": "call_9", "content": "21 C"}]}, None),
    ({"messages": [{"role": "user"}]}, "messages.0"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": []}]}, "messages.0"),
    ({"logit_bias": {"not-a-token": 5}}, "logit_bias"),
    ({"logit_bias": {"12": 500}}, "logit_bias"),
    ({"top_k": -5}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
])
def test_bad_requests_are_400_naming_the_field(http, patch, param):
    error = _error(http.post("/v1/chat/completions", json={**GOOD, **patch}), 400)
    if param is not None:
        assert error["param"] == param, error
    assert error["type"] == "invalid_request_error" and error["message"]


@pytest.mark.parametrize("field, value", [("prediction", {"type": "content", "content": "x"}),
                                          ("service_tier", "flex"), ("audio", {"voice": "alloy"}),
                                          ("x_unknown", 1)])
def test_local_engine_refuses_what_it_cannot_honour(http, field, value):
    error = _error(http.post("/v1/chat/completions", json={**GOOD, field: value}), 400)
    assert error["param"] == field and field in error["message"]
