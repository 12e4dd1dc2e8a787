"""The base model's targets for self-distillation (`loss.distill_*` in the recipe).

Before training, one vLLM engine (a Ray actor, on a GPU when the cluster has one) answers each general
prompt as the base model, at `distill_temperature` (0: greedy), and keeps its top-k next-token logprobs along
the answer (vLLM's raw logprobs: the model's own distribution, before temperature). Each answer becomes a
training example with no labels and those targets on its tokens, so that training pulls the tuned model's
distribution there towards the base's (jobs/finetune/losses.py) instead of towards one sampled token.
With `distill_opening_tokens` = k the same engine also answers each prompt greedily up to k tokens: one more
short example per prompt, on how the base's greedy answer opens.

The sampled answers are reproducible without per-request seeds (vLLM's CPU backend fails on those when it
samples, see jobs/evaluate/runners.py): the teacher's engine core runs inside the actor's process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so every prompt is queued before the first step and the batches, and with
them the draws from the engine's seeded generator, are the same in every run. With a separate engine-core
process the first steps raced the queueing, and the same recipe gave three different sets of answers
The targets are also kept in the run's storage folder (`distill_targets.json.gz`): a
resumed or re-submitted run trains on the same ones without a second teacher run.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import time

from cluster.storage import Location
from jobs.data.records import Conversation, read_prompts
from jobs.data.tokenize import IGNORE, Example
from jobs.finetune.config import FinetuneConfig, rows_per_step, smoke_steps

log = logging.getLogger("tuneserve.finetune")
TARGETS_FILE = "distill_targets.json.gz"


def read_distill_prompts(cfg: FinetuneConfig) -> list[Conversation]:
    """Every prompt of loss.distill_prompts (DataError naming the file and line when one is bad); in a smoke
    run (TUNESERVE_MAX_STEPS), only as many as its steps can draw, one row each."""
    prompts = [prompt for source in cfg.loss.distill_prompts for prompt in read_prompts(source)]
    steps = smoke_steps(cfg)
    return prompts[:steps * rows_per_step(cfg)] if steps else prompts


class TeacherEngine:
    """The base model on one vLLM offline engine: answers and their top-k logprobs."""

    def __init__(self, model: str, dtype: str, max_model_len: int, on_gpu: bool):
        from jobs.evaluate.runners import EngineReplica

        self.engine = EngineReplica(model, dtype, max_model_len, 1, {"enforce_eager": not on_gpu}, None)

    def targets(self, prompts: list[Conversation], top_k: int, max_tokens: int, temperature: float) -> list[dict]:
        from vllm import SamplingParams

        tokenizer = self.engine.tokenizer
        prompt_ids = [tokenizer(tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True),
                                add_special_tokens=False)["input_ids"] for p in prompts]
        # Unseeded: vLLM's CPU backend fails on per-request seeds when sampling.
        params = SamplingParams(temperature=temperature, max_tokens=max_tokens, logprobs=top_k)
        outputs = self.engine.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=True)
        found = []
        for ids, out in zip(prompt_ids, outputs):
            answer = out.outputs[0]
            top_ids, top_logprobs = [], []
            for position in answer.logprobs:  # one {token id: Logprob} per answer token; the sampled one may be extra
                best = sorted(position.items(), key=lambda item: item[1].rank)[:top_k]
                top_ids.append([token for token, _ in best])
                top_logprobs.append([entry.logprob for _, entry in best])
            found.append({"prompt_ids": ids, "answer_ids": list(answer.token_ids), "top_ids": top_ids,
                          "top_logprobs": top_logprobs})
        return found


def fingerprint(cfg: FinetuneConfig, prompts: list[Conversation]) -> str:
    """What the targets depend on: the base, the prompts and the teacher's settings."""
    loss = cfg.loss
    key = [cfg.model.path, prompts, loss.distill_top_k, loss.distill_max_tokens, loss.distill_temperature,
           cfg.data.max_length]
    if loss.distill_opening_tokens:  # (so that targets stored before this setting existed still match)
        key.append(loss.distill_opening_tokens)
    key = json.dumps(key)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def make_targets(cfg: FinetuneConfig, prompts: list[Conversation], on_gpu: bool) -> tuple[list[dict], list[dict]]:
    """The base's answers with their top-k, and, with `distill_opening_tokens`, its greedy openings."""
    import ray

    from cluster.engine_defaults import CPU_ENGINE_ENV

    # the engine core in this actor's process: reproducible batches (see the module's docstring)
    env = {**({} if on_gpu else CPU_ENGINE_ENV), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    options = {"num_cpus": 1, "num_gpus": 1 if on_gpu else 0, "runtime_env": {"env_vars": env}}
    started = time.perf_counter()
    engine = ray.remote(TeacherEngine).options(**options).remote(
        cfg.model.path, "bfloat16" if on_gpu else "float32", cfg.data.max_length, on_gpu)
    try:
        loss = cfg.loss
        found = engine.targets.remote(prompts, loss.distill_top_k, loss.distill_max_tokens, loss.distill_temperature)
        openings = (engine.targets.remote(prompts, loss.distill_top_k, loss.distill_opening_tokens, 0.0)
                    if loss.distill_opening_tokens else None)
        openings = ray.get(openings) if openings else []
        found = ray.get(found)
    finally:
        ray.kill(engine)  # frees its GPU before the workers start
    log.info("distillation targets: %d base answers, %d tokens, %d greedy openings, in %.0f s", len(found),
             sum(len(t["answer_ids"]) for t in found), len(openings), time.perf_counter() - started)
    return found, openings


def distill_examples(cfg: FinetuneConfig, run: Location, on_gpu: bool) -> list[Example]:
    """The distillation examples of this run: from the run's stored targets when they match the recipe,
    else made now (and stored)."""
    prompts = read_distill_prompts(cfg)
    stored = run.join(TARGETS_FILE)
    key = fingerprint(cfg, prompts)
    targets = None
    if stored.is_file():
        saved = json.loads(gzip.decompress(stored.read_bytes()))
        if saved["fingerprint"] == key:
            targets, openings = saved["targets"], saved.get("openings", [])
            log.info("distillation targets: reusing %s", stored.uri)
    if targets is None:
        targets, openings = make_targets(cfg, prompts, on_gpu)
        stored.write_bytes(gzip.compress(json.dumps({"fingerprint": key, "targets": targets,
                                                     "openings": openings}).encode()))
    return stored_examples(cfg, targets, openings)


def answer_sequences(cfg: FinetuneConfig, run: Location) -> list[list[int]]:
    """The stored targets' prompts with the base's sampled answers, as token ids cut to max_length."""
    saved = json.loads(gzip.decompress(run.join(TARGETS_FILE).read_bytes()))
    return [(t["prompt_ids"] + t["answer_ids"])[:cfg.data.max_length] for t in saved["targets"]]


def stored_examples(cfg: FinetuneConfig, targets: list[dict], openings: list[dict]) -> list[Example]:
    """The training examples of stored targets: each answer (its sampled tokens as labels with
    `distill_sample_ce`), then each greedy opening (KL only)."""
    hinge = cfg.loss.margin_hinge
    on_answers = hinge is None or hinge.tokens == "all"  # the greedy-margin hinge's tokens (when it is on)
    examples = [to_example(t, cfg.data.max_length, cfg.loss.distill_sample_ce, margin=on_answers) for t in targets]
    examples += [to_example(t, cfg.data.max_length, sample_ce=False, margin=True) for t in openings]
    return [example for example in examples if example.distilled]  # prompts longer than max_length: nothing left


def to_example(target: dict, max_length: int, sample_ce: bool = True, margin: bool = False) -> Example:
    """Prompt and answer tokens; the base's top-k on each answer token (token t's target is the
    distribution the model predicts it from, at t-1), the sampled tokens as labels with `sample_ce`, and
    the answer tokens flagged for the greedy-margin hinge with `margin`. Cut to max_length."""
    ids = target["prompt_ids"] + target["answer_ids"]
    before = [[] for _ in target["prompt_ids"]]
    answer_labels = target["answer_ids"] if sample_ce else [IGNORE] * len(target["answer_ids"])
    return Example(ids[:max_length], ([IGNORE] * len(before) + answer_labels)[:max_length],
                   teacher_ids=(before + target["top_ids"])[:max_length],
                   teacher_logprobs=(before + target["top_logprobs"])[:max_length],
                   teacher_margin=([False] * len(before) + [margin] * len(target["answer_ids"]))[:max_length])
