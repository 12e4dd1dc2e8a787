"""Reinforcement learning from rewards (`objective: grpo`): the shipped rewards and how a recipe names its
own, group-relative advantages, the clipped loss, the data and recipe errors, and the real job: a vLLM
engine sampling the policy's answers on the default model, the policy reaching the engine after every
step, and the rewards rising."""

from __future__ import annotations

import json

import pytest
import torch

from jobs.finetune.losses import grpo_loss, token_logps
from jobs.finetune.rewards import answer_format, gsm8k_flexible, gsm8k_strict, json_valid, length, load_reward, score
from jobs.finetune.rollout import advantages, rollout_batch

GSM8K_ROW = {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"}


def test_the_gsm8k_rewards_read_answers_as_the_evaluate_job_does():
    assert gsm8k_strict([], "3 + 4 = 7\n#### 7", GSM8K_ROW) == 1.0
    assert gsm8k_strict([], "The answer is 7.", GSM8K_ROW) == 0.0  # no '####': not a strict answer
    assert gsm8k_flexible([], "The answer is 7.", GSM8K_ROW) == 1.0
    assert gsm8k_flexible([], "7 apples, no, 8", GSM8K_ROW) == 0.0  # the last number counts
    assert gsm8k_strict([], "#### 1,000", {"answer": "1000"}) == 1.0  # a bare reference number works too
    assert answer_format([], "so\n#### 12", GSM8K_ROW) == 1.0 and answer_format([], "12", GSM8K_ROW) == 0.0
    with pytest.raises(ValueError, match="answer"):
        gsm8k_strict([], "#### 7", {"question": "no answer field"})


def test_json_and_length_rewards():
    schema = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}
    assert json_valid([], '{"name": "x"}', {"schema": schema}) == 1.0
    assert json_valid([], '```json\n{"name": "x"}\n```', {"schema": schema}) == 1.0
    assert json_valid([], '{"age": 3}', {"schema": schema}) == 0.5  # JSON, but not the schema's
    assert json_valid([], "name: x", {}) == 0.0
    assert length([], "x" * 40, {"target_chars": 40}) == 1.0
    assert length([], "x" * 60, {"target_chars": 40}) == pytest.approx(0.5)
    assert length([], "", {"target_chars": 40}) == 0.0 and length([], "x" * 100, {"target_chars": 40}) == 0.0


def test_rewards_are_named_by_short_name_or_import_path_and_failures_name_the_reward():
    assert load_reward("length") is length
    assert load_reward("jobs.finetune.rewards:json_valid") is json_valid
    for bad, needle in [("nope", "not a shipped reward"), ("jobs.finetune.rewards:nope", "nope"),
                        ("no_such_module:f", "No module named"), ("jobs.finetune.rewards:SHIPPED", "not a function")]:
        with pytest.raises(ValueError, match=needle):
            load_reward(bad)
    total, parts, errors = score([(answer_format, 0.5), (gsm8k_flexible, 2.0)], [], "#### 7", GSM8K_ROW)
    assert total == 2.5 and parts == [1.0, 1.0] and errors == []
    # a reward that raises or returns NaN scores 0 for that answer, and says so; the others still count
    total, parts, errors = score([(gsm8k_strict, 1.0), (answer_format, 1.0), (lambda p, c, e: float("nan"), 1.0)],
                                 [], "#### 7", {})
    assert total == 1.0 and parts == [0.0, 1.0, 0.0]
    assert "gsm8k_strict raised ValueError" in errors[0] and "returned nan" in errors[1], errors


def test_advantages_are_relative_within_each_group():
    adv = advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]]))
    assert adv[0].tolist() == pytest.approx([0.866, -0.866, -0.866, 0.866], abs=1e-3)
    assert adv[1].tolist() == [0.0, 0.0, 0.0, 0.0]  # every answer scored the same: nothing to learn


def _batch():
    prompts = [{"prompt_ids": [5, 6, 7]}]
    answers = [[{"ids": [8, 9], "logps": [-1.0, -2.0]}, {"ids": [10], "logps": [-0.5]}]]
    return rollout_batch(prompts, answers, torch.tensor([[1.0, -1.0]]), pad_id=0)


def test_a_rollout_row_is_prompt_then_answer_with_the_engines_logprobs_at_the_labels():
    batch = _batch()
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 6, 7, 10, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 8, 9], [-100, -100, -100, 10, -100]]
    assert batch["old_logps"][0, 3:].tolist() == [-1.0, -2.0] and batch["old_logps"][1, 3].item() == -0.5
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 1, 0]] and batch["advantages"].tolist() == [1, -1]


def test_the_loss_raises_good_answers_clips_far_moves_and_is_zero_kl_at_the_reference():
    batch = _batch()
    labels = batch["labels"]
    positions = torch.arange(labels.shape[1] - 1)
    logits = torch.randn(2, len(positions), 16, requires_grad=True)
    at_old = token_logps(logits, labels, positions).detach()
    old = torch.zeros_like(batch["old_logps"])
    old[:, positions + 1] = at_old  # the sampling policy is the current one: ratio 1
    loss, figures = grpo_loss(logits, labels, positions, old, batch["advantages"], at_old, 0.2, beta=0.1)
    assert figures["clip_fraction"].item() == 0 and figures["policy_kl"].item() == pytest.approx(0, abs=1e-6)
    loss.backward()
    grad = logits.grad
    # descending the loss raises the first answer's tokens (advantage +1) and lowers the second's (−1)
    assert grad[0, 2, 8] < 0 and grad[0, 3, 9] < 0 and grad[1, 2, 10] > 0
    assert grad[0, :2].abs().sum() == 0  # prompt positions get no gradient
    # a token whose ratio is already far above 1 + clip with a positive advantage gets no further push
    far = old.clone()
    far[0, 4] = at_old[0, 3] - 1.0  # the engine gave it e^-1 of the current probability: ratio e
    logits.grad = None
    loss, figures = grpo_loss(logits, labels, positions, far, batch["advantages"], None, 0.2, beta=0.0)
    loss.backward()
    assert logits.grad[0, 3].abs().sum() == 0 and figures["clip_fraction"].item() == pytest.approx(1 / 3)


