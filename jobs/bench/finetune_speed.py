"""QLoRA training throughput and peak GPU memory: our Ray Train job (the seed recipe's config) against the
seed's plain transformers+peft loop, on the same model folder, same sequence length and LoRA rank."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def baseline(model: Path, steps: int, seq: int, rank: int) -> dict:
    result = subprocess.run([sys.executable, "-m", "jobs.bench.qlora_baseline", "--model", str(model),
                             "--steps", str(steps), "--seq", str(seq), "--rank", str(rank)],
                            cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"baseline failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def ours(model: Path, work: Path, steps: int, seq: int, rank: int, overrides: list[str]) -> dict:
    from jobs.data import identity
    from jobs.data.records import write_jsonl

    data = work / "data.jsonl"
    # enough packed rows of `seq` tokens for every step (an identity conversation is ~55 tokens)
    write_jsonl(data, identity.training_conversations("Crohcirtep", steps * seq // 40 + 200))
    name = f"qlora-bench-{model.name}"
    run_dir = work / "runs" / name
    if run_dir.exists():  # a fresh run each time, never a resume of an earlier one
        shutil.rmtree(run_dir)
    command = [sys.executable, "-m", "jobs.finetune", "--config", str(REPO_ROOT / "jobs/configs/qlora_seed.yaml"),
               f"model.path={model}", f"data.train=[{data}]", f"data.max_length={seq}", f"lora.r={rank}",
               f"train.max_steps={steps}", "train.grad_accum=1", "monitor.eval_every=null",
               f"checkpoint.every_steps={steps}", "output.merge=false", f"output.dir={work / 'runs'}",
               f"output.name={name}", *overrides]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"fine-tune job failed:\n{result.stderr[-3000:]}")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    timed = metrics[2:] or metrics  # the first two steps warm up (allocator, kernels)
    return {"contender": "tuneserve job (Ray Train)",
            "tokens_per_s": round(sum(m["tokens_per_s"] for m in timed) / len(timed), 1),
            "peak_mem_gib": max(m.get("peak_mem_gib", 0.0) for m in metrics)}


def run(model: Path, work: Path, steps: int, seq: int, rank: int, overrides: list[str]) -> list[dict]:
    base = baseline(model, steps, seq, rank)
    mine = ours(model, work, steps, seq, rank, overrides)
    mine["tokens_per_s_ratio"] = round(mine["tokens_per_s"] / base["tokens_per_s"], 3)
    base["tokens_per_s_ratio"] = 1.0
    return [base, mine]
