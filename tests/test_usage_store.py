"""The usage store: per-key limits, usage and open circuits held across two ingress replicas, kept through
replica restarts, a redeploy and the store's own loss, and what happens while it cannot be reached (fail open
by default, fail closed when configured). Remote providers only (tests/upstream.py), next to the main app."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import httpx
import pytest

from serve_app.app import build_from_config
from serve_app.config import AppConfig
from tests.conftest import scrape

APP, PREFIX = "usage", "/usage"
RPM = 6
RETRY_S = 2.0
HI = [{"role": "user", "content": "hi"}]
KEYS = {"boss": ("sk-boss", {"admin": True}), "capped": ("sk-capped", {"rpm": RPM}),
        "free": ("sk-free", {"metrics_id": "team-free"})}


def _key_id(name: str) -> str:
    """How metrics name a key without a metrics_id: a digest's first 8 hex digits."""
    return f"key-{hashlib.sha256(KEYS[name][0].encode()).hexdigest()[:8]}"


def _config(upstreams, folder: Path, on_unavailable: str = "open", max_n: int = 4) -> AppConfig:
    return AppConfig.model_validate({
        "providers": [
            {"name": "echo", "base_url": upstreams["alpha"].url, "models": [{"id": "echo-model", "upstream": "echo",
                                                                             "price": {"prompt": 1.0, "completion": 2.0}}]},
            {"name": "flip", "base_url": upstreams["beta"].url, "models": [{"id": "flip-model", "upstream": "switch"}],
             "retry": {"attempts": 1}, "circuit_breaker": {"failure_threshold": 1, "cooldown_s": 60}}],
        "ingress": {"num_replicas": 2, "max_n": max_n,
                    "api_keys": [{"name": n, "sha256": hashlib.sha256(k.encode()).hexdigest(), **p}
                                 for n, (k, p) in KEYS.items()],
                    "usage_store": {"path": f"file://{folder}", "on_unavailable": on_unavailable,
                                    "retry_s": RETRY_S, "flush_interval_s": 0.2}}})


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("usage-store")


@pytest.fixture(scope="module")
def base(server, upstreams, folder):
    from ray import serve

    serve.run(build_from_config(_config(upstreams, folder)), name=APP, route_prefix=PREFIX)
    try:
        yield f"{server}{PREFIX}"
    finally:
        serve.delete(APP)
        _kill_store()


def _auth(name: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[name][0]}"}


def _chat(base: str, key: str, model: str = "echo-model") -> httpx.Response:
    # a new connection each time, so that Serve's proxy spreads the requests over both replicas
    return httpx.post(f"{base}/v1/chat/completions", json={"model": model, "messages": HI, "max_tokens": 3},
                      headers=_auth(key), timeout=30)


def _usage(base: str) -> dict:
    return _wait_for(lambda: httpx.get(f"{base}/admin/usage", headers=_auth("boss"), timeout=30).json(),
                     "an answer from /admin/usage", limit_s=10)


def _kill_store() -> None:
    import ray

    from serve_app.state_actors import STATE_NAMESPACE as STORE_NAMESPACE
    from serve_app.usage_store import store_name

    try:
        ray.kill(ray.get_actor(store_name(APP), namespace=STORE_NAMESPACE), no_restart=True)
    except ValueError:  # not there
        return
    deadline = time.monotonic() + 10  # ray.kill does not wait: until the name is free, the store may answer
    while time.monotonic() < deadline:
        try:
            ray.get_actor(store_name(APP), namespace=STORE_NAMESPACE)
        except ValueError:
            return
        time.sleep(0.05)
    raise AssertionError("the usage store did not die")


def _wait_for(condition, what: str, limit_s: float = 30.0):
    deadline = time.monotonic() + limit_s
    while True:
        try:
            value = condition()
        except httpx.TransportError:
            # While ingress replicas are replaced (killed, redeployed), HAProxy reloads its backends, and a
            # connection it holds then can close with no answer (docs/reliability.md): not an answer yet.
            value = None
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_rate_limit_holds_across_replicas(base):
    statuses = [_chat(base, "capped").status_code for _ in range(2 * RPM)]
    assert statuses.count(200) == RPM and statuses.count(429) == RPM, statuses  # per replica it would be 2x


