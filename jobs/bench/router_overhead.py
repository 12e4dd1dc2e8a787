"""What the router adds: the same open-loop load sent straight to a fast upstream and through our app
(Serve proxy → ingress: routing, accounting, pooled remote provider), one after the other in one run.

The upstream is the misbehaving server in its well-behaved `echo` mode, in its own processes, so that what
differs between the two measurements is the router's own cost. Both loads come from the same client
processes (`loadgen.open_loop`), which report the rate they achieved and their own lateness: direct must
hold the rate before the router is blamed for anything.

Besides latency, each row gives the CPU each server part used while the load ran (in cores), and the
router's CPU per request, which does not depend on how loaded the machine was.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import psutil

from jobs.bench.common import markdown_table, write_results
from jobs.bench.loadgen import open_loop
from jobs.bench.serve_targets import fake_upstream, served


def chat_body(model: str, max_tokens: int) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
            "stream": True}


def _parts(app_name: str, upstream: subprocess.Popen) -> dict[str, list[psutil.Process]]:
    """The processes of each server part: Serve's proxy (or HAProxy and its manager), our ingress replicas,
    the upstream."""
    parts: dict[str, list[psutil.Process]] = {"proxy": [], "ingress": [], "upstream": []}
    for process in psutil.process_iter(["cmdline"]):
        command = " ".join(process.info["cmdline"] or [])
        if command.startswith(("ray::ProxyActor", "ray::HAProxyManager")) or process.name() == "haproxy":
            parts["proxy"].append(process)
        elif command.startswith(f"ray::ServeReplica:{app_name}:Ingress"):
            parts["ingress"].append(process)
    root = psutil.Process(upstream.pid)
    parts["upstream"] = [root, *root.children(recursive=True)]
    return parts


def _cpu_seconds(parts: dict[str, list[psutil.Process]]) -> dict[str, float]:
    seconds = {}
    for name, processes in parts.items():
        total = 0.0
        for process in processes:
            try:
                times = process.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
        seconds[name] = total
    return seconds


@contextmanager
def measuring_cpu(parts: dict[str, list[psutil.Process]], into: dict):
    before, started = _cpu_seconds(parts), time.monotonic()
    yield
    after, wall = _cpu_seconds(parts), time.monotonic() - started
    into.update({f"{name}_cores": round((after[name] - before[name]) / wall, 2) for name in parts})


def run(rate: float, count: int, max_tokens: int, *, clients: int = 1, upstream_workers: int = 1,
        ingress_replicas: int = 1) -> list[dict]:
    from serve_app.app import build_from_config
    from serve_app.config import AppConfig

    rows = []
    with fake_upstream("bench", workers=upstream_workers) as (direct_url, upstream):
        config = AppConfig.model_validate({
            "ingress": {"num_replicas": ingress_replicas},
            "providers": [{"name": "upstream", "base_url": direct_url, "max_concurrency": 1024,
                           "models": [{"id": "echo-model", "upstream": "echo"}]}]})
        app_name = "router-bench"
        with served(build_from_config(config), name=app_name) as routed_url:
            parts = _parts(app_name, upstream)
            for path, url, model in [("direct", direct_url, "echo"), ("router", routed_url, "echo-model")]:
                cpu: dict = {}
                with measuring_cpu(parts, cpu):
                    report = open_loop(path, url, chat_body(model, max_tokens), rate=rate, count=count,
                                       processes=clients)
                row = {**report.row(), **cpu}
                if path == "router":
                    router_cores = cpu["proxy_cores"] + cpu["ingress_cores"]
                    row["router_cpu_ms_per_request"] = round(1000 * router_cores / max(report.completed_rps, 1e-9), 2)
                rows.append(row)
                print(json.dumps(row), flush=True)
    direct, routed = rows
    rows.append({"target": "router - direct", "rate_rps": rate, "requests": count, "failed": routed["failed"],
                 **{key: round(routed[key] - direct[key], 2)
                    for key in ("ttft_p50_ms", "ttft_p99_ms", "total_p50_ms", "total_p99_ms")}})
    return rows


def router_benchmark(args: argparse.Namespace) -> None:
    """Each HTTP ingress mode in its own Ray instance (Serve reads the mode when it starts), one after the
    other in this one command; within each, direct and through the router."""
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
    write_results(args, rows)


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

    os.environ.update(serve_env(mode, own_instance=True))  # the Ray instance started here, and Serve in it
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        rows = run(args.rate, args.requests, args.max_tokens, clients=args.clients,
                   upstream_workers=args.upstream_workers, ingress_replicas=args.ingress_replicas)
    finally:
        ray.shutdown()
    return [{"http_ingress": mode, **row} for row in rows]


def add_command(sub) -> None:
    """This module's `python -m jobs.bench` command(s)."""
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
    router.set_defaults(run=router_benchmark)
