"""Where the answers come from: vLLM's offline engine (data-parallel replicas as Ray actors, or one
tensor-parallel engine), or any OpenAI-compatible endpoint.

Each runner takes the prompts (chat messages) and returns one generation per prompt, in order, plus the
number of output tokens.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass

from pydantic import BaseModel, Field


class GenerationSettings(BaseModel):
    temperature: float = Field(0.0, ge=0, le=2)
    max_tokens: int = Field(512, ge=1)
    seed: int | None = 0  # None: unseeded (vLLM's CPU backend cannot run seeded sampling above temperature 0)


@dataclass
class Generation:
    text: str
    output_tokens: int


class EvaluationError(RuntimeError):
    """A run that cannot start (unreachable endpoint, unknown model, too few resources)."""


# -- offline vLLM ----------------------------------------------------------------------------------------


class EngineReplica:
    """One vLLM offline engine; a Ray actor per data-parallel replica (or one tensor-parallel engine)."""

    def __init__(self, model: str, dtype: str, max_model_len: int, tensor_parallel_size: int,
                 engine_kwargs: dict, cpu_cores: str | None):
        from cluster.engine_defaults import tensor_parallel_defaults

        if cpu_cores is not None:  # CPU replicas: each its own cores, so that their OpenMP threads do not fight
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_cores
        else:
            tp_kwargs, tp_env = tensor_parallel_defaults(tensor_parallel_size)
            for key, value in tp_env.items():
                os.environ.setdefault(key, value)
            engine_kwargs = {**tp_kwargs, **engine_kwargs}  # the caller's own settings win
        from transformers import AutoTokenizer
        from vllm import LLM

        from cluster.model_cache import resolve_model_path

        model = resolve_model_path(model)  # on this replica's node: `default` or a storage URI, fetched here
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.llm = LLM(model=model, dtype=dtype, max_model_len=max_model_len,
                       tensor_parallel_size=tensor_parallel_size, **engine_kwargs)

    def ready(self) -> bool:
        return True

    def generate(self, conversations: list[list[dict]], settings: dict) -> list[tuple[str, int]]:
        """The whole shard at once: vLLM batches it dynamically."""
        from vllm import SamplingParams

        params = SamplingParams(temperature=settings["temperature"], max_tokens=settings["max_tokens"],
                                seed=settings["seed"])
        prompts = []
        for messages in conversations:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            prompts.append({"prompt_token_ids": self.tokenizer(text, add_special_tokens=False)["input_ids"]})
        outputs = self.llm.generate(prompts, params, use_tqdm=True)
        return [(out.outputs[0].text, len(out.outputs[0].token_ids)) for out in outputs]


@dataclass
class OfflinePlan:
    model: str
    dtype: str
    max_model_len: int
    replicas: int
    tensor_parallel_size: int
    engine_kwargs: dict
    cpus_per_replica: float


def check_resources(plan: OfflinePlan, resources: dict[str, float]) -> bool:
    """True when the replicas go on GPUs; raises EvaluationError when the cluster is too small."""
    gpus, cpus = resources.get("GPU", 0), resources.get("CPU", 0)
    on_gpu = gpus > 0
    if on_gpu:
        needed = plan.replicas * plan.tensor_parallel_size
        if needed > gpus:
            raise EvaluationError(f"{plan.replicas} replica(s) x tensor parallel {plan.tensor_parallel_size} "
                                  f"need {needed} GPUs; the cluster has {gpus:g}")
    else:
        needed = plan.replicas * max(plan.cpus_per_replica, plan.tensor_parallel_size)
        if needed > cpus:
            raise EvaluationError(f"{plan.replicas} replica(s) x tensor parallel {plan.tensor_parallel_size} "
                                  f"need {needed:g} CPUs on this CPU-only cluster; it has {cpus:g}")
    return on_gpu


def run_offline(plan: OfflinePlan, conversations: list[list[dict]], settings: GenerationSettings
                ) -> tuple[list[Generation], float, float]:
    """Shard the prompts over the replicas (contiguous, in order), generate, merge in order.
    Returns the generations, engine start-up seconds and generation wall seconds."""
    import ray

    from cluster.engine_defaults import CPU_ENGINE_ENV

    on_gpu = check_resources(plan, ray.cluster_resources())
    started = time.perf_counter()
    replicas = []
    for rank in range(plan.replicas):
        if on_gpu:
            options = {"num_gpus": plan.tensor_parallel_size, "num_cpus": 1}
            cores = None
        else:
            options = {"num_cpus": plan.cpus_per_replica,
                       "runtime_env": {"env_vars": dict(CPU_ENGINE_ENV)}}
            cores = _cpu_cores(rank, plan.replicas)
        actor = ray.remote(EngineReplica).options(**options).remote(
            plan.model, plan.dtype, plan.max_model_len, plan.tensor_parallel_size, plan.engine_kwargs, cores)
        replicas.append(actor)
    ray.get([r.ready.remote() for r in replicas])
    startup_s = time.perf_counter() - started

    shards = [conversations[i * len(conversations) // plan.replicas:(i + 1) * len(conversations) // plan.replicas]
              for i in range(plan.replicas)]
    started = time.perf_counter()
    results = ray.get([r.generate.remote(shard, settings.model_dump()) for r, shard in zip(replicas, shards)])
    wall_s = time.perf_counter() - started
    for replica in replicas:
        ray.kill(replica)
    generations = [Generation(text, tokens) for shard in results for text, tokens in shard]
    return generations, startup_s, wall_s


def answer_prompts(model: str, prompts: list[str], settings: GenerationSettings) -> list[str]:
    """One offline engine with this machine's defaults (bf16 on GPU, fp32 eager on CPU) answers each
    prompt as a single user turn; stripped texts, in order. Needs a connected Ray."""
    from cluster.resources import cluster_has_gpus

    on_gpu = cluster_has_gpus()
    plan = OfflinePlan(model=model, dtype="bfloat16" if on_gpu else "float32", max_model_len=2048, replicas=1,
                       tensor_parallel_size=1, engine_kwargs={"enforce_eager": not on_gpu}, cpus_per_replica=1.0)
    generations, _, _ = run_offline(plan, [[{"role": "user", "content": p}] for p in prompts], settings)
    return [g.text.strip() for g in generations]


def _cpu_cores(rank: int, replicas: int) -> str | None:
    """The cores of replica `rank` when replicas share this machine's cores evenly ("0-1", "2-3", ...)."""
    cores = os.cpu_count() or 1
    if replicas == 1 or cores < replicas:
        return None
    per = cores // replicas
    first = rank * per
    return str(first) if per == 1 else f"{first}-{first + per - 1}"