def test_every_replica_reports_the_same_usage(base):
    for _ in range(3):
        assert _chat(base, "free").status_code == 200
    replicas = set()

    def settled() -> bool:
        for _ in range(6):
            usage = _usage(base)
            replicas.add(usage["replica"])
            keys = usage["keys"]
            if keys.get("capped", {}).get("requests") != RPM or keys.get("free", {}).get("requests") != 3:
                return False
        return True

    _wait_for(settled, "both replicas to report the store's totals")
    assert len(replicas) == 2, replicas
    free = _usage(base)["keys"]["free"]
    assert free["completion_tokens"] == 9 and free["cost_usd"] > 0
    # /metrics adds up over both replicas too (Ray's metrics export, summed over processes)
    scrape(base, [f'ray_tuneserve_key_requests_total{{app="{APP}",key="{_key_id("capped")}"}} {RPM}\n',
                  f'ray_tuneserve_key_requests_total{{app="{APP}",key="team-free"}} 3\n'], key=KEYS["boss"][0])


def test_usage_survives_replica_restarts_and_a_redeploy(base, upstreams, folder):
    import ray
    from ray import serve
    from ray.util.state import list_actors

    before = _usage(base)["keys"]
    for actor in list_actors(filters=[("class_name", "=", f"ServeReplica:{APP}:Ingress"), ("state", "=", "ALIVE")]):
        ray.kill(ray.get_actor(actor.name, namespace="serve"), no_restart=True)
    _wait_for(lambda: _chat(base, "free").status_code == 200, "the replaced replicas")
    # the new replica flushes its usage to the store within flush_interval_s
    after = _wait_for(lambda: (keys := _usage(base)["keys"])["free"]["requests"] == before["free"]["requests"] + 1
                      and keys, "the request's usage in the store", limit_s=10)
    assert after["capped"] == before["capped"] and after["free"]["requests"] == before["free"]["requests"] + 1
    serve.run(build_from_config(_config(upstreams, folder, max_n=5)), name=APP, route_prefix=PREFIX)
    assert _usage(base)["keys"]["capped"] == before["capped"]
    saved = _wait_for(lambda: (folder / APP / "usage.json").exists() and json.loads((folder / APP / "usage.json").read_text()),
                      "the saved totals")
    assert saved["keys"]["capped"]["requests"] == RPM


def test_store_lost_fails_open_then_comes_back_from_storage(base, folder):
    before = _usage(base)["keys"]["free"]["requests"]

    def saved_requests() -> int | None:  # what the store last saved (every persist_interval_s)
        saved = folder / APP / "usage.json"
        return saved.exists() and json.loads(saved.read_text())["keys"].get("free", {}).get("requests")

    _wait_for(lambda: saved_requests() == before, "the store to save the current totals", limit_s=10)
    _kill_store()
    lost_at = time.monotonic()
    # Fail open: the capped key (its minute is used up in the store) is admitted by a replica's own ledger.
    assert _chat(base, "capped").status_code == 200
    assert _chat(base, "free").status_code == 200
    # After retry_s the store is created again from the saved totals, and the usage kept meanwhile joins it.
    # The two requests may have gone to different replicas, and each replica reaches the new store on its own
    # retry (a replica that has not called the store since it was killed learns of the loss only at its next
    # call, and reports its own unsent usage meanwhile): wait until every replica reports from the new store.
    replicas_back: set[str] = set()

    def back():
        for _ in range(6):
            usage = _usage(base)
            keys = usage["keys"]
            if not (usage.get("store") == "ok" and keys.get("free", {}).get("requests", 0) >= before + 1
                    and keys.get("capped", {}).get("requests", 0) >= RPM + 1):
                return None
            replicas_back.add(usage["replica"])
        return keys if len(replicas_back) == 2 else None

    keys = _wait_for(back, "both replicas to report the store back with the totals", limit_s=RETRY_S + 20)
    recovered_s = time.monotonic() - lost_at
    assert recovered_s < RETRY_S + 20
    assert keys["free"]["requests"] == before + 1, keys  # nothing lost, nothing counted twice
    assert keys["capped"]["requests"] == RPM + 1, keys