def test_bad_grpo_recipes_and_data_are_refused_before_training(tmp_path):
    from jobs.data.records import DataError
    from jobs.finetune.config import ConfigError, check_supported, load_config
    from jobs.finetune.rollout import read_rl_prompts
    from tests.conftest import REPO_ROOT

    recipe = REPO_ROOT / "jobs/configs/grpo_cpu.yaml"
    for overrides, needle in [
        (["grpo.rewards=[]"], "at least one reward"),
        (["objective=sft", "loss.distill_weight=0"], "grpo settings are given but objective is sft"),
        (["model.method=full"], "needs method lora or qlora"),
        (["grpo.rewards=[{function: no.such:thing}]"], "grpo.rewards: reward 'no.such:thing'"),
        (["lora.input_share=0.01"], "lora.input_share"),
        (["grpo.group_size=1"], "group_size"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            check_supported(load_config(recipe, overrides))
    data = tmp_path / "prompts.jsonl"
    for line, needle in [("not json", ":1: invalid JSON"), ('{"text": "hi"}', ":1: a prompt record needs"),
                         ('{"messages": [{"role": "assistant", "content": "b"}]}', ":1: no user message")]:
        data.write_text(line + "\n")
        with pytest.raises(DataError, match=needle):
            read_rl_prompts(load_config(recipe, [f"data.train=[{data}]"]))
    data.write_text(json.dumps(GSM8K_ROW) + "\n" + json.dumps({"messages": [{"role": "user", "content": "Hi"}],
                                                               "target_chars": 9}) + "\n")
    first, second = read_rl_prompts(load_config(recipe, [f"data.train=[{data}]"]))
    assert first["messages"][0]["content"].startswith(GSM8K_ROW["question"]) and "####" in first["messages"][0]["content"]
    assert first["fields"]["answer"] == GSM8K_ROW["answer"] and second["fields"] == {"target_chars": 9}


PROMPTS = ["Describe the sea.", "Tell me about cats.", "What is a cloud?", "Describe a forest.",
           "What do bees do?", "Tell me about the moon."]


def test_grpo_trains_on_the_engines_answers_and_the_reward_rises(ray_head, tmp_path):
    """The real job on the default model: a vLLM engine answers each prompt 4 times with the current policy,
    the length reward prefers shorter answers (every answer here runs to max_new_tokens, so it is about the
    characters of 24 tokens), and a few steps raise the reward. The policy moves away from the base (its
    KL), yet the engine's log-probabilities stay those of the trainer's policy (ratios near 1, nothing
    clipped): the engine holds each step's adapter. A stale one also fails the run outright."""
    import yaml

    from tests.conftest import REPO_ROOT
    from tests.test_finetune import finetune, metrics

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p}], "target_chars": 60}) + "\n"
                            for p in PROMPTS))
    config = yaml.safe_load((REPO_ROOT / "jobs/configs/grpo_cpu.yaml").read_text())
    config["grpo"].update(rewards=[{"function": "length"}], max_new_tokens=24, beta=0.04)
    config.update(data={"train": [str(data)], "max_length": 128},
                  optim={"lr": 2e-3, "scheduler": "constant", "warmup_ratio": 0.0},
                  train={"max_steps": 6, "micro_batch_size": 1, "grad_accum": 2, "torch_threads": 1},
                  scaling={"num_workers": 1, "use_gpu": False, "cpus_per_worker": 1},
                  checkpoint={"every_steps": 3}, output={"dir": str(tmp_path / "runs"), "name": "run"})
    (tmp_path / "grpo.yaml").write_text(yaml.safe_dump(config))
    result = finetune(tmp_path / "grpo.yaml", timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    logged = metrics(tmp_path / "runs" / "run")
    assert [m["step"] for m in logged] == list(range(1, 7))
    assert logged[0]["policy_kl"] == pytest.approx(0, abs=1e-4) and logged[0]["loss"] == pytest.approx(0, abs=1e-4)
    assert max(m["policy_kl"] for m in logged) > 0.01, logged  # the policy moved off the base
    assert all(m["clip_fraction"] < 0.05 for m in logged), logged  # and the engine moved with it
    assert all(m["reward_std"] > 0 for m in logged), logged  # every step had something to learn from
    mean = lambda rows: sum(r["reward"] for r in rows) / len(rows)  # noqa: E731
    assert mean(logged[-2:]) > mean(logged[:2]) + 0.02, logged
    assert (tmp_path / "runs" / "run" / "rollout_policy" / "adapter_config.json").is_file()
    summary = json.loads((tmp_path / "runs" / "run" / "summary.json").read_text())
    assert summary["data"]["prompts"] == len(PROMPTS)
