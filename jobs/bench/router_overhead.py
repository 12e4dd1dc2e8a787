"""What the router adds: the same requests at a fixed rate, sent straight to a fast upstream and through
our app (ingress + router + pooled remote provider), one after the other in the same run.

The upstream is the misbehaving server in its well-behaved `echo` mode, run in its own process, so that
what differs between the two measurements is the router's own cost.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import httpx

from cluster.local import free_port
from jobs.bench.loadgen import percentile
from jobs.bench.serve_targets import served, wait_ready


@dataclass
class OverheadReport:
    path: str
    rate_rps: float
    requests: int
    failed: int
    ttft_p50_ms: float
    ttft_p99_ms: float
    total_p50_ms: float
    total_p99_ms: float


async def _timed(client: httpx.AsyncClient, url: str, body: dict) -> tuple[float, float] | None:
    started = time.perf_counter()
    first = None
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            return None
        async for line in response.aiter_lines():
            if first is None and line.startswith("data: {"):
                first = time.perf_counter()
    return (first or time.perf_counter()) - started, time.perf_counter() - started


async def open_loop(path: str, base_url: str, model: str, rate: float, count: int, max_tokens: int) -> OverheadReport:
    """Requests start every 1/rate seconds whatever the answers do (open loop: no coordinated omission)."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
            "stream": True}
    url = f"{base_url}/chat/completions"
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=256)) as client:
        for _ in range(5):  # warm the connection pools on both sides
            await _timed(client, url, body)
        started = time.perf_counter()
        tasks = []
        for i in range(count):
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_timed(client, url, body)))
        results = await asyncio.gather(*tasks, return_exceptions=True)
    good = [r for r in results if isinstance(r, tuple)]
    ttft = [r[0] * 1000 for r in good]
    total = [r[1] * 1000 for r in good]
    return OverheadReport(path=path, rate_rps=rate, requests=count, failed=count - len(good),
                          ttft_p50_ms=round(percentile(ttft, 50), 2), ttft_p99_ms=round(percentile(ttft, 99), 2),
                          total_p50_ms=round(percentile(total, 50), 2), total_p99_ms=round(percentile(total, 99), 2))


def run(rate: float, count: int, max_tokens: int) -> list[dict]:
    from serve_app.app import build_from_config
    from serve_app.config import AppConfig

    port = free_port()
    upstream = subprocess.Popen([sys.executable, "-m", "jobs.bench.upstream", "--port", str(port), "--name", "bench"])
    try:
        wait_ready(f"http://127.0.0.1:{port}/v1/models", timeout_s=60, process=upstream)
        direct_url = f"http://127.0.0.1:{port}/v1"
        config = AppConfig.model_validate({"providers": [{
            "name": "upstream", "base_url": direct_url, "max_concurrency": 256,
            "models": [{"id": "echo-model", "upstream": "echo"}]}]})
        with served(build_from_config(config), name="router-bench") as routed_url:
            reports = [asyncio.run(open_loop("direct", direct_url, "echo", rate, count, max_tokens)),
                       asyncio.run(open_loop("router", routed_url, "echo-model", rate, count, max_tokens))]
    finally:
        upstream.terminate()
        upstream.wait(timeout=10)
    rows = [asdict(r) for r in reports]
    for row in rows:
        print(json.dumps(row), flush=True)
    direct, routed = reports
    rows.append({"path": "router - direct", "rate_rps": rate, "requests": count, "failed": routed.failed,
                 "ttft_p50_ms": round(routed.ttft_p50_ms - direct.ttft_p50_ms, 2),
                 "ttft_p99_ms": round(routed.ttft_p99_ms - direct.ttft_p99_ms, 2),
                 "total_p50_ms": round(routed.total_p50_ms - direct.total_p50_ms, 2),
                 "total_p99_ms": round(routed.total_p99_ms - direct.total_p99_ms, 2)})
    return rows
