"""API keys (compared by SHA-256 digest only), and the ledger of per-key limits and usage.

Auth is on when any key is configured. The admin routes (adapters, /admin/*, /metrics) always need an admin
key, except for a client on loopback while Serve itself listens on loopback alone: a laptop. An app that
listens beyond loopback without keys is refused when it starts, unless the operator opts out
(`ingress.allow_unauthenticated`), and even then its admin routes stay shut. The ledger is kept where every ingress replica reaches it: in the
app's usage store (serve_app/usage_store.py), so that a key's limit holds across replicas. A replica keeps
a ledger of its own only while the store cannot be reached.

A key's tokens-per-minute limit counts requests from their admission: each reserves an estimate (its prompt
plus its max_tokens, or the context left) that is settled to the real count when it ends. Concurrent
bursts, and requests without max_tokens, therefore cannot go past the limit.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field

from serve_app.config import ApiKey, hash_key
from serve_app.protocol import APIError

log = logging.getLogger("tuneserve.auth")

WINDOW_S = 60.0
ANONYMOUS = "anonymous"


def is_loopback(host: str | None) -> bool:
    """127.0.0.0/8, ::1 or localhost. Anything else, an unknown host included, is not."""
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class UnsafeDeployment(ValueError):
    """The app would serve beyond loopback with no API key."""


def check_exposure(keys: list[ApiKey], listen_host: str | None, allow_unauthenticated: bool) -> None:
    """Refuse an app that listens beyond loopback without keys (an unknown host counts as beyond), unless the
    operator opted out; the opt-out is logged at every start."""
    if keys or is_loopback(listen_host):
        return
    if allow_unauthenticated:
        log.warning("ingress.allow_unauthenticated: serving without API keys on %s; anyone who reaches the "
                    "port may use every model. The admin routes are shut without an admin key.", listen_host)
        return
    raise UnsafeDeployment(
        f"Serve listens on {listen_host or 'an unknown host'}, beyond loopback, and the app has no API keys: "
        "anyone who reaches the port could use it. Add a key under ingress.api_keys, e.g. "
        "{name: admin, env: TUNESERVE_ADMIN_KEY, admin: true} with TUNESERVE_ADMIN_KEY set where the app is "
        "built; or listen on 127.0.0.1; or set ingress.allow_unauthenticated: true to serve without keys.")


def serve_listen_host() -> str | None:
    """The host Serve's HTTP proxies (and, with direct ingress, the ingress replicas) listen on, as the running
    Serve controller holds it; None when no controller can be asked (then callers assume beyond loopback).
    Serve has no public call for this: the controller's own `get_http_config` is the one its replicas use."""
    try:
        import ray
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

        if not ray.is_initialized():
            return None
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return ray.get(controller.get_http_config.remote(), timeout=30).host
    except Exception as exc:  # no controller yet, or the call moved in another Ray release
        log.info("cannot read Serve's HTTP host (%s: %s): taken as beyond loopback", type(exc).__name__, exc)
        return None


def metrics_id(key: ApiKey | None) -> str:
    """The key's label in metrics: its configured alias or a short digest, never its name."""
    return ANONYMOUS if key is None else key.metric_label()


class KeyStore:
    def __init__(self, keys: list[ApiKey], loopback_only: bool = False):
        self._keys_by_digest = {key.digest(): key for key in keys}
        self.loopback_only = loopback_only  # Serve listens on loopback alone

    @property
    def enabled(self) -> bool:
        return bool(self._keys_by_digest)

    def require_admin(self, key: ApiKey | None, client_host: str | None, what: str) -> None:
        """403 unless the caller holds an admin key, or auth is off and caller and listener are both on
        loopback."""
        if key is not None:
            if not key.admin:
                raise APIError(403, f"This API key may not {what}: it needs admin: true.", code="not_admin")
            return
        if self.enabled or not (self.loopback_only and is_loopback(client_host)):
            raise APIError(403, f"Only an admin API key may {what}: configure ingress.api_keys with an admin key "
                           "(admin: true) and send it as 'Authorization: Bearer <key>'. Without keys, only "
                           "clients on loopback may, and only while Serve listens on loopback alone.",
                           code="admin_key_required")

    def authenticate(self, authorization: str | None) -> ApiKey | None:
        """The key's policy; None when auth is off. Raises a 401 APIError otherwise."""
        if not self.enabled:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "Missing API key. Send it as 'Authorization: Bearer <key>'.",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        digest = hash_key(token.strip())
        for known, key in self._keys_by_digest.items():
            if hmac.compare_digest(known, digest):
                return key
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


