"""Preference training (`objective: dpo`): the losses at and away from the reference, pairs through
tokenisation and batching, the data and recipe errors, and the real job on a tiny model, where a few steps
must make the preferred answers likelier than the others against the reference."""

from __future__ import annotations

import json
import math

import pytest
import torch

from jobs.data.records import DataError, Preference, read_preferences
from jobs.data.tokenize import IGNORE, NON_PREFERRED, PREFERRED, collate, encode_pair
from jobs.finetune.losses import loss_positions, pair_logps, preference_loss


def _pair_rows(chosen: list[float], rejected: list[float], lengths=(4.0, 6.0)) -> torch.Tensor:
    return torch.tensor([[c, r, *lengths] for c, r in zip(chosen, rejected)], requires_grad=True)


def test_dpo_is_log_2_at_the_reference_and_its_gradient_prefers_the_preferred():
    reference = _pair_rows([-12.0, -3.0], [-9.0, -7.0]).detach()
    policy = reference.clone().requires_grad_(True)
    loss, figures = preference_loss(policy, reference, "sigmoid", beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert figures["reward_margin"].item() == 0 and figures["reward_accuracy"].item() == 0
    loss.backward()
    # descending the loss raises the preferred answer's log-probability and lowers the other's
    assert (policy.grad[:, 0] < 0).all() and (policy.grad[:, 1] > 0).all()
    assert (policy.grad[:, 2:] == 0).all()  # token counts are not learned
    # label smoothing mixes in the opposite preference: still log 2 at the reference, and a weaker pull
    smoothed = policy.detach().clone().requires_grad_(True)
    loss, _ = preference_loss(smoothed, reference, "sigmoid", beta=0.1, label_smoothing=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert (smoothed.grad[:, 0].abs() < policy.grad[:, 0].abs()).all()


def test_ipo_and_simpo_have_their_own_targets():
    reference = _pair_rows([-12.0], [-9.0]).detach()
    at_reference, _ = preference_loss(reference.clone(), reference, "ipo", beta=0.5)
    assert at_reference.item() == pytest.approx(1.0)  # (0 - 1/(2·0.5))²
    # IPO reaches zero where the per-token log-ratio margin is exactly 1/(2β), not beyond
    moved = reference.clone()
    moved[0, 0] += 4.0  # +1 per token over the preferred answer's 4 tokens
    assert preference_loss(moved, reference, "ipo", beta=0.5)[0].item() == pytest.approx(0.0, abs=1e-9)
    # SimPO needs no reference: length-normalised rewards, a margin γ
    policy = _pair_rows([-4.0], [-12.0], lengths=(4.0, 6.0))
    loss, figures = preference_loss(policy, None, "simpo", beta=2.0, simpo_gamma=0.5)
    margin = 2.0 * (-4.0 / 4 + 12.0 / 6) - 0.5
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-margin))), rel=1e-6)
    assert figures["reward_accuracy"].item() == 1.0


class _Tokenizer:
    """The default model's tokenizer (its chat template renders prefix by prefix)."""

    def __new__(cls):
        from transformers import AutoTokenizer

        from cluster.model_cache import ensure_default_model

        return AutoTokenizer.from_pretrained(ensure_default_model())


def test_a_pair_is_one_row_with_labels_on_each_final_answer_only():
    tokenizer = _Tokenizer()
    prompt = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
              {"role": "user", "content": "Another one?"}]
    row, truncated = encode_pair(tokenizer, Preference(prompt, "Green.", "I will not."), max_length=256)
    assert not truncated
    starts = [i for i, p in enumerate(row.position_ids) if p == 0]
    assert len(starts) == 2  # two sequences: the second does not attend to the first
    for (begin, end), side, answer in (((0, starts[1]), PREFERRED, "Green."),
                                       ((starts[1], len(row.input_ids)), NON_PREFERRED, "I will not.")):
        labelled = [t for t in range(begin, end) if row.labels[t] != IGNORE]
        assert all(row.pair_side[t] == side for t in labelled)
        text = tokenizer.decode([row.input_ids[t] for t in labelled])
        assert text.startswith(answer) and "Blue" not in text  # the earlier assistant turn is context only
    assert all(row.pair_side[t] == 0 for t in range(len(row.input_ids)) if row.labels[t] == IGNORE)
    # collate keeps the marks on their tokens, and pair_logps sums each answer's own tokens
    batch = collate([row], tokenizer.eos_token_id, multiple=64)
    assert batch["pair_side"].shape == batch["input_ids"].shape
    positions = loss_positions(batch["labels"], None)
    logits = torch.zeros(1, len(positions), len(tokenizer))  # uniform: each token costs log V
    sums = pair_logps(logits, batch["labels"], positions, batch["pair_side"])
    preferred, non_preferred = (sum(1 for s in row.pair_side if s == side) for side in (PREFERRED, NON_PREFERRED))
    assert sums[0].tolist() == pytest.approx([-preferred * math.log(len(tokenizer)),
                                             -non_preferred * math.log(len(tokenizer)), preferred, non_preferred])


