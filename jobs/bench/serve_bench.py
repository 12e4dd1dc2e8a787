"""`python -m jobs.bench serve`: output tokens/s, TTFT and ITL of each target at each concurrency, in one run,
with ratios against the first target (and the replica-scaling figures with --scale-to)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import time
from pathlib import Path

from jobs.bench.common import markdown_table
from jobs.bench.loadgen import LoadReport, run_load
from jobs.bench.serve_targets import TARGETS, EngineSpec

COLUMNS = ["target", "concurrency", "requests", "failed", "output_tok_s", "ttft_p50_ms", "ttft_p99_ms",
           "tpot_p50_ms", "itl_p50_ms", "itl_p99_ms", "max_gap_p99_ms", "stalls_per_1k_tokens", "wall_s"]


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
    """`tuneserve:50` (stream interval 50 ms), `tuneserve@2` (2 replicas), `tuneserve@auto2` (autoscale 1→2),
    `vllm+router` (raw vLLM, then our router in front of it), `tuneserve=DIR` (the app of another checkout)."""
    if name == "vllm+router":
        return "vllm", {"with_router": True}
    name, _, checkout = name.partition("=")
    if checkout:
        kind, options = parse_target(name)
        return kind, {**options, "checkout": checkout}
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
        self.started = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            replicas = self._count()
            if not self._changes or self._changes[-1][1] != replicas:
                self._changes.append((round(time.monotonic() - self.started, 1), replicas))

    def replicas(self) -> int:
        return self._changes[-1][1] if self._changes else 0

    def stop(self) -> list[tuple[float, int]]:
        self._stop.set()
        self._thread.join()
        return self._changes


def measure(label: str, base_url: str, model_id: str, level: int, args: argparse.Namespace) -> LoadReport:
    count = max(level, min(args.requests, args.max_requests_per_stream * level))
    report = asyncio.run(run_load(label, base_url, model_id, concurrency=level, num_requests=count,
                                  prompt_words=args.prompt_words, max_tokens=args.max_tokens,
                                  processes=args.client_processes))
    print(json.dumps(report.row()), flush=True)
    return report


def scale_up(label: str, base_url: str, model_id: str, level: int, args: argparse.Namespace,
             target_replicas: int, limit_s: float = 600) -> list[LoadReport]:
    """Loads at `level` streams, back to back, on an autoscaling app that starts at one replica, until
    `target_replicas` run (or `limit_s`): records when each replica came up and whether any request failed."""
    watcher = ScaleWatcher()
    reports = []
    while not reports or (watcher.replicas() < target_replicas and time.monotonic() - watcher.started < limit_s):
        reports.append(measure(f"{label} scaling", base_url, model_id, level, args))
    changes = watcher.stop()
    reports[-1].replicas_over_time = changes
    print(json.dumps({"target": label, "replicas_over_time": changes,
                      "time_to_scale_s": next((t for t, n in changes if n >= target_replicas), None),
                      "failed_while_scaling": sum(r.failed for r in reports),
                      "requests_while_scaling": sum(r.requests for r in reports)}), flush=True)
    return reports


def engine_spec_in_local_ray(args: argparse.Namespace) -> EngineSpec:
    """A Ray instance of this machine's own, and the engine arguments the command line gives."""
    import ray

    from cluster.http_ingress import serve_env
    from cluster.model_cache import resolve_model_path
    from cluster.resources import cluster_has_gpus

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.update(serve_env(own_instance=True))  # Serve here runs the default HTTP ingress, as a user's does
    ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    on_gpu = cluster_has_gpus()
    return EngineSpec(model_id=args.model_id, path=resolve_model_path(args.model),
                      dtype=args.dtype or ("bfloat16" if on_gpu else "float32"), max_model_len=args.max_model_len,
                      max_num_seqs=args.max_num_seqs, enforce_eager=args.enforce_eager, on_gpu=on_gpu,
                      extra=json.loads(args.engine_kwargs) if args.engine_kwargs else None)


def serve_benchmark(args: argparse.Namespace) -> None:
    spec = engine_spec_in_local_ray(args)
    on_gpu = spec.on_gpu
    levels = [int(c) for c in args.concurrency.split(",")]
    reports: list[LoadReport] = []
    for name in args.targets.split(","):
        kind, options = parse_target(name)
        if kind == "tuneserve" and args.ingress_replicas:
            options["ingress_replicas"] = args.ingress_replicas
        if "autoscale_to" in options:
            options["target_ongoing_requests"] = args.autoscale_target_ongoing
        started = time.monotonic()
        print(f"== {name}: starting ...", flush=True)
        with TARGETS[kind](spec, **options) as urls:
            print(f"== {name}: ready in {time.monotonic() - started:.0f} s at {urls}", flush=True)
            for label, base_url in urls.items():
                label = name if len(urls) == 1 else label  # keep `tuneserve:50@2` as the row's name
                runs = []
                if "autoscale_to" in options:  # first grow under load, then measure at full size
                    runs += scale_up(label, base_url, spec.model_id, max(levels), args, options["autoscale_to"],
                                     args.scale_timeout)
                for level in levels:
                    runs.append(measure(label, base_url, spec.model_id, level, args))
                reports += runs
                if args.out:  # written as it goes: a long run cut short still leaves its figures
                    with Path(args.out).with_suffix(".partial.jsonl").open("a") as partial:
                        partial.writelines(json.dumps(report.row()) + "\n" for report in runs)
    import ray

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


def add_command(sub) -> None:
    """This module's `python -m jobs.bench` command(s)."""
    serve = sub.add_parser("serve", help="serving throughput and latency: tuneserve vs raw vLLM vs ray.serve.llm")
    serve.add_argument("--targets", default="vllm,tuneserve,rayllm",
                       help=f"comma list of {sorted(TARGETS)}; tuneserve:MS sets its stream interval, "
                       "tuneserve@N runs N engine replicas, tuneserve@autoN autoscales 1..N, tuneserve=DIR runs "
                       "the app of the checkout in DIR (before/after in one run)")
    serve.add_argument("--baseline", default="vllm", help="target the others are compared with")
    serve.add_argument("--model", default="default", help="HF folder or hub id ('default': cached SmolLM2)")
    serve.add_argument("--model-id", default="bench-model", help="name the model is served under")
    serve.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on GPU; auto: each app's "
                       "own default (tuneserve=DIR: that checkout's), and ours for raw vLLM")
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
    serve.add_argument("--ingress-replicas", type=int, default=None,
                       help="tuneserve ingress replicas (default: one per engine replica)")
    serve.add_argument("--autoscale-target-ongoing", type=float, default=48,
                       help="tuneserve@autoN: ongoing requests per replica the autoscaler aims for")
    serve.add_argument("--scale-timeout", type=float, default=600,
                       help="tuneserve@autoN: seconds of load to wait for the last replica")
    serve.add_argument("--client-processes", type=int, default=None,
                       help="load generator processes (default: one per 32 streams)")
    serve.add_argument("--out", default=None, help="write results as JSON here")
    serve.set_defaults(run=serve_benchmark)