@dataclass
class _Window:
    """Events of the last minute, as (time, amount)."""

    events: deque = field(default_factory=deque)  # of [time, amount]: a reservation is settled in place
    total: float = 0.0

    def trim(self, now: float) -> None:
        while self.events and self.events[0][0] <= now - WINDOW_S:
            self.total -= self.events.popleft()[1]

    def add(self, now: float, amount: float) -> list:
        event = [now, amount]
        self.events.append(event)
        self.total += amount
        return event

    def settle(self, event: list, amount: float) -> None:
        """Replace a reservation's amount with the real one (if it is still in the window)."""
        if self.events and event[0] >= self.events[0][0]:
            self.total += amount - event[1]
        event[1] = amount

    def wait_s(self, now: float) -> float:
        """Seconds until the oldest event leaves the window."""
        return max(1.0, math.ceil(self.events[0][0] + WINDOW_S - now)) if self.events else 1.0


@dataclass
class KeyUsage:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    _requests_window: _Window = field(default_factory=_Window, repr=False)
    _tokens_window: _Window = field(default_factory=_Window, repr=False)

    def public(self) -> dict:
        return {"requests": self.requests, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "cost_usd": round(self.cost_usd, 8)}

    def add(self, totals: dict) -> None:
        """Add another ledger's totals (`public()` form): a saved ledger, or one kept while the store was down."""
        self.requests += int(totals.get("requests", 0))
        self.prompt_tokens += int(totals.get("prompt_tokens", 0))
        self.completion_tokens += int(totals.get("completion_tokens", 0))
        self.cost_usd += float(totals.get("cost_usd", 0.0))


def check_models(key: ApiKey | None, models: list[str]) -> None:
    """403 when the key may not use one of the models."""
    if key is not None and key.models is not None:
        denied = [m for m in models if m not in key.models]
        if denied:
            raise APIError(403, f"This API key may not use model '{denied[0]}'. Allowed: "
                           f"{', '.join(key.models) or 'none'}.", param="model", code="model_not_allowed")


def has_limits(key: ApiKey | None) -> bool:
    return key is not None and (key.rpm is not None or key.tpm is not None)


class Ledger:
    """Admission (allowed models, requests and tokens per minute) and usage counters, per key."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.usage: dict[str, KeyUsage] = {}

    def admit(self, key: ApiKey | None, models: list[str], reserve_tokens: int = 0) -> list | None:
        """Raise 403/429 when the key may not send this request now. Returns the request's token
        reservation (for `record` to settle), when the key has a tokens-per-minute limit."""
        name = key.name if key else ANONYMOUS
        usage = self.usage.setdefault(name, KeyUsage())
        check_models(key, models)
        if key is None:
            usage.requests += 1
            return None
        now = self.clock()
        usage._requests_window.trim(now)
        usage._tokens_window.trim(now)
        if key.rpm is not None and usage._requests_window.total >= key.rpm:
            self._limited(f"{key.rpm} requests per minute", usage._requests_window.wait_s(now))
        if key.tpm is not None and reserve_tokens > key.tpm:
            raise APIError(429, f"Request too large for this API key's limit of {key.tpm} tokens per minute: it "
                           f"may use up to {reserve_tokens} (prompt plus max_tokens). Lower max_tokens.",
                           code="rate_limit_exceeded", param="max_tokens")
        if key.tpm is not None and usage._tokens_window.total + reserve_tokens > key.tpm:
            self._limited(f"{key.tpm} tokens per minute", usage._tokens_window.wait_s(now))
        usage._requests_window.add(now, 1)
        usage.requests += 1
        return usage._tokens_window.add(now, reserve_tokens) if key.tpm is not None else None

    @staticmethod
    def _limited(limit: str, wait_s: float) -> None:
        raise APIError(429, f"Rate limit reached for this API key: {limit}. Try again in {wait_s:.0f} s.",
                       code="rate_limit_exceeded", headers={"Retry-After": str(int(wait_s))})

    def record(self, key: ApiKey | str | None, prompt_tokens: int, completion_tokens: int, cost_usd: float,
               reservation: list | None = None, requests: int = 0) -> None:
        """A request's use, settled against its reservation. `requests` counts requests admitted elsewhere
        (by an ingress replica, for keys without limits)."""
        name = key if isinstance(key, str) else (key.name if key else ANONYMOUS)
        usage = self.usage.setdefault(name, KeyUsage())
        usage.requests += requests
        usage.prompt_tokens += prompt_tokens
        usage.completion_tokens += completion_tokens
        usage.cost_usd += cost_usd
        if reservation is not None:  # only keys with a tpm limit keep a window: nothing grows otherwise
            self.settle(name, reservation, prompt_tokens + completion_tokens)

    def settle(self, name: str, reservation: list, tokens: int) -> None:
        """A tokens-per-minute reservation replaced by the tokens the request really used."""
        window = self.usage[name]._tokens_window
        window.trim(self.clock())
        window.settle(reservation, tokens)

    def report(self) -> dict[str, dict]:
        return {name: usage.public() for name, usage in sorted(self.usage.items())}