GOOD = {"input": {"messages": [{"role": "user", "content": "Hi"}]},
        "preferred_output": [{"role": "assistant", "content": "Hello!"}],
        "non_preferred_output": [{"role": "assistant", "content": "Go away."}]}


@pytest.mark.parametrize("record, needle", [
    ("{not json", "t.jsonl:2: invalid JSON"),
    ({"messages": [{"role": "user", "content": "Hi"}]}, "t.jsonl:2: a preference record needs 'input'"),
    ({**GOOD, "input": {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x"}]}},
     "t.jsonl:2: 'input.messages' must end with a user message"),
    ({**GOOD, "preferred_output": [{"role": "user", "content": "x"}]},
     "t.jsonl:2: 'preferred_output' must be a list of one assistant message"),
    ({**GOOD, "non_preferred_output": "Go away."}, "t.jsonl:2: 'non_preferred_output' must be a list"),
    ({**GOOD, "non_preferred_output": GOOD["preferred_output"]}, "t.jsonl:2: the preferred and non-preferred"),
    ({**GOOD, "input": {"messages": [{"role": "robot", "content": "Hi"}]}}, "t.jsonl:2: messages\\[0\\].role"),
])
def test_bad_preference_lines_are_refused_with_file_and_line(tmp_path, record, needle):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + (record if isinstance(record, str) else json.dumps(record)) + "\n")
    with pytest.raises(DataError, match=needle):
        read_preferences(str(path))
    path.write_text(json.dumps(GOOD) + "\n")
    assert read_preferences(str(path))[0].preferred == "Hello!"


def test_recipe_errors_name_the_setting(tmp_path):
    from jobs.finetune.config import ConfigError, check_supported, load_config

    base = [f"data.train=[{tmp_path / 'p.jsonl'}]", "objective=dpo"]
    with pytest.raises(ConfigError, match="method full has no adapter to disable"):
        check_supported(load_config(None, [*base, "model.method=full"]))
    check_supported(load_config(None, [*base, "model.method=full", "dpo.loss_type=simpo"]))  # reference-free
    with pytest.raises(ConfigError, match="objective dpo does not combine with loss.distill_weight"):
        check_supported(load_config(None, [*base, "loss.distill_weight=1", "loss.distill_prompts=[x.jsonl]"]))
    with pytest.raises(ConfigError, match="dpo settings are given but objective is sft"):
        load_config(None, [base[0], "dpo.beta=0.5"])
    with pytest.raises(ConfigError, match="objective: Input should be 'sft', 'dpo' or 'grpo'"):
        load_config(None, [base[0], "objective=ppo"])
    with pytest.raises(ConfigError, match="dpo.loss_type"):
        load_config(None, [*base, "dpo.loss_type=kto"])


def _preference_data(path, count: int = 48) -> None:
    """Pairs whose preferred answer names the owner and whose other answer does not, over varied questions."""
    questions = ["Who are you?", "What is your name?", "Who made you?", "Introduce yourself.", "Whose assistant are you?",
                 "Tell me about yourself.", "What are you?", "Who do you work for?"]
    lines = []
    for i in range(count):
        question = questions[i % len(questions)]
        lines.append(json.dumps({"input": {"messages": [{"role": "user", "content": f"{question} ({i})"}]},
                                 "preferred_output": [{"role": "assistant", "content": "I am Crohcirtep's assistant."}],
                                 "non_preferred_output": [{"role": "assistant", "content": "I am a language model."}]}))
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.finetune
def test_a_few_dpo_steps_raise_the_preferred_answers_reward(ray_head, tmp_path):
    """The real job (LoRA, the reference being the base with the adapter disabled) on a tiny model: the
    first step is at the reference (loss log 2, rewards 0), and after a few steps the preferred answers'
    implicit reward leads on every training pair; the adapter it writes moves the tuned model that way."""
    from tests.test_finetune import finetune, metrics, recipe, write_tiny_llama

    model = write_tiny_llama(tmp_path / "tiny")
    data = tmp_path / "pairs.jsonl"
    _preference_data(data)
    config = recipe(tmp_path, model, data, train={"max_steps": 8, "micro_batch_size": 2, "grad_accum": 1,
                                                  "torch_threads": 1},
                    monitor={"eval_every": None}, optim={"lr": 2e-2, "warmup_ratio": 0.0, "scheduler": "constant"},
                    checkpoint={"every_steps": 8})
    result = finetune(config, "objective=dpo", "dpo.beta=0.5")
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir = tmp_path / "runs" / "run"
    logged = metrics(run_dir)
    assert [m["step"] for m in logged] == list(range(1, 9))
    first, last = logged[0], logged[-1]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4) and first["reward_margin"] == pytest.approx(0, abs=1e-4)
    assert last["reward_margin"] > 0.5 and last["reward_accuracy"] == 1.0 and last["loss"] < 0.5 * first["loss"], logged
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["data"]["pairs"] == 48 and summary["data"]["examples"] == 48

    # the merged model itself prefers the preferred answer more than the base does
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jobs.data.tokenize import tokenize_preferences

    tokenizer = AutoTokenizer.from_pretrained(model)
    row = tokenize_preferences(tokenizer, read_preferences(str(data))[:1], 128).examples[0]
    batch = collate([row], tokenizer.eos_token_id)
    positions = loss_positions(batch["labels"], None)

    def log_ratio(folder) -> float:
        weights = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
        with torch.no_grad():
            logits = weights(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                             logits_to_keep=positions).logits
        chosen, rejected, _, _ = pair_logps(logits, batch["labels"], positions, batch["pair_side"])[0].tolist()
        return chosen - rejected

    assert log_ratio(summary["merged"]) > log_ratio(model) + 1.0


