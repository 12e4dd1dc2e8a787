"""Benchmarks, each measuring its contenders side by side in one run:

    python -m jobs.bench serve --concurrency 8 --requests 48 --max-tokens 64
    python -m jobs.bench serve --targets vllm,tuneserve --model /path/to/hf-folder --concurrency 1,16,64
    python -m jobs.bench router --rate 20 --requests 400
    python -m jobs.bench finetune --shape llama3-8b --steps 12      (GPU: QLoRA job vs plain peft loop)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import time
from pathlib import Path

from jobs.bench.loadgen import LoadReport, run_load
from jobs.bench.serve_targets import TARGETS, EngineSpec

COLUMNS = ["target", "concurrency", "requests", "failed", "output_tok_s", "ttft_p50_ms", "ttft_p99_ms",
           "tpot_p50_ms", "itl_p50_ms", "itl_p99_ms", "wall_s"]


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def ratios(reports: list[LoadReport], baseline: str) -> list[dict]:
    """Each target against the baseline at the same concurrency: throughput ratio, TTFT p50 difference."""
    rows = []
    for report in reports:
        base = next((r for r in reports if r.target == baseline and r.concurrency == report.concurrency), None)
        if base is None or report.target == baseline:
            continue
        rows.append({"target": report.target, "vs": baseline, "concurrency": report.concurrency,
                     "output_tok_s_ratio": round(report.output_tok_s / base.output_tok_s, 3),
                     "ttft_p50_delta_ms": round(report.ttft_p50_ms - base.ttft_p50_ms, 1)})
    return rows


def parse_target(name: str) -> tuple[str, dict]:
    """`tuneserve:50` (stream interval 50 ms), `tuneserve@2` (2 replicas), `tuneserve@auto2` (autoscale 1→2)."""
    name, _, scale = name.partition("@")
    kind, _, interval = name.partition(":")
    options: dict = {"stream_interval_ms": float(interval)} if interval else {}
    if scale.startswith("auto"):
        options["autoscale_to"] = int(scale[4:])
    elif scale:
        options["replicas"] = int(scale)
    return kind, options


class ScaleWatcher:
    """Samples the running engine replicas once a second while a load runs: (seconds, replicas) changes."""

    def __init__(self):
        import threading

        from jobs.bench.serve_targets import running_engine_replicas

        self._count = running_engine_replicas
        self._stop = threading.Event()
        self._changes: list[tuple[float, int]] = []
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            replicas = self._count()
            if not self._changes or self._changes[-1][1] != replicas:
                self._changes.append((round(time.monotonic() - self._started, 1), replicas))

    def stop(self) -> list[tuple[float, int]]:
        self._stop.set()
        self._thread.join()
        return self._changes


def serve_benchmark(args: argparse.Namespace) -> None:
    import ray

    from cluster.model_cache import resolve_model_path
    from cluster.resources import cluster_has_gpus

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    on_gpu = cluster_has_gpus()
    spec = EngineSpec(model_id=args.model_id, path=resolve_model_path(args.model),
                      dtype=args.dtype or ("bfloat16" if on_gpu else "float32"), max_model_len=args.max_model_len,
                      max_num_seqs=args.max_num_seqs, enforce_eager=args.enforce_eager, on_gpu=on_gpu,
                      extra=json.loads(args.engine_kwargs) if args.engine_kwargs else None)
    levels = [int(c) for c in args.concurrency.split(",")]
    reports: list[LoadReport] = []
    for name in args.targets.split(","):
        kind, options = parse_target(name)
        started = time.monotonic()
        print(f"== {name}: starting ...", flush=True)
        with TARGETS[kind](spec, **options) as base_url:
            print(f"== {name}: ready in {time.monotonic() - started:.0f} s at {base_url}", flush=True)
            for level in levels:
                count = max(level, min(args.requests, args.max_requests_per_stream * level))
                watcher = ScaleWatcher() if "autoscale_to" in options else None
                report = asyncio.run(run_load(name, base_url, spec.model_id, concurrency=level,
                                              num_requests=count, prompt_words=args.prompt_words,
                                              max_tokens=args.max_tokens))
                if watcher is not None:
                    print(json.dumps({"target": name, "replicas_over_time": watcher.stop()}), flush=True)
                print(json.dumps(report.row()), flush=True)
                reports.append(report)
                if args.out:  # written as it goes: a long run cut short still leaves its figures
                    Path(args.out).with_suffix(".partial.jsonl").open("a").write(json.dumps(report.row()) + "\n")
    ray.shutdown()

    rows = [r.row() for r in reports]
    ratio_rows = ratios(reports, args.baseline)
    print("\n" + markdown_table(rows, COLUMNS))
    if ratio_rows:
        print("\n" + markdown_table(ratio_rows, list(ratio_rows[0])))
    if args.out:
        meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.machine(), "cpus": os.cpu_count(),
                "gpu": on_gpu, "spec": spec.__dict__, "args": vars(args)}
        Path(args.out).write_text(json.dumps({"meta": meta, "results": rows, "ratios": ratio_rows}, indent=1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serving throughput and latency: tuneserve vs raw vLLM vs ray.serve.llm")
    serve.add_argument("--targets", default="vllm,tuneserve,rayllm",
                       help=f"comma list of {sorted(TARGETS)}; tuneserve:MS sets its stream interval, "
                       "tuneserve@N runs N engine replicas, tuneserve@autoN autoscales 1..N")
    serve.add_argument("--baseline", default="vllm", help="target the others are compared with")
    serve.add_argument("--model", default="default", help="HF folder or hub id ('default': cached SmolLM2)")
    serve.add_argument("--model-id", default="bench-model", help="name the model is served under")
    serve.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on GPU")
    serve.add_argument("--max-model-len", type=int, default=2048)
    serve.add_argument("--max-num-seqs", type=int, default=64)
    serve.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True)
    serve.add_argument("--engine-kwargs", default=None, help="JSON of extra vLLM engine args for every target")
    serve.add_argument("--concurrency", default="8", help="comma list of concurrent streams")
    serve.add_argument("--requests", type=int, default=48, help="requests per concurrency level")
    serve.add_argument("--max-requests-per-stream", type=int, default=10**6,
                       help="cap requests at this many per concurrent stream (keeps concurrency 1 short)")
    serve.add_argument("--prompt-words", type=int, default=200, help="approximate prompt length in words")
    serve.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (ignore_eos)")
    serve.add_argument("--out", default=None, help="write results as JSON here")
    router = sub.add_parser("router", help="latency the router adds over calling a fast upstream directly")
    router.add_argument("--rate", type=float, default=20.0, help="requests per second (open loop)")
    router.add_argument("--requests", type=int, default=400)
    router.add_argument("--max-tokens", type=int, default=16)
    router.add_argument("--out", default=None, help="write results as JSON here")
    tune = sub.add_parser("finetune", help="QLoRA tok/s and peak memory: our Ray Train job vs a plain peft loop")
    tune.add_argument("--model", default=None, help="HF folder with weights (default: random weights of --shape)")
    tune.add_argument("--shape", default="llama3-8b", help="dummy shape when --model is not given")
    tune.add_argument("--tokenizer", default="default", help="tokenizer folder for --shape ('default': SmolLM2)")
    tune.add_argument("--work", default="runs/bench-finetune", help="scratch folder (models, data, runs)")
    tune.add_argument("--steps", type=int, default=12)
    tune.add_argument("--seq", type=int, default=1024)
    tune.add_argument("--rank", type=int, default=64)
    tune.add_argument("--out", default=None, help="write results as JSON here")
    tune.add_argument("overrides", nargs="*", help="extra recipe overrides for our job (key.sub=value)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    {"serve": serve_benchmark, "router": router_benchmark, "finetune": finetune_benchmark}[args.command](args)


def router_benchmark(args: argparse.Namespace) -> None:
    import ray

    from jobs.bench.router_overhead import run

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    rows = run(args.rate, args.requests, args.max_tokens)
    ray.shutdown()
    print("\n" + markdown_table(rows, list(rows[0])))
    if args.out:
        Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "args": vars(args),
                                              "results": rows}, indent=1))


def finetune_benchmark(args: argparse.Namespace) -> None:
    from cluster.model_cache import resolve_model_path
    from jobs.bench.dummy_model import write_dummy_model
    from jobs.bench.finetune_speed import run

    work = Path(args.work).resolve()
    model = Path(args.model) if args.model else write_dummy_model(
        args.shape, Path(resolve_model_path(args.tokenizer)), work / f"{args.shape}-random", random_weights=True)
    rows = run(model, work, args.steps, args.seq, args.rank, args.overrides)
    print("\n" + markdown_table(rows, ["contender", "tokens_per_s", "peak_mem_gib", "tokens_per_s_ratio"]))
    if args.out:
        Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "args": vars(args),
                                              "model": str(model), "results": rows}, indent=1))


if __name__ == "__main__":
    main()
