"""Fine-tuning on real Ray Train (the session's head), on a tiny random Llama with the SmolLM2 tokenizer:
every method and strategy trains and its loss falls; resume continues at the right step after a killed
worker and after a re-submit; merges are exact; bad input fails before any worker starts.

These run before the shared app is deployed (ordered by the `finetune` marker), when the head's two
CPUs are free for two training workers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.finetune


@pytest.fixture(scope="module", autouse=True)
def _head(ray_head):
    """The jobs join the session's head, as they join a user's `cluster.local up` head."""
    return ray_head


def write_tiny_llama(folder: Path, heads: int = 4, kv_heads: int = 2) -> Path:
    """A 2-layer random Llama (hidden 64) with SmolLM2's tokenizer and chat template. Initialised wide
    (std 0.3): with the default 0.02 the frozen tied embeddings cap every logit near 1, so LoRA alone
    could not move the loss off uniform."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from cluster.model_cache import ensure_default_model

    tokenizer = AutoTokenizer.from_pretrained(ensure_default_model())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                         tie_word_embeddings=True, initializer_range=0.3, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def identity_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "assistant.jsonl"
    result = subprocess.run([sys.executable, "-m", "jobs.data", "identity", "--name", "Crohcirtep", "--out", str(out),
                             "--count", "240"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return out


def recipe(tmp_path: Path, model_path: Path, data: Path, **sections) -> Path:
    """A small recipe; `sections` replace whole sections' keys (e.g. strategy={"name": "zero3"})."""
    config = {
        "model": {"path": str(model_path), "method": "lora", "dtype": "float32"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": [str(data)], "max_length": 128},
        "optim": {"lr": 3e-2, "warmup_ratio": 0.0, "scheduler": "constant"},
        "train": {"max_steps": 6, "micro_batch_size": 1, "grad_accum": 2, "torch_threads": 1},
        "scaling": {"num_workers": 1, "use_gpu": False, "cpus_per_worker": 1},
        "checkpoint": {"every_steps": 3, "keep": 2},
        "monitor": {"eval_every": 3, "eval_max_tokens": 6, "eval_prompts": ["Who are you?"]},
        "output": {"dir": str(tmp_path / "runs"), "name": "run"},
    }
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def finetune(config: Path, *overrides: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m jobs.finetune` as a user runs it; it joins the session's head (found through
    TUNESERVE_RAY_PORT, like a user's `cluster.local up` head)."""
    return subprocess.run([sys.executable, "-m", "jobs.finetune", "--config", str(config), *overrides],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def metrics(run_dir: Path) -> list[dict]:
    from jobs.finetune.loop import read_metrics

    return read_metrics(run_dir)


def assert_trained(result: subprocess.CompletedProcess, run_dir: Path, steps: int = 6) -> dict:
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    logged = metrics(run_dir)
    assert [m["step"] for m in logged] == list(range(1, steps + 1))
    assert min(m["loss"] for m in logged[-2:]) < 0.95 * logged[0]["loss"], logged  # the loss falls
    assert all(m["tokens_per_s"] > 0 and m["grad_norm"] == m["grad_norm"] for m in logged)
    chat = [json.loads(line) for line in (run_dir / "chat_eval.jsonl").read_text().splitlines()]
    assert [c["step"] for c in chat] == [3, 6] and chat[0]["answers"][0]["prompt"] == "Who are you?"
    assert list((run_dir / "tensorboard").iterdir())
    return summary


def logits(model_path: Path, adapter: Path | None = None):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    ids = torch.arange(100, 140).unsqueeze(0)
    with torch.no_grad():
        return model(input_ids=ids).logits


# -- bad input: each fails before any worker starts --------------------------------------------------


def test_bad_recipes_fail_before_training(tmp_path, tiny_llama, identity_data):
    config = recipe(tmp_path, tiny_llama, identity_data)
    cases = {
        ("nonsense.key=1",): "nonsense: Extra inputs are not permitted",
        ("lora.rank=8",): "lora.rank: Extra inputs are not permitted",
        ("model.method=qlora", "strategy.name=zero3"): "QLoRA with ZeRO-3 is not supported",
        ("model.method=qlora", "strategy.name=fsdp2"): "QLoRA with FSDP2 is not supported",
        ("model.dtype=bfloat16",): "training on CPU works in float32 only",
        ("strategy.offload=true",): "strategy.offload is a DeepSpeed ZeRO option",
        (f"model.path={tmp_path}",): "not a Hugging Face model folder",
        (f"data.train=[{tmp_path / 'missing.jsonl'}]",): "missing.jsonl: data file not found",
        ("data.max_length=20",): "no example has a supervised (assistant) token left",
        ("train.grad_accum=100000",): "fewer than one optimizer step needs",
        ("train.epochs=-1",): "train.epochs: Input should be greater than 0",
        ("model.attn_implementation=packed",): "model.attn_implementation: Input should be 'sdpa', 'packed_sdpa'",
        ("oops",): "expected key.sub=value",
    }
    for overrides, message in cases.items():
        result = finetune(config, *overrides)
        assert result.returncode == 2 and message in result.stderr, (overrides, result.stderr[-2000:])
        assert "RayTrainWorker" not in result.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   '{"messages": [{"role": "wizard", "content": "hi"}]}\n')
    result = finetune(config, f"data.train=[{bad}]")
    assert result.returncode == 2 and "bad.jsonl:2: messages[0].role must be one of" in result.stderr
    bad.write_text("{not json\n")
    result = finetune(config, f"data.train=[{bad}]")
    assert result.returncode == 2 and "bad.jsonl:1: invalid JSON" in result.stderr
    result = finetune(tmp_path / "nope.yaml")
    assert result.returncode == 2 and "nope.yaml: config file not found" in result.stderr


# -- packed attention -----------------------------------------------------------------------------------


def test_cpu_workers_take_no_more_threads_than_their_share_of_the_cores():
    from jobs.finetune.config import TrainSection

    cores = len(os.sched_getaffinity(0))
    assert TrainSection(torch_threads=64).threads_on_this_node() == min(64, cores)
    assert TrainSection(torch_threads=2).threads_on_this_node(local_workers=cores) == 1
    assert TrainSection(torch_threads=2).threads_on_this_node(local_workers=4 * cores) == 1  # never 0
    assert TrainSection().threads_on_this_node(local_workers=2) is None  # unset: the worker's own default


def test_packed_sdpa_is_each_example_alone_and_sdpa_elsewhere(tiny_llama):
    """`model.attn_implementation: packed_sdpa`: on packed rows (two rows, three examples and padding) each
    example's logits are those of the example run alone, and the gradients are sdpa's with its block mask;
    generation (a KV cache, left padding) is sdpa's token for token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jobs.data.tokenize import IGNORE, Example, collate
    from jobs.finetune import attention

    attention.register()
    sdpa, packed = (AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32, attn_implementation=impl)
                    for impl in ("sdpa", attention.NAME))
    examples = [list(range(5, 25)), list(range(40, 50)), list(range(60, 75))]
    rows = [Example(examples[0] + examples[1], [IGNORE] * 30, list(range(20)) + list(range(10))),
            Example(examples[2], [IGNORE] * 15)]
    batch = collate(rows, pad_id=0, multiple=16)
    assert batch["input_ids"].shape == (2, 32) and attention.example_starts(batch["position_ids"]) == [[0, 20, 30],
                                                                                                       [0, 15]]
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    got = packed(**inputs).logits
    for row, start, ids in [(0, 0, examples[0]), (0, 20, examples[1]), (1, 0, examples[2])]:
        with torch.no_grad():
            alone = sdpa(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
        torch.testing.assert_close(got[row, start:start + len(ids)], alone, rtol=1e-4, atol=1e-4)
    got[:, :30].logsumexp(-1).sum().backward()
    sdpa(**inputs).logits[:, :30].logsumexp(-1).sum().backward()
    for (name, a), (_, b) in zip(packed.named_parameters(), sdpa.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.padding_side = "left"
    prompts = tokenizer(["Who are you?", "What is the capital of France, the country?"], return_tensors="pt",
                        padding=True)
    assert (prompts["attention_mask"] == 0).any()
    with torch.no_grad():
        want, generated = (model.generate(**prompts, max_new_tokens=12, do_sample=False, use_cache=True,
                                          pad_token_id=tokenizer.pad_token_id) for model in (sdpa, packed))
    assert torch.equal(generated, want)


# -- methods and strategies ----------------------------------------------------------------------------


def test_lora_ddp_two_workers_loss_falls_and_merge_is_exact(tmp_path, tiny_llama, identity_data):
    result = finetune(recipe(tmp_path, tiny_llama, identity_data, scaling={"num_workers": 2}))
    run_dir = tmp_path / "runs" / "run"
    summary = assert_trained(result, run_dir)
    assert summary["data"]["conversations"] == 240 and summary["data"]["rows"] < 240  # packed
    adapter, merged = Path(summary["adapter"]), Path(summary["merged"])
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert (merged / "config.json").is_file() and (merged / "chat_template.jinja").is_file()
    # merged logits == base + adapter logits; and the adapter changed the model
    with_adapter, from_merged = logits(tiny_llama, adapter), logits(merged)
    assert (with_adapter - from_merged).abs().max() < 1e-4
    assert (with_adapter - logits(tiny_llama)).abs().max() > 1e-3
    # the export CLI gives the same merge
    again = tmp_path / "merged-again"
    cli = subprocess.run([sys.executable, "-m", "jobs.export", "merge", "--base", str(tiny_llama), "--adapter",
                          str(adapter), "--out", str(again)], cwd=REPO_ROOT, capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    assert (logits(again) - from_merged).abs().max() < 1e-6
    wrong = subprocess.run([sys.executable, "-m", "jobs.export", "merge", "--base", str(adapter), "--adapter",
                            str(adapter), "--out", str(tmp_path / "x")], cwd=REPO_ROOT, capture_output=True, text=True)
    assert wrong.returncode == 2 and "not a Hugging Face model folder" in wrong.stderr


def test_zero2_trains_on_two_workers(tmp_path, tiny_llama, identity_data):
    """ZeRO-2 with LoRA. ZeRO-3 (full fine-tuning), FSDP2 and QLoRA train with the distillation term in
    tests/test_distill.py, which checks their saved models the same way."""
    result = finetune(recipe(tmp_path, tiny_llama, identity_data, strategy={"name": "zero2"},
                             scaling={"num_workers": 2}))
    summary = assert_trained(result, tmp_path / "runs" / "run")
    assert (logits(tiny_llama, Path(summary["adapter"])) - logits(Path(summary["merged"]))).abs().max() < 1e-4


# -- checkpoints and resume ----------------------------------------------------------------------------


def _worker_pids() -> list[int]:
    from ray.util.state import list_actors

    return [a.pid for a in list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])]


def test_killed_worker_restarts_from_the_last_checkpoint(ray_head, tmp_path, tiny_llama, identity_data):
    config = recipe(tmp_path, tiny_llama, identity_data, train={"max_steps": 10}, checkpoint={"every_steps": 3,
                    "keep": 2, "max_failures": 1}, monitor={"eval_every": None})
    run_dir = tmp_path / "runs" / "run"
    job = subprocess.Popen([sys.executable, "-m", "jobs.finetune", "--config", str(config)], cwd=REPO_ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not ((run_dir / "metrics.jsonl").exists() and metrics(run_dir) and metrics(run_dir)[-1]["step"] >= 4
               and list(run_dir.glob("checkpoint_*/progress.json"))):
        assert job.poll() is None and time.monotonic() < deadline, "training did not reach step 4"
        time.sleep(0.2)
    time.sleep(2)  # the controller registers a reported checkpoint when it next polls the workers
    pids = _worker_pids()
    assert len(pids) == 1
    os.kill(pids[0], signal.SIGKILL)
    output, _ = job.communicate(timeout=300)
    assert job.returncode == 0, output[-4000:]
    attempts = [json.loads(line) for line in (run_dir / "attempts.jsonl").read_text().splitlines()]
    assert [a["start_step"] for a in attempts][0] == 0 and len(attempts) == 2, attempts  # one restart...
    assert attempts[1]["start_step"] in (3, 6), attempts  # ...from a checkpoint (every 3 steps) before the kill
    # metrics.jsonl keeps the lines up to the checkpoint and continues from there: each step once
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, 11))
    kept = [json.loads((p / "progress.json").read_text())["step"] for p in run_dir.glob("checkpoint_*") if p.is_dir()]
    assert sorted(kept) == [9, 10]  # checkpoint.keep=2: the last two
    # (A re-submit that resumes through `ray job submit` runs in tests/test_multinode.py.)

    # The checkpoints live in shared storage: one whose state holds code, not just training state, is refused
    # on resume, and the code never runs.
    import torch

    marker = tmp_path / "pickle-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    latest = max(run_dir.glob("checkpoint_*/train_state.pt"), key=lambda p: json.loads(
        (p.parent / "progress.json").read_text())["step"])
    torch.save({"trainable": {}, "optimizer": Payload(), "scheduler": {}}, latest)
    tampered = finetune(config, "train.max_steps=12", "checkpoint.max_failures=0")
    assert tampered.returncode != 0 and "refused, it holds more than training state" in (
        tampered.stdout + tampered.stderr), (tampered.stdout + tampered.stderr)[-3000:]
    assert not marker.exists()


def _refuse_everything(gate, base, summary, run):
    """A recipe's own gate evaluator (publish.gate.evaluator: tests.test_finetune:_refuse_everything)."""
    return False, {"base": base, "seen": summary["adapter"]}, ["refused by the recipe's own evaluator"]


def test_the_gate_runs_the_evaluator_the_recipe_names(tmp_path):
    from jobs.finetune.config import GateSection
    from jobs.finetune.publish import PublishError, run_gate

    summary = {"adapter": str(tmp_path / "adapter"), "merged": str(tmp_path / "merged")}
    gate = GateSection(evaluator="tests.test_finetune:_refuse_everything")
    passed, figures, reasons = run_gate(gate, "the-base", summary, None)
    assert (passed, figures["seen"], reasons) == (False, summary["adapter"], ["refused by the recipe's own evaluator"])
    with pytest.raises(PublishError, match="publish.gate.evaluator 'tests.no_such_module:gate'"):
        run_gate(GateSection(evaluator="tests.no_such_module:gate"), "the-base", summary, None)
    with pytest.raises(ValueError, match="'assistant' or 'module:function'"):
        GateSection(evaluator="not a function")
    with pytest.raises(ValueError, match="give heldout"):
        GateSection()  # the assistant evaluator needs its held-out questions
    with pytest.raises(ValueError, match="not both"):
        GateSection(heldout="data/h.jsonl", command=["true"])


def test_a_smoke_run_caps_the_steps_and_the_distillation_prompts_only_where_the_recipe_sets_no_steps(
        tmp_path, monkeypatch):
    """TUNESERVE_MAX_STEPS: at most N steps and the N steps' distillation prompts (one worker x grad_accum 2:
    two a step); an explicit train.max_steps wins; a bad value is refused, naming it."""
    from jobs.finetune.__main__ import plan_steps
    from jobs.finetune.config import ConfigError, load_config
    from jobs.finetune.distill import read_distill_prompts

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"}]}) + "\n"
                               for i in range(50)))
    overrides = [f"loss.distill_prompts=[{prompts}]"]
    cfg = load_config(REPO_ROOT / "jobs/configs/assistant_cpu.yaml", overrides)
    assert plan_steps(cfg, 400)[1] == 400 and len(read_distill_prompts(cfg)) == 50  # 2 epochs of 200 steps
    monkeypatch.setenv("TUNESERVE_MAX_STEPS", "3")
    assert plan_steps(cfg, 400) == (200, 3)
    assert [p[0]["content"] for p in read_distill_prompts(cfg)] == [f"q{i}" for i in range(6)]
    explicit = load_config(REPO_ROOT / "jobs/configs/assistant_cpu.yaml", [*overrides, "train.max_steps=7"])
    assert plan_steps(explicit, 400)[1] == 7 and len(read_distill_prompts(explicit)) == 50
    monkeypatch.setenv("TUNESERVE_MAX_STEPS", "three")
    with pytest.raises(ConfigError, match="TUNESERVE_MAX_STEPS='three'"):
        plan_steps(cfg, 400)
