"""The engine deployment: one vLLM `AsyncLLM` per replica, behind the engine-neutral interface.

Built on vLLM's v1 AsyncLLM directly rather than ray.serve.llm, so that a Ray release is never tied to
a vLLM release. Only this module imports vLLM.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, AsyncIterator

from serve_app.config import ModelConfig
from serve_app.engine_api import (ChoiceDelta, EngineRequestError, GenerateChunk, GenerateRequest,
                                  ModelInfo, SamplingOptions, TokenLogprob)

log = logging.getLogger("tuneserve.engine")

# vLLM's CPU backend: a small KV cache (GiB) and no cores held back, sized for a 2-core laptop or CI box.
CPU_ENGINE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}


def multicast_off(env: dict[str, str] = os.environ) -> bool:
    """True on nodes that keep NVLink multicast off (as shared GPU hosts do)."""
    return env.get("NCCL_NVLS_ENABLE") == "0" or env.get("TORCH_SYMM_MEM_DISABLE_MULTICAST") == "1"


def tensor_parallel_defaults(tensor_parallel_size: int, env: dict[str, str] = os.environ
                             ) -> tuple[dict[str, Any], dict[str, str]]:
    """Engine kwargs and environment for a tensor-parallel engine on a node without NVLink multicast.

    vLLM 0.26's default all-reduce paths (custom all-reduce over symmetric memory, and the fused
    all-reduce+RMSNorm pass) hung or failed there with TP=2 on 2x H200; plain NCCL all-reduce works
    (docs/benchmarks.md). Elsewhere, and for one GPU, vLLM's defaults stay."""
    if tensor_parallel_size < 2 or not multicast_off(env):
        return {}, {}
    kwargs = {"disable_custom_all_reduce": True,
              "compilation_config": {"pass_config": {"fuse_allreduce_rms": False}}}
    return kwargs, {"VLLM_ALLREDUCE_USE_SYMM_MEM": "0"}


def resolve_dtype(model: ModelConfig, on_gpu: bool) -> str:
    """float32 on CPU: bf16 there is slow and only correct in eager mode. bfloat16 on GPUs."""
    if model.dtype != "auto":
        return model.dtype
    return "bfloat16" if on_gpu else "float32"


def adapter_folder(path: str) -> Path:
    """The adapter as a folder on this replica's node (a storage URI is fetched into the node's cache)."""
    from cluster.storage import resolve_local

    folder = Path(resolve_local(path)).expanduser().resolve()
    if not (folder / "adapter_config.json").is_file():
        raise ValueError(f"adapter {path}: not a PEFT adapter folder (no adapter_config.json)")
    return folder


def max_lora_rank(model: ModelConfig) -> int:
    """The smallest rank vLLM accepts that fits every adapter of this model."""
    rank = max(json.loads((adapter_folder(a.path) / "adapter_config.json").read_text())["r"] for a in model.adapters)
    return next(r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= rank)


