"""Evaluate a model on GSM8K with vLLM: data-parallel replicas, tensor parallelism, or any endpoint.

    python -m jobs.evaluate --model default --mode dp --replicas 2 --limit 100
    python -m jobs.evaluate --model /models/qwen2.5-7b --mode tp --tensor-parallel 2
    python -m jobs.evaluate --endpoint http://127.0.0.1:8000/v1 --model smollm2-135m-instruct
    python -m jobs.evaluate --compare runs/eval/base/results.json runs/eval/tuned/results.json

Writes results.json, results.md and samples.jsonl (one line per question) under --out.
As a Ray job: ray job submit --working-dir . -- python -m jobs.evaluate ...
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from cluster.storage import StorageError, locate
from jobs.evaluate import gsm8k
from jobs.evaluate.runners import (
    EvaluationError,
    GenerationSettings,
    OfflinePlan,
    run_endpoint,
    run_offline,
)

TABLE_COLUMNS = ["name", "mode", "replicas", "tp", "questions", "startup_s", "wall_s", "questions_per_s",
                 "output_tok_s", "strict_acc", "flexible_acc"]


def markdown(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def summarize(name: str, mode: str, replicas: int, tp: int, samples: list[dict], startup_s: float,
              wall_s: float, output_tokens: int, extract: str) -> dict:
    count = len(samples)
    row = {"name": name, "mode": mode, "replicas": replicas, "tp": tp, "questions": count,
           "startup_s": round(startup_s, 1), "wall_s": round(wall_s, 1),
           "questions_per_s": round(count / wall_s, 3) if wall_s else None,
           "output_tok_s": round(output_tokens / wall_s, 1) if wall_s else None}
    for kind in ("strict", "flexible"):
        if extract in (kind, "both"):
            row[f"{kind}_acc"] = round(sum(s[f"{kind}_correct"] for s in samples) / count, 4)
    return row


def compare(paths: list[str]) -> str:
    rows = [json.loads(locate(p).read_text())["summary"] for p in paths]
    return markdown(rows, TABLE_COLUMNS)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_argument_group("what to evaluate")
    what.add_argument("--model", default="default",
                      help="HF folder or hub id ('default': the cached SmolLM2); with --endpoint, the served model id")
    what.add_argument("--endpoint", default=None, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    what.add_argument("--api-key", default=None, help="endpoint key (default: $TUNESERVE_API_KEY or 'none')")
    what.add_argument("--dataset", default="gsm8k",
                      help="'gsm8k' (shared test set), 'hf:openai/gsm8k', or a JSONL with question/answer")
    what.add_argument("--limit", type=int, default=None, help="first N questions only")
    how = parser.add_argument_group("how (offline vLLM)")
    how.add_argument("--mode", choices=["dp", "tp"], default="dp", help="data- or tensor-parallel")
    how.add_argument("--replicas", type=int, default=1, help="data-parallel engine replicas")
    how.add_argument("--tensor-parallel", type=int, default=1, help="tensor-parallel size of each engine")
    how.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on GPU")
    how.add_argument("--max-model-len", type=int, default=2048)
    how.add_argument("--cpus-per-replica", type=float, default=1.0, help="Ray CPUs per replica on CPU nodes")
    how.add_argument("--engine-kwargs", default="{}", help="JSON of extra vLLM engine arguments")
    gen = parser.add_argument_group("generation and scoring")
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--max-tokens", type=int, default=512)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--instruction", default=gsm8k.INSTRUCTION, help="appended to each question")
    gen.add_argument("--extract", choices=["strict", "flexible", "both"], default="both")
    gen.add_argument("--concurrency", type=int, default=16, help="requests in flight with --endpoint")
    out = parser.add_argument_group("output")
    out.add_argument("--name", default=None, help="run name in the table (default: mode and replicas)")
    out.add_argument("--out", default=None, help="output folder (default: runs/eval/<time>-<name>)")
    out.add_argument("--compare", nargs="+", metavar="RESULTS_JSON", help="print runs side by side and exit")
    args = parser.parse_args(argv)
    if args.mode == "tp" and args.replicas != 1:
        parser.error("--mode tp runs one engine: leave --replicas at 1 (use --tensor-parallel)")
    if args.replicas < 1 or args.tensor_parallel < 1:
        parser.error("--replicas and --tensor-parallel must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.compare:
        print(compare(args.compare))
        return 0
    try:
        examples = gsm8k.load(args.dataset, args.limit)
        settings = GenerationSettings(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
        conversations = [e.prompt(args.instruction) for e in examples]
        if args.endpoint:
            import os

            key = args.api_key or os.environ.get("TUNESERVE_API_KEY", "none")
            mode, replicas, tp = "endpoint", 1, 1
            generations, wall_s = run_endpoint(args.endpoint, args.model, key, conversations, settings,
                                               args.concurrency)
            startup_s = 0.0
        else:
            from cluster.local import connect
            from cluster.model_cache import resolve_model_path
            from cluster.resources import cluster_has_gpus

            connect(logging_level=logging.WARNING)
            on_gpu = cluster_has_gpus()
            mode, replicas, tp = args.mode, args.replicas, args.tensor_parallel
            resolve_model_path(args.model, fetch=False)  # a bad model name or URI fails here, before any replica
            plan = OfflinePlan(model=args.model,
                               dtype=args.dtype or ("bfloat16" if on_gpu else "float32"),
                               max_model_len=args.max_model_len, replicas=replicas, tensor_parallel_size=tp,
                               engine_kwargs={"enforce_eager": not on_gpu, **json.loads(args.engine_kwargs)},
                               cpus_per_replica=args.cpus_per_replica)
            generations, startup_s, wall_s = run_offline(plan, conversations, settings)
    except (gsm8k.DatasetError, EvaluationError, StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    samples = [gsm8k.score(e, g.text) | {"output_tokens": g.output_tokens} for e, g in zip(examples, generations)]
    name = args.name or (f"{mode}{replicas}" if mode == "dp" else f"{mode}{tp}" if mode == "tp" else mode)
    summary = summarize(name, mode, replicas, tp, samples, startup_s, wall_s,
                        sum(g.output_tokens for g in generations), args.extract)
    # Storage (relative paths live under TUNESERVE_STORAGE), so that the results outlive the job's node.
    out = locate(args.out or f"runs/eval/{time.strftime('%Y%m%d-%H%M%S')}-{name}")
    out.join("samples.jsonl").write_text("".join(json.dumps(sample) + "\n" for sample in samples))
    out.join("results.json").write_text(json.dumps({"summary": summary, "model": args.model,
                                                    "dataset": args.dataset, "settings": settings.model_dump(),
                                                    "instruction": args.instruction}, indent=1))
    table = markdown([summary], TABLE_COLUMNS)
    out.join("results.md").write_text(table + "\n")
    print("\n" + table + f"\n\nwritten to {out.uri}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