def test_store_lost_fails_closed_when_configured(base, upstreams, folder):
    from ray import serve

    serve.run(build_from_config(_config(upstreams, folder, on_unavailable="closed")), name=APP, route_prefix=PREFIX)
    connected = set()  # both replicas hold the store's handle: its loss is seen, not healed by a new store at once
    _wait_for(lambda: connected.add(_usage(base)["replica"]) or len(connected) == 2, "both replicas")
    _kill_store()
    refused = _chat(base, "capped")
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "usage_store_unavailable" and refused.headers["Retry-After"] == "2"
    assert _chat(base, "free").status_code == 200  # a key without limits has nothing to enforce
    _wait_for(lambda: _chat(base, "capped").status_code == 200, "the store to come back", limit_s=RETRY_S + 20)


def test_an_open_circuit_is_open_on_every_replica(base, upstreams):
    control = upstreams["beta"].url.removesuffix("/v1") + "/control"
    httpx.post(control, json={"failing": True}, timeout=10)
    try:
        assert _chat(base, "free", model="flip-model").status_code == 503  # threshold 1: its replica opens it
        seen_open = set()

        def open_everywhere() -> bool:
            usage = _usage(base)
            if usage["providers"]["flip"]["circuit"] == "open":
                seen_open.add(usage["replica"])
            return len(seen_open) == 2

        _wait_for(open_everywhere, "the circuit to be open on both replicas", limit_s=15)
        refused = _chat(base, "free", model="flip-model")
        assert refused.status_code == 503 and "flip: circuit_open" in refused.json()["error"]["message"]
    finally:
        httpx.post(control, json={"failing": False}, timeout=10)


def test_report_while_the_store_is_down_counts_the_batch_that_failed(ray_head, folder):
    """A replica's report while the store is down adds up what it has not stored: the batch whose sending
    failed as well as what came after it."""
    import asyncio

    import ray

    from serve_app.auth import ANONYMOUS
    from serve_app.config import UsageStoreConfig
    from serve_app.metrics import ServingMetrics
    from serve_app.state_actors import STATE_NAMESPACE as STORE_NAMESPACE
    from serve_app.usage_store import Accounting, store_name

    app = "usage-report"
    # a long flush interval: the test does the flushing; a long retry: the store stays down
    config = UsageStoreConfig(path=f"file://{folder}", retry_s=300, flush_interval_s=300)

    async def scenario() -> dict:
        accounting = Accounting(ServingMetrics(app), config, app_name=app, head_node=False)
        await accounting.admit(None, ["echo-model"])
        accounting.record(None, 3, 4, 0.0)
        await accounting.flush()
        assert accounting.unsent is None and not accounting.pending  # stored
        store = ray.get_actor(store_name(app), namespace=STORE_NAMESPACE)
        await accounting.admit(None, ["echo-model"])
        accounting.record(None, 5, 6, 0.0)
        ray.kill(store, no_restart=True)
        await asyncio.sleep(1)
        await accounting.flush()
        assert accounting.unsent is not None  # this batch failed and is kept
        await accounting.admit(None, ["echo-model"])
        accounting.record(None, 7, 8, 0.0)
        return await accounting.report()

    report = asyncio.run(scenario())
    assert report["store"].startswith("unavailable"), report
    # the two requests not stored: the failed batch and the one after it
    assert report["keys"][ANONYMOUS] == {"requests": 2, "prompt_tokens": 12, "completion_tokens": 14,
                                         "cost_usd": 0.0}, report
