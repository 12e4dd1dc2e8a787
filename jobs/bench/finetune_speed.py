"""QLoRA training throughput and peak GPU memory: our Ray Train job (the seed recipe's config) against the
seed's plain transformers+peft loop, on the same model folder, same sequence length and LoRA rank."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from jobs.bench.common import add_model_arguments, bench_model, markdown_table, write_results

REPO_ROOT = Path(__file__).resolve().parents[2]


def baseline(model: Path, steps: int, seq: int, rank: int) -> dict:
    result = subprocess.run([sys.executable, "-m", "jobs.bench.qlora_baseline", "--model", str(model),
                             "--steps", str(steps), "--seq", str(seq), "--rank", str(rank)],
                            cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"baseline failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def training_data(work: Path, steps: int, seq: int, rows_per_step: int = 1) -> Path:
    """Enough identity conversations for `steps` steps of packed `seq`-token rows (~55 tokens each)."""
    from jobs.data import identity
    from jobs.data.records import write_jsonl

    data = work / f"data-{steps * rows_per_step}x{seq}.jsonl"
    if not data.exists():
        write_jsonl(data, identity.training_conversations("Crohcirtep", steps * rows_per_step * seq // 40 + 200))
    return data


def job_throughput(config: str, model: Path, work: Path, name: str, steps: int, seq: int,
                   overrides: list[str], rows_per_step: int = 1) -> dict:
    """Run our fine-tune job for `steps` optimizer steps; mean global tokens/s after 2 warm-up steps and
    the peak GPU memory of rank 0."""
    data = training_data(work, steps, seq, rows_per_step)
    run_dir = work / "runs" / name
    if run_dir.exists():  # a fresh run each time, never a resume of an earlier one
        shutil.rmtree(run_dir)
    command = [sys.executable, "-m", "jobs.finetune", "--config", str(REPO_ROOT / config),
               f"model.path={model}", f"data.train=[{data}]", f"data.max_length={seq}",
               f"train.max_steps={steps}", "train.grad_accum=1", "monitor.eval_every=null",
               f"checkpoint.every_steps={steps}", "output.merge=false", f"output.dir={work / 'runs'}",
               f"output.name={name}", *overrides]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"fine-tune job {name} failed:\n{result.stderr[-3000:]}")
    from jobs.finetune.loop import read_metrics

    metrics = read_metrics(run_dir)
    timed = metrics[2:] or metrics  # the first two steps warm up (allocator, kernels)
    return {"tokens_per_s": round(sum(m["tokens_per_s"] for m in timed) / len(timed), 1),
            "peak_mem_gib": max(m.get("peak_mem_gib", 0.0) for m in metrics),
            "step_tokens_per_s": [round(m["tokens_per_s"]) for m in metrics]}


def ours(model: Path, work: Path, steps: int, seq: int, rank: int, overrides: list[str]) -> dict:
    from jobs.finetune.config import load_config

    config = REPO_ROOT / "jobs/configs/qlora_seed.yaml"
    micro_batch = load_config(config, ["data.train=[unused]", *overrides]).train.micro_batch_size
    result = job_throughput(str(config), model, work, f"qlora-bench-{model.name}", steps, seq,
                            [f"lora.r={rank}", *overrides], rows_per_step=micro_batch)
    return {"contender": "our job (Ray Train)", **result}


def scaling(model: Path, work: Path, steps: int, seq: int, setups: list[str], workers: list[int]) -> list[dict]:
    """Each `method-strategy` setup (e.g. lora-zero2, full-zero3) at each worker count: global tokens/s and
    the scaling efficiency against the smallest count (tokens/s per worker, relative)."""
    rows = []
    for setup in setups:
        method, strategy = setup.split("-")
        base = None
        for count in workers:
            result = job_throughput("jobs/configs/full_zero3.yaml", model, work, f"scaling-{setup}-{count}", steps,
                                    seq, [f"model.method={method}", f"strategy.name={strategy}",
                                          f"scaling.num_workers={count}"], rows_per_step=count)
            base = base or (count, result["tokens_per_s"])
            rows.append({"setup": setup, "workers": count, "tokens_per_s": result["tokens_per_s"],
                         "speedup": round(result["tokens_per_s"] / base[1], 3),
                         "efficiency": round(result["tokens_per_s"] / base[1] * base[0] / count, 3),
                         "peak_mem_gib": result["peak_mem_gib"], "step_tokens_per_s": result["step_tokens_per_s"]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def run(model: Path, work: Path, steps: int, seq: int, rank: int, variants: dict[str, list[str]]) -> list[dict]:
    """The plain loop once, then our job once per variant (name -> recipe overrides)."""
    base = baseline(model, steps, seq, rank)
    base["tokens_per_s_ratio"] = 1.0
    print(json.dumps(base), flush=True)
    rows = [base]
    for name, overrides in variants.items():
        mine = ours(model, work, steps, seq, rank, overrides)
        mine["contender"] = f"our job: {name}"
        mine["tokens_per_s_ratio"] = round(mine["tokens_per_s"] / base["tokens_per_s"], 3)
        print(json.dumps(mine), flush=True)
        rows.append(mine)
    return rows


def finetune_benchmark(args: argparse.Namespace) -> None:
    work = Path(args.work).resolve()
    model = bench_model(args, work, random_weights=True)
    variants = {name: overrides.split(",") if overrides else []
                for name, _, overrides in (v.partition(":") for v in args.variant)} or {"recipe": args.overrides}
    rows = run(model, work, args.steps, args.seq, args.rank, variants)
    print("\n" + markdown_table(rows, ["contender", "tokens_per_s", "peak_mem_gib", "tokens_per_s_ratio"]))
    write_results(args, rows, model=str(model))


def scaling_benchmark(args: argparse.Namespace) -> None:
    work = Path(args.work).resolve()
    model = bench_model(args, work, random_weights=True)
    rows = scaling(model, work, args.steps, args.seq, args.setups.split(","),
                   [int(w) for w in args.workers.split(",")])
    print("\n" + markdown_table(rows, ["setup", "workers", "tokens_per_s", "speedup", "efficiency", "peak_mem_gib"]))
    write_results(args, rows, model=str(model))


def add_command(sub) -> None:
    """This module's `python -m jobs.bench` command(s)."""
    tune = sub.add_parser("finetune", help="QLoRA tok/s and peak memory: our Ray Train job vs a plain peft loop")
    add_model_arguments(tune, "llama3-8b", "runs/bench-finetune", "random weights")
    tune.add_argument("--steps", type=int, default=12)
    tune.add_argument("--seq", type=int, default=1024)
    tune.add_argument("--rank", type=int, default=64)
    tune.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                      help="one run of our job with these recipe overrides (repeatable)")
    tune.add_argument("overrides", nargs="*", help="recipe overrides for our job when no --variant is given")
    scale = sub.add_parser("scaling", help="fine-tune tokens/s at 1 and N workers: ZeRO-2/3 scaling efficiency")
    add_model_arguments(scale, "llama-1.8b", "runs/bench-scaling", "random weights")
    scale.add_argument("--setups", default="lora-zero2,full-zero3", help="comma list of METHOD-STRATEGY")
    scale.add_argument("--workers", default="1,2", help="comma list of worker counts (the first is the base)")
    scale.add_argument("--steps", type=int, default=8)
    scale.add_argument("--seq", type=int, default=1024)
    tune.set_defaults(run=finetune_benchmark)
    scale.set_defaults(run=scaling_benchmark)
