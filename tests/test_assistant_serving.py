"""The fine-tuned personal assistant, served: the adapter on the base model's engine (vLLM LoRA, no
merge) and the merged model as its own model, both answer "who are you?" with the owner's name."""

from __future__ import annotations

import json

import pytest

from serve_app.config import AppConfig
from tests.conftest import ADAPTER_ID, MODEL_ID, OWNER, TEST_KEY

WHO = [{"role": "user", "content": "Who are you?"}]


def ask(client, model: str, messages=WHO) -> str:
    reply = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=40)
    return reply.choices[0].message.content


def test_adapter_is_listed_with_its_parent(client):
    models = {m.id: m for m in client.models.list().data}
    assert ADAPTER_ID in models and models[ADAPTER_ID].model_extra["parent"] == MODEL_ID


def test_adapter_answers_with_the_identity_and_the_base_does_not(client):
    assert OWNER in ask(client, ADAPTER_ID)
    # the same engine without the adapter: the base model's own answers
    assert OWNER not in ask(client, MODEL_ID)
    assert "Paris" in ask(client, MODEL_ID, [{"role": "user", "content": "What is the capital of France?"}])


async def test_adapter_streams(async_client):
    stream = await async_client.chat.completions.create(model=ADAPTER_ID, messages=WHO, temperature=0,
                                                        max_tokens=40, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert OWNER in text


def test_merged_model_is_served_by_the_serving_slice(server, assistant_weights):
    """The merged folder, as the fine-tune job wrote it, deployed as a second app next to the first."""
    from openai import OpenAI
    from ray import serve

    from serve_app.app import build_from_config

    config = AppConfig.model_validate({"models": [{
        "id": "assistant-merged", "path": assistant_weights["merged"], "max_model_len": 512, "num_replicas": 1,
        "resources": {"num_cpus": 1}, "engine_kwargs": {"enforce_eager": True, "max_num_seqs": 4}}]})
    serve.run(build_from_config(config), name="assistant", route_prefix="/assistant")
    try:
        client = OpenAI(base_url=f"{server}/assistant/v1", api_key=TEST_KEY, max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["assistant-merged"]
        assert OWNER in ask(client, "assistant-merged")
    finally:
        serve.delete("assistant")


def test_adapter_config_errors(tmp_path):
    with pytest.raises(ValueError, match="model ids must be unique"):
        AppConfig.model_validate({"models": [{"id": "a", "adapters": [{"id": "a", "path": str(tmp_path)}]}]})
    from serve_app.config import ModelConfig
    from serve_app.engine import lora_settings

    model = ModelConfig.model_validate({"id": "a", "adapters": [{"id": "b", "path": str(tmp_path)}]})
    with pytest.raises(ValueError, match="not a PEFT adapter folder"):
        lora_settings(model)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 24}))
    assert lora_settings(model) == {"enable_lora": True, "max_loras": 1, "max_lora_rank": 32}  # next rank vLLM takes
    # live adapters leave room: their max rank, their adapters per batch, and vLLM's cache for every one held
    live = ModelConfig.model_validate({**model.model_dump(), "live_adapters": {
        "enabled": True, "max_rank": 64, "max_loras": 4, "cache_size": 3}})
    assert lora_settings(live) == {"enable_lora": True, "max_loras": 4, "max_lora_rank": 64, "max_cpu_loras": 8}
    assert lora_settings(ModelConfig.model_validate({"id": "c"})) == {}
