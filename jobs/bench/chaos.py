"""Chaos under streaming load: faults injected into the real app on a real Ray cluster, with figures.

Every scenario sends real requests (official SSE, on loopback) while a fault happens, and counts what came
back: completed, cleanly failed (an OpenAI error with its status, or an error event in the stream), cut
(a stream that ended without [DONE] or an error event), hung (no end within the deadline) and unexpected
5xx (a 500, or a 5xx that is not an OpenAI error). After it, every provider's `in_flight` must be back to 0
on every ingress replica ("leases left"), and kills report the time to recover: from the fault to the
start of the first request after which every request succeeded.

    python -m jobs.bench chaos                                   # every scenario
    python -m jobs.bench chaos --scenarios upstream,disconnects --out chaos.json
    python -m jobs.bench chaos --scenarios soak --soak-requests 10000

Scenarios: `upstream` (429 storm, 500s, hangs, dropped connections, garbage JSON: each behind a fallback,
and each alone), `disconnects` (before the first byte, mid-stream, during a non-streamed request),
`ingress` (kill one of two ingress replicas), `engine` (kill an engine replica, with 2 and with 1),
`soak` (N requests with auth off and on; the ingress replicas' RSS at the start and the end).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import platform
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from jobs.bench.common import markdown_table

log = logging.getLogger("tuneserve.chaos")
DEADLINE_S = 60.0  # a request with no end by then is hung
HI = [{"role": "user", "content": "hi"}]
ADMIN_KEY = "sk-chaos-admin"
FAULTS = {"storm": "rate-limited-1", "broken": "error-500", "hanging": "hang", "dropper": "drop",
          "garbled": "malformed"}
SCENARIOS = ("upstream", "disconnects", "ingress", "engine", "soak")


@dataclass
class Tally:
    scenario: str
    sent: int = 0
    completed: int = 0
    clean_failures: dict = field(default_factory=dict)  # "503 providers_unavailable", "event provider_error", ...
    cut: int = 0
    hung: int = 0
    unexpected_5xx: int = 0
    client_left: int = 0
    leases_left: int = 0
    recover_s: float | None = None
    longest_s: float = 0.0  # the slowest request (started after the fault, when there is one)
    note: str = ""

    def row(self) -> dict:
        failures = ", ".join(f"{k}: {v}" for k, v in sorted(self.clean_failures.items())) or "-"
        return {"scenario": self.scenario, "sent": self.sent, "completed": self.completed,
                "cleanly failed": failures, "cut": self.cut, "hung": self.hung,
                "unexpected 5xx": self.unexpected_5xx, "client left": self.client_left,
                "leases left": self.leases_left,
                "recover s": "-" if self.recover_s is None else round(self.recover_s, 1),
                "longest s": round(self.longest_s, 1), "note": self.note}


@dataclass
class Outcome:
    started: float
    kind: str  # ok | failed | cut | hung | unexpected | left
    detail: str = ""
    ended: float = field(default_factory=time.monotonic)


async def request(client: httpx.AsyncClient, base: str, body: dict, headers: dict | None = None,
                  leave_after_s: float | None = None, leave_after_lines: int | None = None) -> Outcome:
    """One request, classified. `leave_after_*`: the client goes away then (a disconnect)."""
    started = time.monotonic()

    async def run() -> Outcome:
        async with client.stream("POST", f"{base}/v1/chat/completions", json=body, headers=headers) as response:
            if response.status_code != 200:
                raw = await response.aread()
                try:
                    error = json.loads(raw)["error"]
                    detail = f"{response.status_code} {error.get('code') or error.get('type')}"
                except (ValueError, KeyError, TypeError):
                    return Outcome(started, "unexpected", f"{response.status_code} not an OpenAI error: {raw[:80]!r}")
                kind = "unexpected" if response.status_code == 500 else "failed"
                return Outcome(started, kind, detail)
            if not body.get("stream"):
                await response.aread()
                return Outcome(started, "ok")
            lines = 0
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                lines += 1
                if leave_after_lines is not None and lines >= leave_after_lines:
                    return Outcome(started, "left", "mid-stream")
                if line == "data: [DONE]":
                    return Outcome(started, "ok")
                event = json.loads(line[6:])
                if "error" in event:
                    return Outcome(started, "failed", f"event {event['error'].get('code')}")
            return Outcome(started, "cut")

    try:
        if leave_after_s is not None:
            try:
                return await asyncio.wait_for(run(), leave_after_s)
            except asyncio.TimeoutError:
                return Outcome(started, "left", f"after {leave_after_s} s")
        return await asyncio.wait_for(run(), DEADLINE_S)
    except asyncio.TimeoutError:
        return Outcome(started, "hung")
    except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
        return Outcome(started, "cut", type(exc).__name__)


def tally(name: str, outcomes: list[Outcome], fault_at: float | None = None) -> Tally:
    result = Tally(name, sent=len(outcomes))
    failures: Counter = Counter()
    for outcome in outcomes:
        if outcome.kind == "ok":
            result.completed += 1
        elif outcome.kind == "failed":
            failures[outcome.detail] += 1
        elif outcome.kind == "cut":
            result.cut += 1
        elif outcome.kind == "hung":
            result.hung += 1
        elif outcome.kind == "unexpected":
            result.unexpected_5xx += 1
            failures[outcome.detail] += 1
        elif outcome.kind == "left":
            result.client_left += 1
    result.clean_failures = dict(failures)
    timed = [o for o in outcomes if fault_at is None or o.started >= fault_at]
    result.longest_s = max((o.ended - o.started for o in timed), default=0.0)
    if fault_at is not None:  # from the fault to the first request after which all succeeded
        after = sorted((o for o in outcomes if o.started >= fault_at), key=lambda o: o.started)
        last_bad = max((i for i, o in enumerate(after) if o.kind != "ok"), default=-1)
        if last_bad + 1 < len(after):
            result.recover_s = after[last_bad + 1].started - fault_at
    return result


async def load(base: str, body: dict, count: int, concurrency: int, headers: dict | None = None,
               fault=None, fault_after_s: float = 0.0, min_s: float = 0.0) -> tuple[list[Outcome], float | None]:
    """At least `count` requests, and for at least `min_s` seconds, from `concurrency` workers; `fault()` (a
    blocking callable) runs once after `fault_after_s`. Returns the outcomes and when the fault happened."""
    outcomes: list[Outcome] = []
    fault_at = None
    until = time.monotonic() + min_s
    sent = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal sent
        while sent < count or time.monotonic() < until:
            sent += 1
            outcomes.append(await request(client, base, body, headers))

    async def injector() -> None:
        nonlocal fault_at
        await asyncio.sleep(fault_after_s)
        fault_at = time.monotonic()
        await asyncio.to_thread(fault)

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(DEADLINE_S + 5), limits=limits) as client:
        tasks = [worker(client) for _ in range(concurrency)] + ([injector()] if fault else [])
        await asyncio.gather(*tasks)
    return outcomes, fault_at


def leases_left(base: str, headers: dict | None = None, polls: int = 8) -> int:
    """The most requests in flight that any ingress replica still counts, for any provider, after a pause
    (polled several times so that every replica answers at least once, most likely)."""
    time.sleep(1.0)
    worst: dict[str, int] = {}
    for _ in range(polls):
        usage = httpx.get(f"{base}/admin/usage", headers=headers, timeout=30).json()
        worst[usage["replica"]] = sum(p["in_flight"] for p in usage["providers"].values())
    return max(worst.values(), default=0)


def _replica_actors(app: str, deployment: str) -> list:
    from ray.util.state import list_actors

    return list_actors(filters=[("class_name", "=", f"ServeReplica:{app}:{deployment}"), ("state", "=", "ALIVE")])


def _kill_one(app: str, deployment: str) -> None:
    import ray

    actor = _replica_actors(app, deployment)[0]
    log.warning("killing %s (pid %s)", actor.name, actor.pid)
    ray.kill(ray.get_actor(actor.name, namespace="serve"), no_restart=True)


def _rss_mb(app: str) -> dict[str, float]:
    import psutil

    return {a.name.rsplit("#", 1)[-1]: round(psutil.Process(a.pid).memory_info().rss / 2**20, 1)
            for a in _replica_actors(app, "Ingress")}


# -- the apps --------------------------------------------------------------------------------------------


def remote_app(upstream_url: str, auth: bool) -> dict:
    providers = [{"name": "echo", "base_url": upstream_url, "models": [{"id": "echo-model", "upstream": "echo"}],
                  "max_concurrency": 512},
                 {"name": "slow", "base_url": upstream_url, "models": [{"id": "slow-model", "upstream": "slow"}],
                  "max_concurrency": 512},
                 {"name": "late", "base_url": upstream_url, "models": [{"id": "late-model", "upstream": "late-1"}]}]
    for name, upstream in FAULTS.items():
        providers.append({"name": name, "base_url": upstream_url, "models": [{"id": f"{name}-model", "upstream": upstream}],
                          "timeouts": {"read_s": 1.5, "total_s": 3.0}, "retry": {"attempts": 2, "backoff_s": 0.05},
                          "circuit_breaker": {"failure_threshold": 5, "cooldown_s": 2.0}})
    keys = [{"name": "admin", "sha256": hashlib.sha256(ADMIN_KEY.encode()).hexdigest(), "admin": True}] if auth else []
    return {"providers": providers,
            "aliases": {f"{name}-then-echo": [f"{name}-model", "echo-model"] for name in FAULTS},
            "ingress": {"num_replicas": 2, "api_keys": keys, "usage_store": {"path": None}}}


def engine_app(replicas: int) -> dict:
    return {"models": [{"id": "smollm2", "max_model_len": 1024, "num_replicas": replicas, "max_ongoing_requests": 16,
                        "resources": {"num_cpus": 0}, "engine_kwargs": {"enforce_eager": True, "max_num_seqs": 16}}],
            "ingress": {"usage_store": {"path": None}}}


def _deploy(config: dict, name: str, prefix: str, http_port: int) -> str:
    from ray import serve

    from serve_app.app import build_from_config
    from serve_app.config import AppConfig

    serve.run(build_from_config(AppConfig.model_validate(config)), name=name, route_prefix=prefix)
    return f"http://127.0.0.1:{http_port}{prefix}"


# -- scenarios -------------------------------------------------------------------------------------------


def upstream_scenarios(base: str, count: int) -> list[Tally]:
    rows = []
    for name in FAULTS:
        for model, what in ((f"{name}-then-echo", "with fallback"), (f"{name}-model", "alone")):
            body = {"model": model, "messages": HI, "max_tokens": 8, "stream": True}
            outcomes, _ = asyncio.run(load(base, body, count, concurrency=8))
            row = tally(f"upstream {FAULTS[name]}, {what}", outcomes)
            row.leases_left = leases_left(base)
            rows.append(row)
    return rows


def disconnect_scenarios(base: str, count: int) -> list[Tally]:
    cases = [("before the first byte", {"model": "late-model", "stream": True}, {"leave_after_s": 0.3}),
             ("mid-stream", {"model": "slow-model", "stream": True}, {"leave_after_lines": 3}),
             ("during a non-streamed request", {"model": "late-model"}, {"leave_after_s": 0.3})]
    rows = []
    for what, extra, leave in cases:
        body = {"messages": HI, "max_tokens": 30, **extra}

        async def run() -> list[Outcome]:
            async with httpx.AsyncClient(timeout=DEADLINE_S) as client:
                return await asyncio.gather(*(request(client, base, body, **leave) for _ in range(count)))

        row = tally(f"client leaves {what}", asyncio.run(run()))
        row.leases_left = leases_left(base)
        rows.append(row)
    return rows


def ingress_scenario(base: str, app: str, count: int) -> Tally:
    body = {"model": "slow-model", "messages": HI, "max_tokens": 20, "stream": True}  # 2 s streams
    outcomes, fault_at = asyncio.run(load(base, body, count, concurrency=8, fault=lambda: _kill_one(app, "Ingress"),
                                          fault_after_s=3.0))
    row = tally("kill 1 of 2 ingress replicas", outcomes, fault_at)
    row.leases_left = leases_left(base)
    row.note = "streams on the killed replica's process are cut with it"
    return row


def engine_scenarios(http_port: int, count: int) -> list[Tally]:
    from ray import serve

    rows = []
    for replicas in (2, 1):
        base = _deploy(engine_app(replicas), "chaos-engine", "/chaos-engine", http_port)
        body = {"model": "smollm2", "messages": HI, "max_tokens": 24, "ignore_eos": True, "stream": True}
        deployment = "Engine:smollm2"
        # long enough for Serve to start a replacement engine (about a minute on this CPU)
        outcomes, fault_at = asyncio.run(load(base, body, count, concurrency=4, min_s=150.0,
                                              fault=lambda: _kill_one("chaos-engine", deployment), fault_after_s=8.0))
        row = tally(f"kill an engine replica ({replicas} running)", outcomes, fault_at)
        row.leases_left = leases_left(base)
        rows.append(row)
        serve.delete("chaos-engine")
    return rows


def soak(base: str, app: str, count: int, headers: dict | None, label: str) -> Tally:
    """`count` requests in parts (two, or one per 10,000 up to ten), with each ingress replica's RSS after a
    warm-up and after each part: memory that grows with requests grows in every part; a warm-up cost does not."""
    body = {"model": "echo-model", "messages": HI, "max_tokens": 4, "stream": True}
    asyncio.run(load(base, body, 500, concurrency=32, headers=headers))  # warm: pools, imports, caches
    rss = [_rss_mb(app)]
    started = time.monotonic()
    outcomes: list[Outcome] = []
    parts = max(2, min(10, count // 10_000))
    for part in range(parts):
        size = count // parts + (1 if part < count % parts else 0)
        outcomes += asyncio.run(load(base, body, size, concurrency=32, headers=headers))[0]
        rss.append(_rss_mb(app))
        print(f"soak {label}: {len(outcomes)}/{count}, ingress RSS MB {rss[-1]}", flush=True)
    elapsed = time.monotonic() - started
    row = tally(f"soak {count} requests, {label}", outcomes)
    row.leases_left = leases_left(base, headers)
    replicas = sorted(rss[0])
    per_replica = "; ".join("→".join(str(point.get(r, "gone")) for point in rss) for r in replicas)
    row.note = (f"{count / elapsed:.0f} req/s; ingress RSS MB after warm-up, then after each of {parts} parts, "
                f"per replica: {per_replica}")
    return row


def run(scenarios: list[str], requests: int, soak_requests: int) -> list[dict]:
    from ray import serve

    from cluster.ports import free_port
    from jobs.bench.serve_targets import fake_upstream

    rows: list[Tally] = []
    http_port = free_port()
    with fake_upstream("chaos") as (upstream_url, _):
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        try:
            base = _deploy(remote_app(upstream_url, auth=False), "chaos", "/chaos", http_port)
            if "upstream" in scenarios:
                rows += upstream_scenarios(base, requests)
            if "disconnects" in scenarios:
                rows += disconnect_scenarios(base, requests)
            if "soak" in scenarios:
                rows.append(soak(base, "chaos", soak_requests, None, "auth off"))
                auth = _deploy(remote_app(upstream_url, auth=True), "chaos-auth", "/chaos-auth", http_port)
                rows.append(soak(auth, "chaos-auth", soak_requests, {"Authorization": f"Bearer {ADMIN_KEY}"},
                                 "auth on"))
                serve.delete("chaos-auth")
            if "ingress" in scenarios:
                rows.append(ingress_scenario(base, "chaos", requests))
            if "engine" in scenarios:
                rows += engine_scenarios(http_port, requests)
        finally:
            serve.shutdown()
    for row in rows:
        print(json.dumps(row.row()), flush=True)
    return [asdict(row) | {"table": row.row()} for row in rows]


def chaos_benchmark(args: argparse.Namespace) -> None:
    import ray

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


def add_command(sub) -> None:
    """This module's `python -m jobs.bench` command(s)."""
    chaos = sub.add_parser("chaos", help="faults under streaming load: kills, upstream storms, disconnects, soak")
    chaos.add_argument("--scenarios", default="upstream,disconnects,ingress,engine,soak",
                       help="comma list of upstream, disconnects, ingress, engine, soak")
    chaos.add_argument("--requests", type=int, default=40, help="requests per scenario")
    chaos.add_argument("--soak-requests", type=int, default=10_000, help="requests per soak (auth off, then on)")
    chaos.add_argument("--out", default=None, help="write results as JSON here")
    chaos.set_defaults(run=chaos_benchmark)
