"""The GSM8K evaluate job (`python -m jobs.evaluate`) run data-parallel and tensor-parallel on the same
model and questions, one after the other: wall time and output tokens/s, and the speed-up over the first.

With dummy weights the answers are noise: only the timing columns mean anything."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

from jobs.bench.common import add_model_arguments, bench_model, markdown_table, write_results

REPO_ROOT = Path(__file__).resolve().parents[2]


def evaluate_args(run: str) -> list[str]:
    """`dp2` -> two data-parallel replicas; `tp2` -> one engine over two GPUs."""
    match = re.fullmatch(r"(dp|tp)(\d+)", run)
    if not match:
        raise ValueError(f"run {run!r}: expected dpN or tpN")
    mode, size = match.group(1), match.group(2)
    return ["--mode", mode, "--replicas" if mode == "dp" else "--tensor-parallel", size]


def run(model: Path, work: Path, runs: list[str], dataset: str, limit: int | None, max_tokens: int,
        dummy_weights: bool, engine_kwargs: dict | None = None) -> list[dict]:
    rows = []
    engine_kwargs = {**({"load_format": "dummy"} if dummy_weights else {}), **(engine_kwargs or {})}
    for name in runs:
        out = work / name
        command = [sys.executable, "-m", "jobs.evaluate", "--model", str(model), "--dataset", dataset,
                   "--max-tokens", str(max_tokens), "--engine-kwargs", json.dumps(engine_kwargs),
                   "--name", name, "--out", str(out), *evaluate_args(name)]
        if limit:
            command += ["--limit", str(limit)]
        result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"evaluate run {name} failed:\n{result.stderr[-3000:]}")
        summary = json.loads((out / "results.json").read_text())["summary"]
        base = rows[0]["wall_s"] if rows else summary["wall_s"]
        rows.append({**summary, "speedup": round(base / summary["wall_s"], 3)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def eval_benchmark(args: argparse.Namespace) -> None:
    work = Path(args.work).resolve()
    model = bench_model(args, work, random_weights=False)
    rows = run(model, work, args.runs.split(","), args.dataset, args.limit, args.max_tokens,
               dummy_weights=args.model is None, engine_kwargs=json.loads(args.engine_kwargs))
    print("\n" + markdown_table(rows, ["name", "questions", "startup_s", "wall_s", "output_tok_s", "speedup"]))
    write_results(args, rows, model=str(model))


def add_command(sub) -> None:
    """This module's `python -m jobs.bench` command(s)."""
    evaluate = sub.add_parser("eval", help="GSM8K evaluate job: data-parallel vs tensor-parallel wall time")
    add_model_arguments(evaluate, "llama-1.8b", "runs/bench-eval", "dummy weights (load_format=dummy)")
    evaluate.add_argument("--runs", default="dp1,dp2,tp2", help="comma list of dpN / tpN (the first is the base)")
    evaluate.add_argument("--dataset", default="gsm8k", help="as for python -m jobs.evaluate")
    evaluate.add_argument("--limit", type=int, default=None)
    evaluate.add_argument("--max-tokens", type=int, default=256)
    evaluate.add_argument("--engine-kwargs", default="{}", help="JSON of extra vLLM engine arguments for every run")
    evaluate.set_defaults(run=eval_benchmark)