class EngineDeployment:
    """Wrapped with serve.deployment in serve_app/app.py; its options come from ModelConfig."""

    def __init__(self, model: ModelConfig, on_gpu: bool):
        tp_kwargs, engine_env = (tensor_parallel_defaults(model.tensor_parallel_size) if on_gpu
                                 else ({}, CPU_ENGINE_ENV))
        for key, value in engine_env.items():
            os.environ.setdefault(key, value)
        from transformers import AutoTokenizer
        from vllm import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        from cluster.model_cache import resolve_model_path

        self.config = model
        self.path = resolve_model_path(model.path)
        self.max_model_len = model.max_model_len
        self.stream_interval_s = model.stream_interval_ms / 1000.0
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        engine_kwargs: dict[str, Any] = {
            "model": self.path,
            "served_model_name": model.id,
            "dtype": resolve_dtype(model, on_gpu),
            "max_model_len": model.max_model_len,
            "tensor_parallel_size": model.tensor_parallel_size,
            "enable_log_requests": False,
        }
        self.lora_requests = self._lora_requests(model)
        if self.lora_requests:
            engine_kwargs.update(enable_lora=True, max_loras=min(len(self.lora_requests), 8),
                                 max_lora_rank=max_lora_rank(model))
        engine_kwargs.update(tp_kwargs)
        engine_kwargs.update(model.engine_kwargs)  # the user's own settings win
        started = time.monotonic()
        # As an OpenAI server we take the defaults vLLM's own server takes. The library default
        # (ENGINE_CONTEXT) leaves max_num_batched_tokens at 2048 where `vllm serve` uses 8192 on an
        # H100, which queued prefills and added ~150 ms TTFT at 64 streams (docs/benchmarks.md).
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs),
                                                usage_context=UsageContext.OPENAI_API_SERVER)
        self.max_logprobs = self.engine.model_config.max_logprobs
        log.info("engine for %s ready in %.1fs (%s)", model.id, time.monotonic() - started, engine_kwargs["dtype"])

    # -- interface used by the ingress --------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        """Stream the request's output, several engine steps per chunk (at most one chunk per interval)."""
        try:
            prompt_ids = self._prompt_token_ids(request)
            params = self._sampling_params(request.sampling, len(prompt_ids), request.messages is not None)
        except EngineRequestError as exc:
            yield GenerateChunk(choices=[], prompt_tokens=0, finished=True, error=exc)
            return
        stream = self.engine.generate({"prompt_token_ids": prompt_ids}, params, request.request_id,
                                      lora_request=self.lora_requests.get(request.model))
        top_k = request.sampling.logprobs
        try:
            async for output in stream:
                yield self._to_chunk(output, top_k)
                if output.finished:
                    break
                # While we sleep, vLLM's per-request collector merges new deltas into one output:
                # the first token leaves at once, later ones at most one interval late.
                if self.stream_interval_s > 0:
                    await asyncio.sleep(self.stream_interval_s)
        finally:
            # Closing vLLM's generator aborts the request (client gone, or cancelled): frees its KV cache.
            await stream.aclose()

    async def model_info(self) -> ModelInfo:
        return ModelInfo(id=self.config.id, root=self.path, max_model_len=self.max_model_len,
                         owned_by=self.config.owned_by)

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

    @staticmethod
    def _lora_requests(model: ModelConfig) -> dict:
        from vllm.lora.request import LoRARequest

        return {adapter.id: LoRARequest(adapter.id, number, str(adapter_folder(adapter.path)))
                for number, adapter in enumerate(model.adapters, 1)}

    # -- request preparation ------------------------------------------------------------------------

    def _prompt_token_ids(self, request: GenerateRequest) -> list[int]:
        if request.messages is not None:
            try:
                text = self.tokenizer.apply_chat_template(request.messages, tokenize=False,
                                                          add_generation_prompt=True)
            except Exception as exc:  # a template that rejects the conversation (roles, order)
                raise EngineRequestError(f"The chat template rejected the messages: {exc}",
                                         param="messages") from None
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            where = "messages"
        elif isinstance(request.prompt, str):
            ids = self.tokenizer(request.prompt)["input_ids"]
            where = "prompt"
        else:
            ids = list(request.prompt or [])
            vocab = len(self.tokenizer)
            if any(not 0 <= token < vocab for token in ids):
                raise EngineRequestError(f"prompt token ids must lie in [0, {vocab})", param="prompt")
            where = "prompt"
        if not ids:
            raise EngineRequestError("The prompt is empty.", param=where)
        if len(ids) >= self.max_model_len:
            raise EngineRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                f"{where} resulted in {len(ids)} tokens, leaving no room for the completion.",
                param=where, code="context_length_exceeded")
        return ids

    def _sampling_params(self, options: SamplingOptions, prompt_len: int, is_chat: bool):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        room = self.max_model_len - prompt_len
        max_tokens = options.max_tokens if options.max_tokens is not None else room
        if max_tokens > room:
            field = "max_completion_tokens" if is_chat else "max_tokens"
            raise EngineRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the {'messages' if is_chat else 'prompt'}, "
                f"{max_tokens} in the completion). Please reduce the length of the messages or completion.",
                param=field, code="context_length_exceeded")
        if options.logprobs is not None and options.logprobs > self.max_logprobs:
            raise EngineRequestError(f"at most {self.max_logprobs} logprobs per token are supported",
                                     param="top_logprobs" if is_chat else "logprobs")
        return SamplingParams(
            n=options.n,
            max_tokens=max_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            stop=options.stop or None,
            seed=options.seed,
            presence_penalty=options.presence_penalty,
            frequency_penalty=options.frequency_penalty,
            logprobs=options.logprobs,
            ignore_eos=options.ignore_eos,
            min_tokens=min(options.min_tokens, max_tokens),
            output_kind=RequestOutputKind.DELTA,
        )

    # -- output conversion --------------------------------------------------------------------------

    def _to_chunk(self, output, top_k: int | None) -> GenerateChunk:
        choices = [
            ChoiceDelta(
                index=completion.index,
                text=completion.text,
                num_tokens=len(completion.token_ids),
                logprobs=None if top_k is None else self._logprobs(completion, top_k),
                finish_reason=completion.finish_reason,
            )
            for completion in output.outputs
        ]
        return GenerateChunk(choices=choices, prompt_tokens=len(output.prompt_token_ids or ()),
                             finished=output.finished)

    def _logprobs(self, completion, top_k: int) -> list[TokenLogprob]:
        """The sampled token's logprob plus the top_k most likely (vLLM adds the sampled one to its top k)."""
        entries = []
        for token_id, candidates in zip(completion.token_ids, completion.logprobs or ()):
            ranked = sorted(candidates.items(), key=lambda item: item[1].rank or 0)[:top_k]
            chosen = candidates[token_id]
            entries.append(TokenLogprob(token=self._token_text(token_id, chosen), logprob=chosen.logprob,
                                        top=[(self._token_text(tid, lp), lp.logprob) for tid, lp in ranked]))
        return entries

    def _token_text(self, token_id: int, logprob) -> str:
        if logprob.decoded_token is not None:
            return logprob.decoded_token
        return self.tokenizer.decode([token_id])
