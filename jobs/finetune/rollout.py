"""Rollouts for `objective: grpo`: the policy's own answers, scored, as training rows.

One vLLM engine, a Ray actor for the whole run, samples the answers. It holds the current policy as a LoRA
adapter: after every optimizer step rank 0 writes the adapter to the run's storage (nodes share no disk) and
the engine loads it under a new id (vLLM's runtime LoRA loading), so every step's answers come from the
policy as it is after the step before. On a CPU the engine shares the node with the workers; on GPUs it
takes `grpo.engine_gpus` of one, so that it can sit beside a worker (`gpu_memory_utilization` keeps room).

The engine returns each answer token's log-probability under the policy that sampled it. The loss takes
its importance ratio against those (PPO's "old" policy), so the small numerical gap between vLLM's
kernels and the trainer's is clipped like any other policy change rather than trusted to be zero.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import torch

from cluster.storage import locate
from jobs.data.records import read_records, to_prompt
from jobs.data.tokenize import IGNORE
from jobs.finetune.config import FinetuneConfig
from jobs.finetune.rewards import load_reward, score

log = logging.getLogger("tuneserve.finetune")
POLICY_FOLDER = "rollout_policy"


def read_rl_prompts(cfg: FinetuneConfig) -> list[dict]:
    """Each record of data.train: a prompt as the distillation data has them (`{"messages": [...]}` up to its
    last user turn, or `{"prompt": "..."}`), or a GSM8K line `{"question", "answer"}`, asked with the
    evaluate job's instruction. Every other field goes to the rewards. Errors name the file and line."""
    from jobs.evaluate.gsm8k import INSTRUCTION

    def parse(record: object, where: str) -> dict:
        if isinstance(record, dict) and "messages" not in record and isinstance(record.get("question"), str):
            messages = [{"role": "user", "content": f"{record['question']}\n{INSTRUCTION}"}]
        else:
            messages = to_prompt(record, where)
        return {"messages": messages, "fields": {k: v for k, v in record.items() if k not in ("messages", "prompt")}}

    return [prompt for source in cfg.data.train for prompt in read_records(source, parse)]


def tokenize_prompts(cfg: FinetuneConfig, tokenizer, prompts: list[dict]) -> tuple[list[dict], int]:
    """Each prompt with its token ids (the chat template's generation prompt included); prompts that leave
    fewer than 16 tokens of data.max_length for the answer are dropped (returned: how many)."""
    kept, dropped = [], 0
    for prompt in prompts:
        text = tokenizer.apply_chat_template(prompt["messages"], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) + 16 > cfg.data.max_length:
            dropped += 1
            continue
        kept.append({**prompt, "prompt_ids": ids})
    return kept, dropped


class RolloutEngine:
    """The policy on one vLLM offline engine: the base, plus the latest adapter once there is one."""

    def __init__(self, model: str, dtype: str, max_model_len: int, max_lora_rank: int, on_gpu: bool,
                 gpu_memory_utilization: float, seed: int):
        from jobs.evaluate.runners import EngineReplica

        kwargs = {"enforce_eager": not on_gpu, "enable_lora": True, "max_lora_rank": max_lora_rank,
                  "max_loras": 1, "seed": seed}
        if on_gpu:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        self.engine = EngineReplica(model, dtype, max_model_len, 1, kwargs, None)
        self.policy = None  # vLLM's LoRARequest of the latest adapter
        self.policy_step = 0
        self._folder = tempfile.TemporaryDirectory(prefix="tuneserve-policy-")

    def load_policy(self, step: int, uri: str) -> int:
        """The adapter rank 0 wrote after optimizer step `step`, from storage into this node's disk."""
        from vllm.lora.request import LoRARequest

        folder = Path(self._folder.name) / f"step-{step}"
        locate(uri).download(folder)
        self.policy = LoRARequest(f"policy-{step}", step, str(folder))  # a new id: vLLM caches adapters by id
        self.policy_step = step
        return step

    def generate(self, prompt_ids: list[list[int]], n: int, max_tokens: int, temperature: float,
                 top_p: float, max_model_len: int) -> dict:
        """n answers per prompt, with each answer token's log-probability, and the policy step that made them."""
        from vllm import SamplingParams

        # Unseeded per request: vLLM's CPU backend fails on per-request seeds when sampling (the engine's seed
        # makes the run repeatable).
        requests = [{"prompt_token_ids": ids} for ids in prompt_ids]
        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, logprobs=0,
                                 max_tokens=min(max_tokens, max_model_len - len(ids))) for ids in prompt_ids]
        outputs = self.engine.llm.generate(requests, params, lora_request=self.policy, use_tqdm=False)
        answers = []
        for out in outputs:
            group = []
            for answer in out.outputs:
                ids = list(answer.token_ids)
                # logprobs=0: the sampled token's own entry at each position
                logps = [position[token].logprob for token, position in zip(ids, answer.logprobs)]
                group.append({"ids": ids, "text": answer.text, "logps": logps})
            answers.append(group)
        return {"policy_step": self.policy_step, "answers": answers}


