"""The GSM8K evaluation job: extraction and scoring, bad input, and real runs (DP=1 vs DP=2 offline engines,
and through the serving slice's endpoint)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jobs.evaluate import gsm8k
from tests.conftest import MODEL_ID, REPO_ROOT, TEST_KEY


@pytest.mark.parametrize("response,strict,flexible", [
    ("She makes 9 * 2 = $18 every day.\n#### 18", "18", "18"),
    ("#### 1,234,567", "1234567", "1234567"),
    ("The answer is $1,000.", None, "1000"),
    ("#### -5\nSo the answer is -5.", "-5", "-5"),
    ("#### 3.50", "3.50", "3.50"),
    ("First 12, then 7. Final: 19.", None, "19"),
    ("#### 42 apples, but really 41", "42", "41"),  # strict takes '#### N', flexible the last number
    ("no numbers here", None, None),
    ("####18", None, "18"),  # strict needs the space after ####
    ("Total: $5,000.00.", None, "5000.00"),
])
def test_extraction(response, strict, flexible):
    assert gsm8k.extract_strict(response) == strict
    assert gsm8k.extract_flexible(response) == flexible


def test_scoring_is_exact_after_normalisation():
    example = gsm8k.Example(0, "q", gsm8k.reference_answer("work\n#### 1,200"))
    assert example.answer == "1200"
    assert gsm8k.score(example, "#### 1,200")["strict_correct"]
    assert not gsm8k.score(example, "#### 1200.5")["strict_correct"]
    assert gsm8k.score(example, "it is $1200.")["flexible_correct"]
    assert not gsm8k.score(example, "it is 12000")["flexible_correct"]


def test_shared_gsm8k_loads():
    examples = gsm8k.load("gsm8k", limit=5)
    assert len(examples) == 5 and examples[0].answer == "18"
    assert examples[0].prompt()[0]["content"].endswith(gsm8k.INSTRUCTION)


def test_bad_datasets(tmp_path):
    with pytest.raises(gsm8k.DatasetError, match="not found"):
        gsm8k.load(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "answer": "#### 1"}\n{"question": oops}\n')
    with pytest.raises(gsm8k.DatasetError, match=r"bad.jsonl:2: not valid JSON"):
        gsm8k.load(str(bad))
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"q": "a"}\n')
    with pytest.raises(gsm8k.DatasetError, match=r"wrong.jsonl:1: .*'question' and 'answer'"):
        gsm8k.load(str(wrong))


def _evaluate(*args: str, env: dict | None = None, own_ray: bool = False) -> subprocess.CompletedProcess:
    """Run the job as a user would. With own_ray, it finds no cluster to join and starts its own Ray."""
    base = dict(os.environ)
    if own_ray:
        base = {k: v for k, v in base.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
        base["TUNESERVE_RAY_PORT"] = "1"  # nothing listens there: the session's head is not joined
    return subprocess.run([sys.executable, "-m", "jobs.evaluate", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=900, env={**base, **(env or {})})


def test_cli_errors_are_clear(tmp_path, server):
    missing = _evaluate("--dataset", str(tmp_path / "nope.jsonl"), "--endpoint", f"{server}/v1")
    assert missing.returncode == 2 and "dataset file not found" in missing.stderr
    unreachable = _evaluate("--endpoint", "http://127.0.0.1:9/v1", "--limit", "1")
    assert unreachable.returncode == 2 and "cannot reach the endpoint" in unreachable.stderr
    unknown = _evaluate("--endpoint", f"{server}/v1", "--model", "nope", "--limit", "1",
                        env={"TUNESERVE_API_KEY": TEST_KEY})
    assert unknown.returncode == 2 and "model 'nope' is not served" in unknown.stderr
    too_big = _evaluate("--mode", "tp", "--tensor-parallel", "64", "--limit", "1", own_ray=True)
    assert too_big.returncode == 2 and "need 64 CPUs" in too_big.stderr


def test_endpoint_run_against_the_serving_slice(server, tmp_path):
    out = tmp_path / "endpoint"
    result = _evaluate("--endpoint", f"{server}/v1", "--model", MODEL_ID, "--limit", "4", "--max-tokens", "64",
                       "--out", str(out), env={"TUNESERVE_API_KEY": TEST_KEY})
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert summary["mode"] == "endpoint" and summary["questions"] == 4
    assert 0 <= summary["strict_acc"] <= 1 and 0 <= summary["flexible_acc"] <= 1
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["index"] for s in samples] == [0, 1, 2, 3] and all(s["response"] for s in samples)


@pytest.mark.evaluate_offline
def test_dp1_and_dp2_give_identical_outputs(tmp_path):
    """Two offline engines as Ray actors split the questions and merge them back in order; at temperature 0
    the per-example outputs match one engine's. Runs in its own local Ray (the job's own path).

    Not every output is byte-identical: one engine batches 10 prompts and each of two engines 5, and float32
    sums over other batch shapes can flip a late greedy choice (seen once in CI: question 19 diverged after
    its first sentence). So every answer must begin the same way (the right question in the right place),
    and all but one must be identical."""
    runs = {}
    for replicas in (1, 2):
        out = tmp_path / f"dp{replicas}"
        result = _evaluate("--mode", "dp", "--replicas", str(replicas), "--limit", "10", "--max-tokens", "64",
                           "--out", str(out), own_ray=True)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[replicas] = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["index"] for s in runs[2]] == list(range(10))
    pairs = [(one["response"], two["response"]) for one, two in zip(runs[1], runs[2])]
    assert all(one[:40] == two[:40] for one, two in pairs), pairs
    assert sum(one == two for one, two in pairs) >= len(pairs) - 1, pairs
    table = _evaluate("--compare", str(tmp_path / "dp1" / "results.json"), str(tmp_path / "dp2" / "results.json"))
    assert "| dp1 | dp | 1 |" in table.stdout and "| dp2 | dp | 2 |" in table.stdout
