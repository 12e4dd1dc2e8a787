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

import json
import subprocess
import time
from contextlib import contextmanager

import psutil

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