def start_engine(cfg: FinetuneConfig, dtype: str, on_gpu: bool):
    """The run's rollout engine actor (started by the driver, handed to every worker)."""
    import ray

    from cluster.engine_defaults import CPU_ENGINE_ENV

    env = {**({} if on_gpu else CPU_ENGINE_ENV), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    options = {"num_cpus": 0 if not on_gpu else 1, "num_gpus": cfg.grpo.engine_gpus if on_gpu else 0,
               "runtime_env": {"env_vars": env}}
    engine = ray.remote(RolloutEngine).options(**options).remote(
        cfg.model.path, dtype, cfg.data.max_length, cfg.lora.r, on_gpu, cfg.grpo.gpu_memory_utilization,
        cfg.train.seed)
    return engine


def advantages(rewards: torch.Tensor) -> torch.Tensor:
    """[groups, n] rewards -> each answer's advantage: its reward minus its group's mean, over the group's
    standard deviation (a group whose answers all scored the same teaches nothing: 0)."""
    centred = rewards - rewards.mean(-1, keepdim=True)
    return centred / (rewards.std(-1, keepdim=True) + 1e-4)


def score_groups(cfg: FinetuneConfig, prompts: list[dict], answers: list[list[dict]]) -> tuple[torch.Tensor, int]:
    """[groups, n] total rewards, and how many reward calls failed (each scored 0, the first one logged)."""
    rewards = [(load_reward(r.function), r.weight) for r in cfg.grpo.rewards]
    totals, failed = [], []
    for prompt, group in zip(prompts, answers):
        row = []
        for answer in group:
            total, _, errors = score(rewards, prompt["messages"], answer["text"], prompt["fields"])
            row.append(total)
            failed += errors
        totals.append(row)
    if failed:
        log.warning("%d reward calls failed and scored 0 this step; the first: %s", len(failed), failed[0])
    return torch.tensor(totals, dtype=torch.float32), len(failed)


def rollout_batch(prompts: list[dict], answers: list[list[dict]], advantage: torch.Tensor, pad_id: int) -> dict:
    """The micro-batch of a group of prompts: one row per answer (prompt + answer tokens, labels on the
    answer), its advantage, and the engine's log-probability of each answer token at its label's place."""
    rows = [(p["prompt_ids"], a) for p, group in zip(prompts, answers) for a in group]
    width = max(len(ids) + len(a["ids"]) for ids, a in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    old_logps = torch.zeros((len(rows), width), dtype=torch.float32)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, answer) in enumerate(rows):
        full = ids + answer["ids"]
        input_ids[i, :len(full)] = torch.tensor(full)
        attention[i, :len(full)] = 1
        labels[i, len(ids):len(full)] = torch.tensor(answer["ids"], dtype=torch.long)
        old_logps[i, len(ids):len(full)] = torch.tensor(answer["logps"], dtype=torch.float32)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "old_logps": old_logps,
            "advantages": advantage.reshape(-1).float()}


def publish_policy(strategy, tokenizer, engine, step: int, run, rank: int) -> None:
    """After optimizer step `step`: the adapter into the run's storage, and the engine onto it. Every rank
    takes part (sharded strategies gather the weights together); rank 0 writes and tells the engine."""
    import ray

    from jobs.export.hf import save_hf

    weights = strategy.full_state_dict()
    if rank != 0:
        return
    target = run.join(POLICY_FOLDER)
    with tempfile.TemporaryDirectory(prefix="tuneserve-policy-") as tmp:
        save_hf(strategy.cfg, strategy.base, weights, tokenizer, Path(tmp))
        if target.exists():
            target.delete()
        target.upload(Path(tmp))
    ray.get(engine.load_policy.remote(step, target.uri))


def rollout_step(cfg: FinetuneConfig, strategy, engine, prompts: list[dict], pad_id: int, device: torch.device,
                 step: int) -> tuple[dict, float]:
    """One optimizer step on this worker's prompts: the engine answers each `group_size` times, the rewards
    score the answers, and grad_accum micro-batches of micro_batch_size prompts (all their answers) train.
    Returns this worker's figures and the gradient norm."""
    import ray

    grpo = cfg.grpo
    started = time.perf_counter()
    out = ray.get(engine.generate.remote([p["prompt_ids"] for p in prompts], grpo.group_size, grpo.max_new_tokens,
                                         grpo.temperature, grpo.top_p, cfg.data.max_length))
    if out["policy_step"] != step:  # on-policy: the answers must come from the policy as it is now
        raise RuntimeError(f"the rollout engine holds the policy of step {out['policy_step']}, the trainer is "
                           f"at step {step}")
    answers = out["answers"]
    rolled = time.perf_counter()
    rewards, failed = score_groups(cfg, prompts, answers)
    advantage = advantages(rewards)
    micro = cfg.train.micro_batch_size
    losses, clips, kls, tokens = [], [], [], 0
    for i in range(cfg.train.grad_accum):
        part = slice(i * micro, (i + 1) * micro)
        batch = rollout_batch(prompts[part], answers[part], advantage[part], pad_id)
        tokens += int(batch["attention_mask"].sum())
        loss, parts = strategy.forward({k: v.to(device) for k, v in batch.items()})
        strategy.backward(loss, last_micro_step=i == cfg.train.grad_accum - 1)
        losses.append(loss.detach())
        clips.append(parts["clip_fraction"])
        if "policy_kl" in parts:
            kls.append(parts["policy_kl"])
    grad_norm = strategy.step()
    lengths = [len(a["ids"]) for group in answers for a in group]
    figures = {"loss": torch.stack(losses).mean().item(), "tokens": float(tokens),
               "reward": rewards.mean().item(), "reward_std": rewards.std(-1).mean().item(),
               "answer_tokens": sum(lengths) / len(lengths), "clip_fraction": torch.stack(clips).mean().item(),
               "policy_kl": torch.stack(kls).mean().item() if kls else 0.0, "reward_errors": float(failed),
               "rollout_s": rolled - started, "train_s": time.perf_counter() - rolled, "rollout_workers": 1.0}
    return figures, grad_norm