# -- endpoint ----------------------------------------------------------------------------------------------


async def _endpoint_generate(base_url: str, model: str, api_key: str, conversations: list[list[dict]],
                             settings: GenerationSettings, concurrency: int, progress) -> list[Generation]:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=2, timeout=600)
    try:
        try:
            served = [m.id for m in (await client.models.list()).data]
        except openai.APIConnectionError:
            raise EvaluationError(f"cannot reach the endpoint {base_url}") from None
        except openai.APIStatusError as exc:
            raise EvaluationError(f"the endpoint {base_url} answered {exc.status_code}: {exc.message}") from None
        if model not in served:
            raise EvaluationError(f"model '{model}' is not served at {base_url}; it serves: {', '.join(served)}")
        limit = asyncio.Semaphore(concurrency)

        async def one(messages: list[dict]) -> Generation:
            async with limit:
                reply = await client.chat.completions.create(
                    model=model, messages=messages, temperature=settings.temperature,
                    max_tokens=settings.max_tokens, seed=settings.seed)
            progress.update()
            return Generation(reply.choices[0].message.content or "", reply.usage.completion_tokens)

        return await asyncio.gather(*(one(c) for c in conversations))
    finally:
        await client.close()


def run_endpoint(base_url: str, model: str, api_key: str, conversations: list[list[dict]],
                 settings: GenerationSettings, concurrency: int) -> tuple[list[Generation], float]:
    from tqdm import tqdm

    started = time.perf_counter()
    with tqdm(total=len(conversations), desc="evaluating", unit="q") as progress:
        generations = asyncio.run(_endpoint_generate(base_url, model, api_key, conversations, settings,
                                                     concurrency, progress))
    return generations, time.perf_counter() - started
