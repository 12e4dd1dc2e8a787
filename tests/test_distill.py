"""Self-distillation in the fine-tune recipe (`loss.distill_*`): the loss itself, its targets through
packing and batching, its config and data errors, and the real job on a tiny model, where it must pull the
tuned model's distribution on general prompts towards the base's, with every method and strategy."""

from __future__ import annotations

import gzip
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from jobs.data.tokenize import IGNORE, Example, collate, pack
from jobs.finetune.losses import distill_kl, greedy_margin, lm_loss, loss_positions


def _targets_from(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    top = torch.log_softmax(logits, -1).topk(k, dim=-1)
    return top.indices, top.values


def test_the_kl_is_zero_at_the_teacher_and_its_gradient_leads_there():
    torch.manual_seed(0)
    teacher = torch.randn(1, 9, 50) * 3
    positions = torch.tensor([[0, t] for t in range(1, 9)])
    ids, logprobs = _targets_from(teacher[0, :8], k=5)  # token t's target is the distribution at t-1
    assert distill_kl(teacher, positions, ids, logprobs).item() == pytest.approx(0, abs=1e-5)

    student = torch.randn(1, 9, 50, requires_grad=True)
    start = distill_kl(student, positions, ids, logprobs)
    assert start.item() > 0.1
    optimizer = torch.optim.Adam([student], lr=0.1)
    for _ in range(400):
        optimizer.zero_grad()
        distill_kl(student, positions, ids, logprobs).backward()
        optimizer.step()
    assert distill_kl(student, positions, ids, logprobs).item() < 1e-3 * start.item()
    # Only the teacher's top-k and the rest's total are targets: the student's mass on the k tokens now
    # matches the teacher's (it is not renormalised to 1, which would sharpen the student).
    teacher_p = torch.softmax(teacher[0, :8], -1).gather(-1, ids)
    student_p = torch.softmax(student.detach()[0, :8], -1).gather(-1, ids)
    assert torch.allclose(student_p, teacher_p, atol=0.02)


def test_a_batch_with_one_kind_of_token_has_one_term():
    logits = torch.randn(1, 6, 30, requires_grad=True)
    labels = torch.full((1, 6), IGNORE)
    loss, parts = lm_loss(logits, labels, {}, 1.0)  # nothing to learn: zero, and still a graph
    assert loss.item() == 0 and parts == {} and loss.requires_grad
    labels[0, 3:] = 7
    loss, parts = lm_loss(logits, labels, {}, 1.0)
    assert set(parts) == {"ce"} and loss.item() == pytest.approx(parts["ce"].item())
    ids, logprobs = _targets_from(torch.randn(2, 30), 4)
    distill = {"distill_positions": torch.tensor([[0, 1], [0, 2]]), "distill_ids": ids, "distill_logprobs": logprobs}
    loss, parts = lm_loss(logits, labels, distill, 0.5)
    assert loss.item() == pytest.approx(parts["ce"].item() + 0.5 * parts["kl"].item(), rel=1e-5)


def test_the_loss_from_the_needed_logits_only_is_the_loss_from_all():
    """The job computes logits only where the loss reads them (`loss_positions`): same loss, same gradient."""
    torch.manual_seed(0)
    full = torch.randn(2, 12, 30, requires_grad=True)
    labels = torch.full((2, 12), IGNORE)
    labels[0, 4:7] = torch.tensor([3, 4, 5])  # a prompt before it, filler after it
    labels[1, 9] = 8
    ids, logprobs = _targets_from(torch.randn(3, 30), 4)
    distill = {"distill_positions": torch.tensor([[1, 2], [1, 3], [0, 10]]), "distill_ids": ids,
               "distill_logprobs": logprobs}
    positions = loss_positions(labels, distill)
    assert positions.tolist() == [1, 2, 3, 4, 5, 8, 9]  # before each labelled or distilled token, in any row
    want, want_parts = lm_loss(full, labels, distill, 0.7)
    (want_grad,) = torch.autograd.grad(want, full)
    got, got_parts = lm_loss(full[:, positions], labels, distill, 0.7, positions)
    (got_grad,) = torch.autograd.grad(got, full)
    assert got.item() == pytest.approx(want.item(), rel=1e-6) and set(got_parts) == {"ce", "kl"}
    assert got_parts["kl"].item() == pytest.approx(want_parts["kl"].item(), rel=1e-6)
    assert torch.allclose(got_grad, want_grad, atol=1e-7)
    nothing = loss_positions(torch.full((1, 5), IGNORE), None)  # one position, so the batch keeps a graph
    assert nothing.tolist() == [0] and lm_loss(full[:1, nothing], labels[:1, :5] * 0 + IGNORE, None, 0.0,
                                              nothing)[0].requires_grad


def test_a_model_gives_the_same_loss_from_the_needed_logits(tiny_llama):
    """`logits_to_keep` with the loss's positions, as the strategies call the model: the same loss as from
    the full logits, on a real (tiny) Llama and a packed row."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    rows = pack([Example(list(range(5, 25)), [IGNORE] * 12 + list(range(17, 25))),
                 Example(list(range(40, 50)), [IGNORE] * 6 + list(range(46, 50)))], max_length=32, seed=0)
    batch = collate(rows, pad_id=0, multiple=16)
    labels = batch.pop("labels")
    positions = loss_positions(labels, None)
    assert len(positions) == 12 < labels.shape[1] - 1
    with torch.no_grad():
        want, _ = lm_loss(model(**batch, use_cache=False).logits, labels, None, 0.0)
        kept = model(**batch, use_cache=False, logits_to_keep=positions).logits
        got, _ = lm_loss(kept, labels, None, 0.0, positions)
    assert kept.shape[1] == 12 and got.item() == pytest.approx(want.item(), rel=1e-5)


def test_targets_stay_on_their_tokens_through_packing_and_collate():
    def distilled(first: int, n: int) -> Example:
        ids = list(range(first, first + n))
        return Example(ids, [IGNORE] * n, teacher_ids=[[]] + [[i, i + 1] for i in ids[1:]],
                       teacher_logprobs=[[]] + [[-0.5, -1.5] for _ in ids[1:]])

    plain = Example([1, 2, 3, 4], [IGNORE, IGNORE, 3, 4])
    examples = [distilled(100, 5), plain, distilled(200, 3), Example([5, 6, 7], [IGNORE, 6, 7])]
    rows = pack(examples, max_length=8, seed=1)
    assert sum(len(r.input_ids) for r in rows) == 15
    assert all(len(r.teacher_ids) == len(r.input_ids) == len(r.teacher_logprobs) for r in rows)
    batch = collate(rows, pad_id=0, multiple=8)
    assert len(batch["distill_positions"]) == 4 + 2  # every distilled token, none of the others
    for (row, t), ids in zip(batch["distill_positions"].tolist(), batch["distill_ids"].tolist()):
        token = batch["input_ids"][row, t].item()
        assert ids == [token, token + 1] and batch["labels"][row, t] == IGNORE
    assert batch["distill_logprobs"].dtype == torch.float32
    assert "distill_positions" not in collate([plain], pad_id=0)


def test_the_margin_holds_the_base_choice_where_the_kl_barely_sees_a_swap():
    # A near-tie: the base gives tokens 3 and 5 about 0.4 each, 3 ahead by 0.05 nats.
    base = torch.full((1, 2, 10), -4.0)
    base[0, 0, 3], base[0, 0, 5] = 2.0, 1.95
    positions = torch.tensor([[0, 1]])
    ids, logprobs = _targets_from(base[0, :1], k=4)
    assert greedy_margin(base, positions, ids, logprobs, margin=0.3).item() == pytest.approx(0, abs=1e-6)
    swapped = base.clone()
    swapped[0, 0, 3], swapped[0, 0, 5] = 1.95, 2.0  # the greedy answer changes here
    kl = distill_kl(swapped, positions, ids, logprobs).item()
    hinge = greedy_margin(swapped, positions, ids, logprobs, margin=0.3).item()
    assert kl < 2e-3 and hinge == pytest.approx(0.1, abs=1e-4)  # wants the base's 0.05 lead back: 0.05 + 0.05
    # `margin` caps what is asked where the base leads by more; sharpen asks for the margin everywhere
    wide = base.clone()
    wide[0, 0, 3] = 3.0  # base lead 1.05 nats; the student's lead of 0.2 is short of the 0.3 asked
    wide_ids, wide_logprobs = _targets_from(wide[0, :1], k=4)
    student = wide.clone()
    student[0, 0, 3] = 2.15
    assert greedy_margin(student, positions, wide_ids, wide_logprobs, margin=0.3).item() == pytest.approx(0.1, abs=1e-4)
    assert greedy_margin(base, positions, ids, logprobs, margin=0.3, sharpen=True).item() == pytest.approx(0.25, abs=1e-4)
    # its gradient restores the order, and lm_loss adds it with its weight
    student = swapped.clone().requires_grad_()
    optimizer = torch.optim.SGD([student], lr=0.5)
    for _ in range(20):
        optimizer.zero_grad()
        greedy_margin(student, positions, ids, logprobs, margin=0.3).backward()
        optimizer.step()
    assert student[0, 0].argmax().item() == 3
    labels = torch.full((1, 2), IGNORE)
    distill = {"distill_positions": positions, "distill_ids": ids, "distill_logprobs": logprobs}
    loss, parts = lm_loss(swapped, labels, distill, 2.0, margin=0.3, margin_weight=2.0)
    assert parts["margin"].item() == pytest.approx(0.1, abs=1e-4)
    assert loss.item() == pytest.approx(2.0 * (parts["kl"].item() + parts["margin"].item()), rel=1e-5)
    assert "margin" not in lm_loss(swapped, labels, distill, 2.0)[1]  # off by default
    # with a mask (loss.margin_hinge.tokens: openings), only the flagged tokens count
    loss, parts = lm_loss(swapped, labels, {**distill, "distill_margin_mask": torch.tensor([False])}, 2.0,
                          margin=0.3, margin_weight=2.0)
    assert "margin" not in parts


def test_margin_flags_stay_on_their_tokens_through_packing_and_collate():
    from jobs.finetune.distill import to_example

    def target(prompt, answer):
        return {"prompt_ids": prompt, "answer_ids": answer, "top_ids": [[a, 0] for a in answer],
                "top_logprobs": [[-0.1, -2.0] for _ in answer]}

    answer = to_example(target([1, 2, 3], [4, 5, 6]), 64)  # a sampled answer: not flagged
    opening = to_example(target([7, 8], [9, 10]), 64, sample_ce=False, margin=True)
    plain = Example([11, 12], [IGNORE, 12])  # an identity row: no targets at all
    rows = pack([answer, opening, plain], 64)
    assert len(rows) == 1
    batch = collate(rows, pad_id=0, width=16)
    ids = batch["input_ids"][0].tolist()
    hinged = batch["distill_positions"][batch["distill_margin_mask"]][:, 1].tolist()
    assert sorted(ids[t] for t in hinged) == [9, 10]  # exactly the opening's answer tokens
    assert len(batch["distill_margin_mask"]) == 5 and batch["distill_margin_mask"].sum() == 2


def test_recipe_errors_name_the_setting(tmp_path):
    from jobs.finetune.config import ConfigError, load_config

    base = ["data.train=[x.jsonl]"]
    cases = {
        ("loss.distill_weight=1.0",): "distill_weight > 0 needs distill_prompts",
        ("loss.distill_prompts=[p.jsonl]",): "distill_prompts are given but distill_weight is 0",
        ("loss.distill_weight=-1", "loss.distill_prompts=[p.jsonl]"): "loss.distill_weight: Input should be "
                                                                       "greater than or equal to 0",
        ("loss.distill_weight=1", "loss.distill_prompts=[p.jsonl]", "loss.distill_top_k=50"): "loss.distill_top_k",
        ("loss.distill_temperature=-1",): "loss.distill_temperature",
        ("loss.kl=1",): "loss.kl: Extra inputs are not permitted",
        ("loss.distill_opening_tokens=8",): "distill_opening_tokens needs distill_prompts",
        ("loss.distill_weight=1", "loss.distill_prompts=[p.jsonl]", "loss.distill_opening_tokens=-1"):
            "loss.distill_opening_tokens",
        ("loss.margin_hinge.weight=10",): "margin_hinge needs distill_prompts",
        ("loss.distill_weight=1", "loss.distill_prompts=[p.jsonl]", "loss.margin_hinge.weight=10",
         "loss.margin_hinge.tokens=openings"): "margin_hinge.tokens: openings needs distill_opening_tokens",
        ("loss.distill_weight=1", "loss.distill_prompts=[p.jsonl]", "loss.margin_hinge.weight=1",
         "loss.margin_hinge.tokens=answers"): "loss.margin_hinge.tokens",
        ("loss.distill_weight=1", "loss.distill_prompts=[p.jsonl]", "loss.margin_hinge.weight=1",
         "loss.margin_hinge.nats=0"): "loss.margin_hinge.nats",
        ("loss.distill_weight=1", "loss.distill_prompts=[p.jsonl]", "loss.margin_hinge.weight=-1"):
            "loss.margin_hinge.weight",
        ("loss.distill_weight=1", "loss.distill_prompts=[p.jsonl]", "loss.margin_hinge.start=0.5"):
            "loss.margin_hinge.weight: Field required",
        ("loss.distill_weight=1", "loss.distill_prompts=[p.jsonl]", "loss.margin_hinge.weight=1",
         "loss.margin_hinge.start=1"): "loss.margin_hinge.start",
    }
    for overrides, message in cases.items():
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            load_config(None, base + list(overrides))
    ok = load_config(None, base + ["loss.distill_weight=1", "loss.distill_prompts=[p.jsonl]"])
    assert ok.loss.distill_top_k == 20 and ok.loss.distill_temperature == 1.0


def test_prompt_files_are_read_or_refused_with_file_and_line(tmp_path):
    from jobs.data.records import DataError, read_prompts

    good = tmp_path / "prompts.jsonl"
    good.write_text(json.dumps({"prompt": "Name a river."}) + "\n" + json.dumps({"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "dropped: the base writes its own"}]}) + "\n")
    assert read_prompts(str(good)) == [[{"role": "user", "content": "Name a river."}],
                                       [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]]
    bad = tmp_path / "bad.jsonl"
    for text, message in [("", "no records"), ('{"prompt": ""}\n', "bad.jsonl:1: a prompt record needs"),
                          ('{"prompt": "a"}\n{oops\n', "bad.jsonl:2: invalid JSON"),
                          ('{"messages": [{"role": "assistant", "content": "x"}]}\n', "bad.jsonl:1: no user message"),
                          ('{"messages": [{"role": "wizard", "content": "x"}, {"role": "user", "content": "y"}]}\n',
                           "bad.jsonl:1: messages[0].role must be one of")]:
        bad.write_text(text)
        with pytest.raises(DataError) as raised:
            read_prompts(str(bad))
        assert message in str(raised.value)


def test_the_data_tool_writes_distillation_prompts_apart_from_the_held_out_ones(tmp_path):
    import subprocess
    import sys

    from jobs.data.identity import GENERAL_HELDOUT
    from tests.conftest import REPO_ROOT

    out = tmp_path / "assistant.jsonl"
    done = subprocess.run([sys.executable, "-m", "jobs.data", "identity", "--name", "Ada", "--out", str(out),
                           "--count", "10", "--distill", "120"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    prompts = [json.loads(line)["prompt"] for line in (tmp_path / "assistant.distill.jsonl").read_text().splitlines()]
    assert len(prompts) == len(set(prompts)) == 120
    assert not set(prompts) & set(GENERAL_HELDOUT) and "Give me a synonym for 'fast'." not in prompts
    too_many = subprocess.run([sys.executable, "-m", "jobs.data", "identity", "--name", "Ada", "--out", str(out),
                               "--distill", "100000"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert too_many.returncode == 2 and "--distill must be between 0 and" in too_many.stderr


# -- the job, on real Ray Train and a real vLLM teacher ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """test_finetune's tiny Llama with heads of 32 (vLLM's CPU attention's smallest), so the teacher runs."""
    from tests.test_finetune import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama-32"), heads=2, kv_heads=1)


@pytest.fixture(scope="module")
def assistant_data(tmp_path_factory) -> tuple[Path, Path]:
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    out = tmp_path_factory.mktemp("distill-data") / "assistant.jsonl"
    done = subprocess.run([sys.executable, "-m", "jobs.data", "identity", "--name", "Crohcirtep", "--out", str(out),
                           "--count", "60", "--distill", "48"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return out, out.with_name("assistant.distill.jsonl")


def _kl_along(base: Path, tuned: Path, targets: list[dict]) -> float:
    """Full-vocabulary KL(base || tuned) per answer token, along the base's own answers to the distillation
    prompts (the stored targets' token ids): where distillation is asked to hold the tuned model."""
    from transformers import AutoModelForCausalLM

    models = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in (base, tuned)]
    total, count = 0.0, 0
    with torch.no_grad():
        for target in targets:
            ids = torch.tensor([target["prompt_ids"] + target["answer_ids"]])
            start = len(target["prompt_ids"])
            base_lp, tuned_lp = (torch.log_softmax(m(input_ids=ids).logits[0, start - 1:-1], -1) for m in models)
            total += (base_lp.exp() * (base_lp - tuned_lp)).sum().item()
            count += ids.shape[1] - start
    return total / count


@pytest.mark.finetune
def test_distillation_keeps_the_tuned_model_near_the_base(ray_head, tmp_path, tiny_llama, assistant_data):
    """The same LoRA run with and without distillation: with it, the tuned model's next-token distribution
    on the general prompts stays several times closer to the base's, while it still learns the identity
    data. (Whether that carries over to held-out prompts is measured on the real model: docs/notes/finetune-experiments.md.)"""
    from tests.test_finetune import finetune, metrics, recipe

    data, prompts = assistant_data
    runs = {}
    for name, loss in {"plain": {}, "distill": {"distill_weight": 2.0, "distill_prompts": [str(prompts)],
                                                 "distill_max_tokens": 24}}.items():
        (tmp_path / name).mkdir()
        config = recipe(tmp_path / name, tiny_llama, data, train={"max_steps": 12}, monitor={"eval_every": None},
                        optim={"lr": 1e-2}, loss=loss)
        result = finetune(config)
        assert result.returncode == 0, result.stderr[-4000:]
        run_dir = tmp_path / name / "runs" / "run"
        runs[name] = (json.loads((run_dir / "summary.json").read_text()), metrics(run_dir))
    summary, logged = runs["distill"]
    assert summary["data"]["distill_examples"] == 48 and summary["data"]["distill_tokens"] > 48
    with_kl = [m for m in logged if "distill_kl" in m]  # steps whose rows held distillation tokens
    assert len(with_kl) >= len(logged) // 3 and not any("distill_kl" in m for m in runs["plain"][1])
    stored = json.loads(gzip.decompress((tmp_path / "distill" / "runs" / "run" / "distill_targets.json.gz").read_bytes()))
    assert len(stored["targets"]) == 48 and all(len(t["top_ids"]) == len(t["answer_ids"]) for t in stored["targets"])
    plain_kl = _kl_along(tiny_llama, Path(runs["plain"][0]["merged"]), stored["targets"])
    distill_kl_ = _kl_along(tiny_llama, Path(summary["merged"]), stored["targets"])
    # Measured: 1.89 against 3.84 nats per token (the random model's distributions are flat: its top-20
    # holds ~16% of the mass, so the KL it is trained on sees little of them).
    assert distill_kl_ < 0.7 * plain_kl, (distill_kl_, plain_kl)
    # ...and it learned its data all the same. At step 1 the adapter is zero, so the KL is 0 and the loss
    # is the identity data's cross-entropy; the KL only adds later, so a lower loss means a lower CE.
    assert logged[0].get("distill_kl", 0) < 1e-3 and logged[-1]["loss"] < 0.9 * logged[0]["loss"], logged


@pytest.mark.finetune
@pytest.mark.parametrize("method,strategy,workers", [("qlora", "ddp", 1), ("full", "zero3", 2), ("lora", "fsdp2", 2)])
def test_distillation_runs_with_every_method_and_strategy(ray_head, tmp_path, tiny_llama, assistant_data,
                                                          method, strategy, workers):
    """Each combination trains with the KL term and reuses the targets already in its run folder (the
    resume path: no second teacher run, the same targets). The teacher answers greedily here
    (`distill_temperature=0`; the shipped recipe samples at 1): each answer token is its own top-1. The
    greedy openings (`distill_opening_tokens`) are one more short KL-only example per prompt."""
    from tests.test_finetune import finetune, logits, metrics, recipe

    data, prompts = assistant_data
    loss = {"distill_weight": 1.0, "distill_prompts": [str(prompts)], "distill_max_tokens": 24,
            "distill_temperature": 0, "distill_opening_tokens": 4}
    run_dir = tmp_path / "runs" / "run"
    seeded = _seed_targets(tmp_path, tiny_llama, data, prompts, loss)
    if seeded is not None:
        run_dir.mkdir(parents=True)
        shutil.copy(seeded, run_dir / "distill_targets.json.gz")
    lr = {"lr": 2e-3} if method == "full" else {}
    # One combination also runs the greedy-margin hinge, on from halfway (loss.margin_hinge.start)
    hinge = {"margin_hinge": {"weight": 1.0, "start": 0.5}} if strategy == "fsdp2" else {}
    config = recipe(tmp_path, tiny_llama, data, model={"method": method}, strategy={"name": strategy},
                    scaling={"num_workers": workers}, optim=lr, train={"max_steps": 4}, monitor={"eval_every": None},
                    loss={**loss, **hinge})
    result = finetune(config)
    assert result.returncode == 0, result.stderr[-4000:]
    logged = metrics(run_dir)
    assert [m["step"] for m in logged] == [1, 2, 3, 4]
    # The KL is measured, finite and not identically zero: once the weights move, the tuned model's
    # distribution differs from the base's stored one (a KL term that computed nothing would log 0 or none).
    kls = [m["distill_kl"] for m in logged if "distill_kl" in m]
    assert kls and all(math.isfinite(kl) and 0 <= kl < 10 for kl in kls) and max(kls) > 0, kls
    if hinge:  # off for steps 1-2, on for 3-4
        assert not any("distill_margin" in m for m in logged[:2]) and any("distill_margin" in m for m in logged[2:])
    else:
        assert not any("distill_margin" in m for m in logged)
    if seeded is not None:
        assert "distillation targets: reusing" in result.stderr
    else:  # greedy: every answer token is the base's most likely one
        stored = json.loads(gzip.decompress((run_dir / "distill_targets.json.gz").read_bytes()))
        targets, openings = stored["targets"], stored["openings"]
        assert all(t["answer_ids"] == [top[0] for top in t["top_ids"]] for t in targets)
        assert len(openings) == len(targets) == 48
        assert all(0 < len(t["answer_ids"]) <= 4 and t["answer_ids"] == [top[0] for top in t["top_ids"]]
                   for t in openings)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["data"]["distill_examples"] == 2 * 48  # each prompt's answer and its opening
    # What each method saves (the SFT-only tests of these strategies live here, to train once)
    if method == "full":
        assert (logits(Path(summary["model"])) - logits(tiny_llama)).abs().max() > 1e-3
    else:
        assert (logits(tiny_llama, Path(summary["adapter"])) - logits(Path(summary["merged"]))).abs().max() < 1e-4
    if method == "qlora":  # merged into the full-precision base, not the 4-bit one
        assert "quantization_config" not in json.loads((Path(summary["merged"]) / "config.json").read_text())


_TARGETS: dict[str, Path] = {}


def _seed_targets(tmp_path: Path, model: Path, data: Path, prompts: Path, loss: dict) -> Path | None:
    """The first parametrised run makes the targets; later ones start from a copy of them."""
    key = json.dumps([str(model), str(prompts), loss])
    if key in _TARGETS:
        return _TARGETS[key]
    _TARGETS[key] = tmp_path / "runs" / "run" / "distill_targets.json.gz"
    return None


@pytest.mark.finetune
def test_the_sampled_targets_are_the_same_in_every_run(ray_head, tmp_path, tiny_llama, assistant_data):
    """Two teacher runs of one recipe, sampling at temperature 1 (the shipped recipe's), give the same answers
    and top-k: a re-run of the README's commands trains on the targets the documented run trained on."""
    from jobs.finetune.config import load_config
    from jobs.finetune.distill import make_targets, read_distill_prompts
    from tests.test_finetune import recipe

    data, prompts = assistant_data
    cfg = load_config(recipe(tmp_path, tiny_llama, data, loss={
        "distill_weight": 1.0, "distill_prompts": [str(prompts)], "distill_max_tokens": 16,
        "distill_temperature": 1.0}))
    questions = read_distill_prompts(cfg)
    first, second = (make_targets(cfg, questions, on_gpu=False)[0] for _ in range(2))
    assert len(first) == len(second) == 48
    # it sampled: some answer tokens are not the base's most likely one (a greedy teacher is trivially repeatable)
    assert any(token != top[0] for t in first for token, top in zip(t["answer_ids"], t["top_ids"]))
    assert [t["answer_ids"] for t in first] == [t["answer_ids"] for t in second]
    assert [t["top_ids"] for t in first] == [t["top_ids"] for t in second]


def test_input_share_errors_name_the_setting():
    from jobs.finetune.config import ConfigError, check_supported, load_config

    base = ["data.train=[x.jsonl]", "lora.input_share=0.05"]
    distill = ["loss.distill_weight=1", "loss.distill_prompts=[p.jsonl]"]
    cases = {(): "lora.input_share needs loss.distill_prompts",
             ("model.method=full",): "method full has no adapter",
             ("strategy.name=fsdp2",): "strategy.name=ddp only, not fsdp2",
             ("strategy.name=zero2",): "strategy.name=ddp only, not zero2"}
    for overrides, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            check_supported(load_config(None, base + (distill if overrides else []) + list(overrides)))
    for bad in ("lora.input_share=-0.1", "lora.input_share=1.5"):
        with pytest.raises(ConfigError, match="lora.input_share"):
            load_config(None, ["data.train=[x.jsonl]", bad] + distill)
    check_supported(load_config(None, base + distill))  # lora or qlora with ddp: fine


@pytest.mark.finetune
def test_the_adapter_reads_only_the_directions_its_data_uses_more_than_general_text(ray_head, tmp_path, tiny_llama,
                                                                                   assistant_data):
    """`lora.input_share`: the run stores one basis per adapted projection, the exported adapter's lora_A rows
    lie in it (so the merged and served model sees only that part of each input), and the basis holds more of
    the identity data's input energy, relative to the base's general answers, than the whole space does."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jobs.data.records import read_conversations
    from jobs.data.tokenize import tokenize_conversations
    from jobs.finetune.subspace import BASES_FILE, input_covariances
    from tests.test_finetune import finetune, metrics, recipe

    data, prompts = assistant_data
    loss = {"distill_weight": 1.0, "distill_prompts": [str(prompts)], "distill_max_tokens": 16,
            "distill_temperature": 0}
    config = recipe(tmp_path, tiny_llama, data, lora={"r": 4, "alpha": 8, "dropout": 0.0, "input_share": 0.1},
                    train={"max_steps": 4}, monitor={"eval_every": None}, optim={"lr": 1e-2}, loss=loss)
    result = finetune(config)
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir = tmp_path / "runs" / "run"
    assert [m["step"] for m in metrics(run_dir)] == [1, 2, 3, 4]
    bases = torch.load(run_dir / BASES_FILE, weights_only=True)["bases"]
    adapter = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    lora_a = {k.removeprefix("base_model.model.").removesuffix(".lora_A.weight"): v
              for k, v in adapter.items() if k.endswith(".lora_A.weight")}
    assert set(lora_a) == set(bases) and len(bases) == 2 * 7  # 2 layers x 7 projections
    for name, basis in bases.items():
        d, k = basis.shape
        assert k == round(0.1 * d) and torch.allclose(basis.T @ basis, torch.eye(k), atol=1e-4)
        a = lora_a[name]  # r x d, as exported: every row inside span(basis), and not zero
        assert a.norm() > 0.1 and (a - a @ basis @ basis.T).norm() < 1e-4 * a.norm(), name
    assert any(v.norm() > 0 for k, v in adapter.items() if k.endswith(".lora_B.weight"))  # it trained

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    own = [e.input_ids for e in tokenize_conversations(tok, read_conversations(str(data)), 128).examples]
    stored = json.loads(gzip.decompress((run_dir / "distill_targets.json.gz").read_bytes()))
    general = [(t["prompt_ids"] + t["answer_ids"])[:128] for t in stored["targets"]]
    own_c, general_c = (input_covariances(model, seqs, set(bases), "cpu") for seqs in (own, general))
    for name, q in bases.items():
        q = q.double()
        own_share = (q.T @ own_c[name] @ q).trace() / own_c[name].trace()
        general_share = (q.T @ general_c[name] @ q).trace() / general_c[name].trace()
        assert own_share > 1.5 * general_share, (name, own_share.item(), general_share.item())
