"""The ingress's state, on a controlled clock: the ledger of per-key limits and usage (serve_app/auth.py, as the
usage store keeps it), and the router's circuit breakers and live figures (serve_app/providers/ranking.py)."""

from __future__ import annotations

import pytest

from serve_app.auth import ANONYMOUS, Ledger
from serve_app.config import ApiKey, AppConfig
from serve_app.metrics import ServingMetrics
from serve_app.protocol import APIError
from serve_app.providers.ranking import Router


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def metrics():
    return ServingMetrics()


def test_anonymous_usage_keeps_no_window(metrics):
    """With auth off (the default), 10,000 requests leave no per-request state behind: memory stays flat."""
    accounting = Ledger(clock=Clock())
    for _ in range(10_000):
        reservation = accounting.admit(None, ["m"], reserve_tokens=50)
        accounting.record(None, 10, 20, 0.0, reservation)
    usage = accounting.usage[ANONYMOUS]
    assert usage.requests == 10_000 and usage.completion_tokens == 200_000
    assert len(usage._tokens_window.events) == 0 and len(usage._requests_window.events) == 0


def test_tpm_reserves_at_admission_and_settles_at_the_end(metrics):
    clock = Clock()
    accounting = Ledger(clock=clock)
    key = ApiKey(name="burst", sha256="0" * 64, tpm=100)
    first = accounting.admit(key, ["m"], reserve_tokens=60)
    with pytest.raises(APIError) as caught:  # a concurrent burst: the first is still running
        accounting.admit(key, ["m"], reserve_tokens=60)
    assert caught.value.status_code == 429 and "100 tokens per minute" in caught.value.message
    accounting.record(key, 10, 5, 0.0, first)  # it used 15 of the 60 it reserved
    second = accounting.admit(key, ["m"], reserve_tokens=60)
    assert accounting.usage["burst"]._tokens_window.total == 75
    accounting.record(key, 10, 50, 0.0, second)
    assert accounting.usage["burst"]._tokens_window.total == 75
    clock.now += 61  # a minute later the window is empty again
    accounting.admit(key, ["m"], reserve_tokens=90)


def test_request_larger_than_the_limit_is_refused_at_once(metrics):
    accounting = Ledger(clock=Clock())
    key = ApiKey(name="small", sha256="0" * 64, tpm=40)
    with pytest.raises(APIError) as caught:
        accounting.admit(key, ["m"], reserve_tokens=41)
    assert caught.value.status_code == 429 and caught.value.param == "max_tokens"
    assert accounting.usage["small"]._tokens_window.total == 0


def test_unused_reservation_is_released(metrics):
    """A request that no provider answered reserves nothing afterwards."""
    accounting = Ledger(clock=Clock())
    key = ApiKey(name="failing", sha256="0" * 64, tpm=100)
    reservation = accounting.admit(key, ["m"], reserve_tokens=80)
    accounting.record(key, 0, 0, 0.0, reservation)
    accounting.admit(key, ["m"], reserve_tokens=80)


def _router(clock) -> Router:
    config = AppConfig.model_validate({
        "models": [{"id": "base-a"}, {"id": "base-b", "adapters": [{"id": "tuned-b", "path": "/nowhere"}]}],
        "ingress": {"local_engines": {"circuit_breaker": {"failure_threshold": 2, "cooldown_s": 5}}},
        "providers": [{"name": "up", "base_url": "http://127.0.0.1:9/v1", "max_concurrency": 8,
                       "circuit_breaker": {"failure_threshold": 2, "cooldown_s": 5},
                       "models": [{"id": "remote-a"}, {"id": "remote-b"}]}]})
    return Router(config, clock=clock)


def _fail(router: Router, provider: str, model: str, times: int) -> None:
    candidate = next(c for c in router.candidates[model] if c.provider == provider)
    for _ in range(times):
        lease, why = router.acquire(candidate)
        assert lease is not None, why
        router.release(lease, ok=False)


def _acquire(router: Router, provider: str, model: str):
    return router.acquire(next(c for c in router.candidates[model] if c.provider == provider))


def test_one_broken_model_does_not_block_the_others():
    clock = Clock()
    router = _router(clock)
    _fail(router, "local", "base-a", 2)  # one local engine keeps failing
    assert _acquire(router, "local", "base-a") == (None, "circuit_open")
    for model in ("base-b", "tuned-b"):
        lease, why = _acquire(router, "local", model)
        assert why == "ok"
        router.release(lease, ok=True, ttft_s=0.1)
    _fail(router, "up", "remote-a", 2)  # one upstream model keeps failing
    assert _acquire(router, "up", "remote-a") == (None, "circuit_open")
    lease, why = _acquire(router, "up", "remote-b")
    assert why == "ok"
    router.release(lease, ok=True, ttft_s=0.5, tokens_per_s=50.0)
    view = router.snapshot()
    assert view["up"]["circuit"] == "partial" and view["up"]["in_flight"] == 0
    assert view["up"]["models"]["remote-b"]["ttft_s"] == 0.5 and view["up"]["models"]["remote-a"]["ttft_s"] is None
    clock.now += 6  # cooled down: one probe goes through, and its success closes the circuit
    lease, why = _acquire(router, "up", "remote-a")
    assert why == "ok" and lease.probe
    assert _acquire(router, "up", "remote-a") == (None, "circuit_open")  # only one probe at a time
    router.release(lease, ok=True, ttft_s=0.2)
    assert router.snapshot()["up"]["circuit"] == "closed"


def test_circuits_are_shared_through_the_store():
    """What the usage store carries between two ingress replicas: a circuit one opens is open on the other;
    a successful probe on the first closes it on both. A circuit opened after the store was asked stays."""
    clock = Clock()
    first, second = _router(clock), _router(clock)
    _fail(first, "up", "remote-a", 2)
    changes = first.take_changes()
    assert changes == [("up", "remote-a", 5.0)]
    second.apply_shared({("up", "remote-a"): 5.0}, since=clock.now)  # what the store answers
    assert _acquire(second, "up", "remote-a") == (None, "circuit_open")
    assert _acquire(second, "up", "remote-b")[1] == "ok"
    clock.now += 6
    lease, why = _acquire(first, "up", "remote-a")
    assert why == "ok" and lease.probe
    first.release(lease, ok=True, ttft_s=0.1)
    assert first.take_changes() == [("up", "remote-a", None)]
    asked = clock.now
    clock.now += 0.1
    _fail(second, "local", "base-a", 2)  # opened on the second replica while it waited for the store
    second.apply_shared({}, since=asked)  # the store no longer holds remote-a open
    assert second.snapshot()["up"]["circuit"] == "closed"
    assert _acquire(second, "local", "base-a") == (None, "circuit_open")
