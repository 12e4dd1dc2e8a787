"""The engine deployment: one vLLM `AsyncLLM` per replica, served through vLLM's own OpenAI layer.

Each replica runs what `vllm serve` runs (chat, completions, responses, embeddings; tools, tool parsers,
structured outputs) on its AsyncLLM, and streams the OpenAI chunks to the ingress a few steps at a time.
Built on vLLM directly rather than ray.serve.llm, so that a Ray release is never tied to a vLLM release.
Only this module and serve_app/vllm_compat.py import vLLM; only the adapter knows vLLM's versions.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, AsyncIterator

from cluster.engine_defaults import CPU_ENGINE_ENV, resolve_dtype, tensor_parallel_defaults
from serve_app.config import ModelConfig
from serve_app.protocol import LOCAL_PARAMETERS, format_validation_error
from serve_app.providers.base import Piece, Usage

log = logging.getLogger("tuneserve.engine")

# Set in every engine process before vLLM loads its tool parsers. With strict tool calling on (the default
# of both releases), a parser with an xgrammar "structural tag" (hermes, among others) constrains forced
# calls in its own envelope: 0.32 then pins arguments to the schema only for tools sent with strict: true,
# and in 0.26 the envelope allows unbounded whitespace, so a small model ran out of tokens inside it.
# Off, "required" and named calls take vLLM's JSON-schema path in both releases: arguments always match
# the function's parameters, in compact JSON.
ENGINE_ENV = {"VLLM_ENFORCE_STRICT_TOOL_CALLING": "0"}

REGISTRY_REFRESH_TIMEOUT_S = 5.0  # a live adapter's first request waits at most this for the registry


def cpu_cores_for_replica(num_cpus: float, world_size: int, local_rank: int, allowed: list[int]) -> str | None:
    """The cores a CPU engine replica binds vLLM's threads to (VLLM_CPU_OMP_THREADS_BIND), or None for vLLM's
    own binding, which is every core of the node: two replicas on one node then bound their threads to the
    same cores and spun against each other (2 replicas of the default model on this 2-core machine: ~10
    output tokens/s together, where one engine alone gives ~70). A deployment of more than one replica gives
    each its own `num_cpus` cores, by its rank among the deployment's replicas on the node; a lone replica
    keeps every core. (A replica started while it was alone keeps every core when autoscaling adds more.)"""
    if world_size <= 1 or not allowed:
        return None
    count = min(len(allowed), max(1, int(num_cpus)))
    start = (local_rank * count) % len(allowed)
    return ",".join(str(allowed[(start + i) % len(allowed)]) for i in range(count))


def _bind_cpu_engine(model: ModelConfig) -> None:
    from ray import serve
    from ray.serve.exceptions import RayServeException

    if "VLLM_CPU_OMP_THREADS_BIND" in os.environ:  # the operator's own binding wins
        return
    try:
        context = serve.get_replica_context()
    except RayServeException:  # an engine outside Serve (tests/test_vllm_compat.py): alone, vLLM's own binding
        return
    cores = cpu_cores_for_replica(model.resources.num_cpus, context.world_size, context.rank.local_rank,
                                  sorted(os.sched_getaffinity(0)))
    if cores is not None:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cores
        log.info("CPU engine replica %d of %d on this node's cores %s", context.rank.local_rank,
                 context.world_size, cores)


def adapter_folder(path: str) -> Path:
    """The adapter as a folder on this replica's node (a storage URI is fetched into the node's cache)."""
    from cluster.storage import resolve_local

    folder = Path(resolve_local(path)).expanduser().resolve()
    if not (folder / "adapter_config.json").is_file():
        raise ValueError(f"adapter {path}: not a PEFT adapter folder (no adapter_config.json)")
    return folder


def lora_settings(model: ModelConfig) -> dict[str, Any]:
    """vLLM's LoRA engine settings for the configured adapters and, with live adapters on, room for those:
    the smallest rank vLLM accepts that fits every adapter, adapters per batch, and adapters kept in memory."""
    live = model.live_adapters.enabled and model.task == "generate"
    if not model.adapters and not live:
        return {}
    from serve_app.lora_registry import adapter_rank

    ranks = [adapter_rank(json.loads((adapter_folder(a.path) / "adapter_config.json").read_text()), a.path)
             for a in model.adapters]
    rank = max(ranks + ([model.live_adapters.max_rank] if live else []))
    max_loras = max(min(len(model.adapters), 8), model.live_adapters.max_loras if live else 0)
    settings = {"enable_lora": True, "max_loras": max_loras,
                "max_lora_rank": next(r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= rank)}
    if live:  # vLLM's own CPU cache of adapters: every one this replica may hold, and a batch's worth more
        settings["max_cpu_loras"] = len(model.adapters) + model.live_adapters.cache_size + max_loras
    return settings


def adapter_misfit(adapter: Path, model: Path) -> str | None:
    """Why a PEFT LoRA adapter does not fit this base model's weights, or None. Shapes are read from the
    safetensors headers only. vLLM checks the rank and module names, but copies smaller matrices into its
    slots without complaint: an adapter trained on a smaller model of the same kind would load and be wrong."""
    from safetensors import safe_open

    adapter_file = adapter / "adapter_model.safetensors"
    shards = sorted(model.glob("*.safetensors")) if model.is_dir() else []
    if not adapter_file.is_file() or not shards:
        return None  # other formats: vLLM's own checks only
    base: dict[str, list[int]] = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as weights:
            base.update({key: weights.get_slice(key).get_shape() for key in weights.keys()})
    with safe_open(str(adapter_file), framework="pt") as weights:
        for key in weights.keys():
            if ".lora_A." not in key and ".lora_B." not in key:
                continue
            module = key.removeprefix("base_model.model.").split(".lora_")[0]
            shape = weights.get_slice(key).get_shape()
            target = base.get(f"{module}.weight")
            if target is None:
                return f"the base model has no weight {module}.weight (is the adapter for another model?)"
            # lora_A is [rank, in_features], lora_B [out_features, rank]; the base weight is [out, in]
            fits = shape[1] == target[1] if ".lora_A." in key else shape[0] == target[0]
            if not fits:
                return (f"{key} has shape {list(shape)}, but the base model's {module}.weight is {list(target)} "
                        "(the adapter was trained on another model)")
    return None


class AdapterUnavailable(Exception):
    """A live adapter this replica cannot serve: not registered (any more), or vLLM refused its weights."""

    def __init__(self, message: str, status: int = 404):
        super().__init__(message)
        self.status = status


class LoadedAdapter:
    """One registration of a live adapter, loaded into this replica's vLLM. Serve's multiplexing keeps it
    in its LRU cache; when it leaves (or is deleted), its name is unloaded once its streams have finished."""

    def __init__(self, engine: "EngineDeployment", adapter_id: str, seq: int):
        self.engine, self.id, self.seq = engine, adapter_id, seq
        self.in_flight = 0
        self.retired = False  # out of Serve's cache, or deleted: unload when in_flight is 0
        self.deleted = False
        self.loop = asyncio.get_running_loop()

    def __del__(self):
        # Serve's multiplexing calls this (in a worker thread) when the adapter leaves the replica's cache;
        # Python calls it again at collection, by then a no-op.
        if self.retired:
            return
        self.retired = True
        try:
            self.loop.call_soon_threadsafe(self.engine.retire, self)
        except RuntimeError:  # the loop is closed: the replica is gone
            pass


class EngineDeployment:
    """Wrapped with serve.deployment in serve_app/app.py; its options come from ModelConfig."""

    async def __init__(self, model: ModelConfig, on_gpu: bool, registry_path: str | None = None,
                       state_on_head: bool = True):
        tp_kwargs, engine_env = (tensor_parallel_defaults(model.tensor_parallel_size) if on_gpu
                                 else ({}, CPU_ENGINE_ENV))
        for key, value in {**engine_env, **ENGINE_ENV}.items():
            os.environ.setdefault(key, value)
        if not on_gpu:
            _bind_cpu_engine(model)
        from vllm import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        from cluster.model_cache import resolve_model_path
        from serve_app import quantization, vllm_compat

        self.config = model
        self.path = resolve_model_path(model.path)
        self.stream_interval_s = model.stream_interval_ms / 1000.0
        quantized = model.quantization not in ("auto", "none") or bool(
            quantization.folder_method(quantization.read_folder_config(self.path) or {}))
        engine_kwargs: dict[str, Any] = {
            "model": self.path,
            "served_model_name": [model.id],
            "dtype": resolve_dtype(model.dtype, on_gpu, quantized),
            "max_model_len": model.max_model_len,
            "tensor_parallel_size": model.tensor_parallel_size,
            "enable_log_requests": False,
        }
        if model.task == "embed":
            engine_kwargs.update(runner="pooling", convert="embed")
        if model.reasoning_parser:
            engine_kwargs["reasoning_parser"] = model.reasoning_parser
        lora_modules = [vllm_compat.lora_module(a.id, str(adapter_folder(a.path))) for a in model.adapters]
        if model.task == "generate":
            # On by default in both releases on GPU and on the CPU backend (but for MLA models on CPU, which
            # vLLM turns it off for); said here so that prefix routing (serve_app/replica_router.py) can count on it.
            engine_kwargs["enable_prefix_caching"] = True
        engine_kwargs.update(lora_settings(model))
        engine_kwargs.update(quantization.engine_arguments(model.quantization))
        if not on_gpu and engine_kwargs["dtype"] == "bfloat16":
            engine_kwargs["enforce_eager"] = True  # vLLM-CPU runs bf16 correctly only in eager mode
        engine_kwargs.update(tp_kwargs)
        engine_kwargs.update(model.engine_kwargs)  # the user's own settings win
        engine_kwargs["structured_outputs_config"] = vllm_compat.structured_outputs_config(
            engine_kwargs.get("structured_outputs_config"))
        started = time.monotonic()
        engine_args = AsyncEngineArgs(**engine_kwargs)
        # As an OpenAI server we take the defaults vLLM's own server takes. The library default
        # (ENGINE_CONTEXT) leaves max_num_batched_tokens at 2048 where `vllm serve` uses 8192 on an
        # H100, which queued prefills and added ~150 ms TTFT at 64 streams (docs/benchmarks.md).
        self.engine = AsyncLLM.from_engine_args(engine_args, usage_context=UsageContext.OPENAI_API_SERVER,
                                                stat_loggers=vllm_compat.ray_stat_loggers())
        args = vllm_compat.serve_args(engine_args, {
            "lora_modules": lora_modules or None,
            "enable_auto_tool_choice": model.tool_parser is not None and model.task == "generate",
            "tool_call_parser": model.tool_parser if model.task == "generate" else None,
        })
        self.state, self.tasks = await vllm_compat.build_serving(self.engine, args)
        self.adapter = vllm_compat
        self.validators = vllm_compat.request_models()
        self.load_adapter = None
        self.adapter_lock = asyncio.Lock()  # one adapter load or unload at a time: vLLM's names are per id
        if model.live_adapters.enabled and model.task == "generate":
            self._start_live_adapters(registry_path, state_on_head)
        log.info("engine for %s ready in %.1fs (%s, vLLM %s, tasks %s, prefix caching %s)", model.id,
                 time.monotonic() - started, engine_kwargs["dtype"], vllm_compat.VERSION, ",".join(self.tasks),
                 vllm_compat.prefix_caching(self.engine))

    # -- the provider contract: an OpenAI body in, OpenAI objects or SSE frames out ------------------------

    async def serve(self, endpoint: str, body: dict, request_id: str, client_wants_usage: bool
                    ) -> AsyncIterator[Piece]:
        """Answer one OpenAI request. A stream goes out a few engine steps per piece (one per interval).
        A live adapter's request comes with its multiplexed id: the adapter is loaded first if need be."""
        adapter = None
        if self.load_adapter is not None:
            from ray import serve

            multiplexed_id = serve.get_multiplexed_model_id()
            if multiplexed_id:
                try:
                    adapter = await self.load_adapter(multiplexed_id)
                    if adapter.deleted:
                        raise AdapterUnavailable(f"The model '{adapter.id}' does not exist (it was deleted).")
                except AdapterUnavailable as exc:
                    yield _refusal(exc.status, str(exc), "model", "model_not_found" if exc.status == 404 else
                                   "invalid_adapter")
                    return
                adapter.in_flight += 1
        try:
            async for piece in self._serve(endpoint, body, request_id):
                yield piece
        finally:
            if adapter is not None:
                adapter.in_flight -= 1
                if adapter.retired and not adapter.in_flight:
                    await self._unload(adapter)

    async def _serve(self, endpoint: str, body: dict, request_id: str) -> AsyncIterator[Piece]:
        handler = self.adapter.handler(self.state, endpoint)
        if handler is None:
            yield _refusal(400, f"The model '{self.config.id}' does not serve /v1/{endpoint.replace('chat', 'chat/completions')}"
                                f" (it is configured with task '{self.config.task}').", "model")
            return
        unsupported = sorted(set(body) - LOCAL_PARAMETERS[endpoint])
        if unsupported:
            yield _refusal(400, f"Unsupported parameter{'s' if len(unsupported) > 1 else ''} for local models: "
                                f"{', '.join(repr(u) for u in unsupported)}.", unsupported[0], "unsupported_parameter")
            return
        body = {**body, "request_id": request_id}
        if endpoint == "responses":
            body.setdefault("store", False)
        try:
            request = self.validators[endpoint].validate_python(body)
        except Exception as exc:  # pydantic's ValidationError; anything else is refused with its own words
            if callable(getattr(exc, "errors", None)):
                yield Piece(status=400, error=format_validation_error(exc.errors()).body()["error"])
            else:
                yield _refusal(400, str(exc))
            return
        try:
            result = await handler(request, None)
        except Exception as exc:
            status, error = self.adapter.error_from_exception(exc)
            yield Piece(status=status, error=error)
            return
        kind = self.adapter.result_kind(result)
        if kind == "error":
            status, error = self.adapter.error_response_body(result)
            yield Piece(status=status, error=error)
        elif kind == "http":
            status, payload = self.adapter.http_body(result)
            if status != 200:
                yield Piece(status=status, error=payload.get("error") or payload)
            else:
                yield Piece(body=payload, usage=Usage.read(payload.get("usage")))
        elif kind == "response":
            payload = self.adapter.dump_response(result)
            yield Piece(body=payload, usage=Usage.read(payload.get("usage")))
        else:
            async for piece in self._stream(endpoint, result):
                yield piece

    async def _stream(self, endpoint: str, frames) -> AsyncIterator[Piece]:
        sent = 0
        held: Piece | None = None
        try:
            async for frame in frames:
                piece = self._responses_piece(frame) if endpoint == "responses" else _chunk_piece(frame)
                if piece is None:
                    continue
                if endpoint == "chat" and sent == 0 and held is None and not piece.failed:
                    # A chat stream's first frame is the role alone; vLLM yields the first token's frame
                    # right after it. One message for both saves a Ray round trip before the first token.
                    held = piece
                    continue
                if held is not None:
                    piece.sse, piece.frames, held = held.sse + piece.sse, held.frames + piece.frames, None
                yield piece
                sent += piece.frames
                # While we sleep, vLLM's per-request collector merges new deltas into one output: the first
                # token leaves at once, later ones at most one interval late. Responses events other than
                # deltas carry no tokens (frames = 0) and do not wait, nor does the frame that finishes the
                # choice: only the usage chunk and [DONE] follow it, and the client's stream should end now.
                if self.stream_interval_s > 0 and piece.frames and _FINISHED not in piece.sse:
                    await asyncio.sleep(self.stream_interval_s)
            if held is not None:
                yield held
        finally:
            # Closing vLLM's generator aborts the request (client gone, or cancelled): frees its KV cache.
            await frames.aclose()

    def _responses_piece(self, event) -> Piece:
        delta = getattr(event, "type", "").endswith(".delta")
        piece = Piece(sse=self.adapter.response_sse(event), frames=1 if delta else 0)
        if getattr(event, "type", "") == "response.completed":
            usage = getattr(event.response, "usage", None)
            if usage is not None:
                piece.usage = Usage(usage.input_tokens, usage.output_tokens)
        return piece

    # -- live adapters (serve_app/lora_registry.py) -------------------------------------------------------------

    def _start_live_adapters(self, registry_path: str | None, state_on_head: bool) -> None:
        from ray import serve

        from serve_app.lora_registry import RegistryView

        async def load(multiplexed_id: str) -> LoadedAdapter:  # a function: Serve keeps its cache on it
            return await self._load(multiplexed_id)

        self.load_adapter = serve.multiplexed(max_num_models_per_replica=self.config.live_adapters.cache_size)(load)
        self.loaded: dict[str, LoadedAdapter] = {}  # adapter id -> the registration loaded here
        self.registry = RegistryView(serve.get_replica_context().app_name, registry_path, state_on_head,
                                     on_change=self._registry_changed)
        self.registry.start()

    async def _load(self, multiplexed_id: str) -> LoadedAdapter:
        adapter_id, _, seq = multiplexed_id.rpartition("#")
        entry = self.registry.entries.get(adapter_id)
        if entry is None or str(entry["seq"]) != seq:  # this replica's copy may lag the ingress by a moment
            try:
                await asyncio.wait_for(self.registry.refresh(), REGISTRY_REFRESH_TIMEOUT_S)
            except Exception as exc:  # the registry is unreachable: the copy this replica has decides
                log.warning("adapter registry unreachable while loading %s: %s", adapter_id, exc)
            entry = self.registry.entries.get(adapter_id)
        if entry is None or str(entry["seq"]) != seq or entry["base"] != self.config.id:
            raise AdapterUnavailable(f"The model '{adapter_id}' does not exist.")
        async with self.adapter_lock:
            current = self.loaded.get(adapter_id)
            if current is not None and current.seq == entry["seq"]:
                current.retired = False  # back in Serve's cache before its unload ran
                return current
            if current is not None:  # an earlier registration of this id: its streams keep their weights
                await self._unload_locked(current)
            try:
                folder = await asyncio.to_thread(adapter_folder, entry["uri"])
                await self.adapter.load_lora(self.state, adapter_id, str(folder), self.config.id)
            except Exception as exc:
                raise AdapterUnavailable(f"Adapter '{adapter_id}' could not be loaded: {exc}", status=500) from exc
            loaded = self.loaded[adapter_id] = LoadedAdapter(self, adapter_id, entry["seq"])
            log.info("live adapter %s (registration %s) loaded from %s", adapter_id, seq, entry["uri"])
            return loaded

    def retire(self, adapter: LoadedAdapter) -> None:
        if adapter.retired and not adapter.in_flight:
            asyncio.get_running_loop().create_task(self._unload(adapter))

    def _registry_changed(self, entries: dict[str, dict]) -> None:
        for adapter in list(self.loaded.values()):
            entry = entries.get(adapter.id)
            if entry is None or entry["seq"] != adapter.seq:
                adapter.deleted = adapter.retired = True
                self.retire(adapter)

    async def _unload(self, adapter: LoadedAdapter) -> None:
        async with self.adapter_lock:
            if adapter.retired and not adapter.in_flight:
                await self._unload_locked(adapter)

    async def _unload_locked(self, adapter: LoadedAdapter) -> None:
        """Unload the adapter's name (requests running on it keep their weights: vLLM holds them per request)."""
        if self.loaded.get(adapter.id) is adapter:
            del self.loaded[adapter.id]
            await self.adapter.unload_lora(self.state, adapter.id)
            log.info("live adapter %s (registration %s) unloaded", adapter.id, adapter.seq)

    async def check_adapter(self, uri: str) -> str | None:
        """Load an adapter under a name of its own and unload it again: None, or why it cannot be served
        here (vLLM checks its rank, modules and shapes against the base model)."""
        import uuid

        name = f"tuneserve-check-{uuid.uuid4().hex[:12]}"
        try:
            folder = await asyncio.to_thread(adapter_folder, uri)
            misfit = await asyncio.to_thread(adapter_misfit, folder, Path(self.path))
        except Exception as exc:
            return str(exc)
        if misfit:
            return misfit
        async with self.adapter_lock:
            try:
                lora_id = await self.adapter.load_lora(self.state, name, str(folder), self.config.id)
            except Exception as exc:
                return str(exc)
            await self.adapter.unload_lora(self.state, name)
            await self.engine.remove_lora(lora_id)  # no request ever used it
        return None

    async def model_info(self) -> dict:
        return {"id": self.config.id, "root": self.path, "max_model_len": self.config.max_model_len,
                "task": self.config.task}

    async def num_unfinished_requests(self) -> int:
        # AsyncLLM has no public counter in every vLLM release (0.26 lacks it); its output processor does.
        return self.engine.output_processor.get_num_unfinished_requests()

    async def check_health(self) -> None:
        """Called by Ray Serve; an exception marks the replica unhealthy and gets it replaced."""
        await self.engine.check_health()

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


_DONE = "data: [DONE]\n\n"
_FINISHED = '"finish_reason":"'  # in a frame whose choice has finished (vLLM writes compact JSON)


def _chunk_piece(frame: str) -> Piece | None:
    """A chat or text completion frame from vLLM. The usage chunk (no choices) is held apart; [DONE] is the
    ingress's to send."""
    if frame == _DONE:
        return None
    if '"choices":[]' in frame and '"usage":{' in frame:
        event = json.loads(frame[len("data: "):])
        return Piece(usage=Usage.read(event["usage"]), usage_event=event)
    failed = "engine" if frame.startswith('data: {"error"') else None
    return Piece(sse=frame, frames=1, failed=failed)


def _refusal(status: int, message: str, param: str | None = None, code: str | None = None) -> Piece:
    return Piece(status=status, error={"message": message, "type": "invalid_request_error", "param": param,
                                       "code": code})