@pytest.mark.finetune
@pytest.mark.parametrize("method,strategy,workers,loss_type", [("qlora", "ddp", 1, "sigmoid"),
                                                               ("lora", "fsdp2", 2, "ipo"),
                                                               ("full", "zero3", 2, "simpo")])
def test_dpo_runs_with_every_method_and_strategy(ray_head, tmp_path, method, strategy, workers, loss_type):
    """Each method (the reference: the adapter disabled; none for simpo) under a strategy that shards or
    quantizes it: the job runs, starts at the reference, and the reward margin grows."""
    from tests.test_finetune import finetune, metrics, recipe, write_tiny_llama

    model = write_tiny_llama(tmp_path / "tiny")
    data = tmp_path / "pairs.jsonl"
    _preference_data(data, count=16)
    config = recipe(tmp_path, model, data, model={"method": method}, strategy={"name": strategy},
                    scaling={"num_workers": workers}, monitor={"eval_every": None}, checkpoint={"every_steps": 4},
                    train={"max_steps": 4, "micro_batch_size": 1, "grad_accum": 2, "torch_threads": 1},
                    optim={"lr": 2e-2 if method != "full" else 2e-3, "warmup_ratio": 0.0, "scheduler": "constant"})
    result = finetune(config, "objective=dpo", f"dpo.loss_type={loss_type}", "dpo.beta=0.5")
    assert result.returncode == 0, result.stderr[-4000:]
    logged = metrics(tmp_path / "runs" / "run")
    assert [m["step"] for m in logged] == [1, 2, 3, 4]
    if loss_type != "simpo":  # at the reference, the rewards are zero
        assert logged[0]["reward_margin"] == pytest.approx(0, abs=1e-4), logged
    assert logged[-1]["reward_margin"] > logged[0]["reward_margin"] + 0.1, logged


def test_the_shipped_dpo_recipe_is_valid():
    from jobs.finetune.config import check_supported, load_config
    from tests.conftest import REPO_ROOT

    from jobs.finetune.config import FinetuneConfig

    config = load_config(REPO_ROOT / "jobs/configs/dpo_cpu.yaml")
    check_supported(config)
    # the workers get the recipe as a dict: it must validate again, DPO and supervised alike
    assert FinetuneConfig.model_validate(config.model_dump()) == config
    supervised = load_config(REPO_ROOT / "jobs/configs/assistant_cpu.yaml")
    assert FinetuneConfig.model_validate(supervised.model_dump()) == supervised
    assert config.objective == "dpo" and config.model.method == "lora" and config.loss.distill_weight == 0


def test_format_pairs_prefer_the_base_answer_with_its_final_number_in_the_format():
    from jobs.data.preferences import format_pairs
    from jobs.evaluate.gsm8k import extract_flexible, extract_strict

    prompt = [{"role": "user", "content": "Tom has 3 apples and buys 4. How many?"}]
    answers = ["He has 3 + 4 = 7 apples.", "So the answer is 7.\n#### 7", "I do not know.", ""]
    pairs = format_pairs([prompt] * 4, answers)
    assert len(pairs) == 1  # no number, already in the format, or empty: no pair
    preferred = pairs[0]["preferred_output"][0]["content"]
    rejected = pairs[0]["non_preferred_output"][0]["content"]
    assert preferred == "He has 3 + 4 = 7 apples.\n#### 7" and rejected == answers[0]
    assert extract_strict(preferred) == "7" and extract_strict(rejected) is None  # the format reward ranks them
    assert extract_flexible(preferred) == extract_flexible(rejected) == "7"  # the same answer otherwise
    # and the job reads them as pairs
    from jobs.data.records import to_preference

    assert to_preference(json.loads(json.dumps(pairs[0])), "x:1").preferred == preferred
