"""The app's usage store: per-key limits, usage and cost, and open circuits, shared by every ingress replica.

One detached Ray actor per Serve application (`UsageStore`), on the head node, next to the ingress:
- **Limits hold across replicas.** A request of a key with an rpm or tpm limit is admitted by the store: one
  actor call before the request goes out (about a millisecond within one node). Keys without limits, and
  anonymous requests, cost no call: their usage is sent in batches (`flush_interval_s`).
- **Usage survives restarts.** The actor outlives ingress replicas and redeploys; it writes the usage
  totals to the storage URI (`<path>/<app>/usage.json`, at most `persist_interval_s` after a change) and
  reads them back when it starts again (a restart after its node died, or after it was killed).
- **Circuits are shared.** A breaker that opens on one replica is open on every replica at its next
  flush; a successful probe closes it everywhere.
- **When the store cannot be reached** (`timeout_s`), a replica fails *open* by default: it admits with a
  ledger of its own (each replica then enforces the limits alone, as if it were the only one) and keeps
  the usage until the store is back. `on_unavailable: closed` refuses requests of keys with limits instead
  (503 `usage_store_unavailable`). Either way it tries the store again after `retry_s`, and a store that
  is gone for good is created anew from the saved totals.

Why a Ray actor rather than Redis or Postgres: it needs no server of its own on a laptop or a cluster, it
runs wherever Ray does, and it persists to the storage every node already uses. What is lost in a crash:
usage newer than `persist_interval_s` when the store's node dies, and newer than `flush_interval_s` when an
ingress replica's does; the minute windows of the limits start afresh when the store restarts. Batches of
usage are numbered per replica and applied once, so a batch sent again after a call that timed out is not
counted twice; an admission that times out after the store took it is (the replica then admits on its own).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

import ray

from serve_app.auth import ANONYMOUS, WINDOW_S, KeyUsage, Ledger, check_models, has_limits, metrics_id
from serve_app.config import ApiKey, UsageStoreConfig
from serve_app.metrics import ServingMetrics
from serve_app.protocol import APIError
from serve_app.state_actors import open_state_actor, state_uri

log = logging.getLogger("tuneserve.usage")
USAGE_FILE = "usage.json"
SYNC_EVERY_S = 1.0  # a replica with nothing to send still asks for the open circuits this often
START_TIMEOUT_S = 60.0  # a store being created (a new worker process) may take this long to answer first


def store_name(app_name: str) -> str:
    return f"usage-store:{app_name}"


@ray.remote(num_cpus=0)
class UsageStore:
    """The ledger of every key, and the open circuits, for one application."""

    def __init__(self, uri: str | None, persist_interval_s: float):
        from cluster.storage import locate

        self.ledger = Ledger()
        self.reservations: dict[int, tuple[str, list]] = {}  # id -> its key, and its event in the key's token window
        self.next_id = 0
        self.open_routes: dict[tuple[str, str], float] = {}  # (provider, model) -> open until (monotonic)
        self.persist_interval_s = persist_interval_s
        # The last batch applied per sender (an ingress replica's ledger): a batch sent again after a call
        # that timed out, but had been applied, is not counted twice.
        self.applied: dict[str, int] = {}
        self.location = locate(uri).join(USAGE_FILE) if uri else None
        self.dirty = False
        self.saver: asyncio.Task | None = None
        if self.location is not None and self.location.exists():
            saved = json.loads(self.location.read_text())
            for name, totals in saved.get("keys", {}).items():
                self.ledger.usage.setdefault(name, KeyUsage()).add(totals)
            self.applied = saved.get("applied", {})
            log.info("usage store: %d keys read from %s", len(saved.get("keys", {})), self.location.uri)

    async def ready(self) -> bool:
        return True

    async def admit(self, key: ApiKey, models: list[str], reserve_tokens: int) -> tuple:
        """("ok", reservation id or None), or ("refused", the APIError's parts)."""
        self._start_saver()
        try:
            event = self.ledger.admit(key, models, reserve_tokens)
        except APIError as exc:
            return "refused", exc.status_code, exc.message, exc.code, exc.param, exc.headers
        self.dirty = True
        if event is None:
            return "ok", None
        self.next_id += 1
        self.reservations[self.next_id] = (key.name, event)
        return "ok", self.next_id

    async def sync(self, sender: str, seq: int, usage: dict[str, list], settlements: list[tuple[int, int]],
                   route_changes: list[tuple[str, str, float | None]]) -> dict[tuple[str, str], float]:
        """A replica's batch number `seq`: usage per key [requests, prompt, completion, cost], reservations
        settled to their real token counts, and circuits it opened (seconds of cooldown left) or closed
        (None). A batch already applied is ignored. Returns the open circuits with the seconds of cooldown
        left."""
        self._start_saver()
        if seq <= self.applied.get(sender, 0):
            return self._open_routes_left()
        self.applied[sender] = seq
        for name, (requests, prompt, completion, cost) in usage.items():
            self.ledger.record(name, prompt, completion, cost, requests=requests)
        for reservation_id, tokens in settlements:
            name, event = self.reservations.pop(reservation_id, (None, None))
            if name is not None:
                self.ledger.settle(name, event, tokens)
        now = time.monotonic()
        # Reservations never settled (their replica died) leave with their window.
        for reservation_id in [i for i, (_, event) in self.reservations.items() if event[0] <= now - WINDOW_S]:
            del self.reservations[reservation_id]
        for provider, model, left_s in route_changes:
            if left_s is None:
                self.open_routes.pop((provider, model), None)
            else:
                self.open_routes[(provider, model)] = now + left_s
        self.dirty = self.dirty or bool(usage)
        return self._open_routes_left()

    def _open_routes_left(self) -> dict[tuple[str, str], float]:
        now = time.monotonic()
        return {route: max(0.0, until - now) for route, until in self.open_routes.items()}

    async def report(self) -> dict[str, dict]:
        return self.ledger.report()

    async def save(self) -> None:
        """Write the totals now (when there is anything new)."""
        if self.location is None or not self.dirty:
            return
        self.dirty = False
        text = json.dumps({"keys": self.ledger.report(), "applied": self.applied, "saved_at": time.time()},
                          indent=1, sort_keys=True)
        try:
            await asyncio.to_thread(self.location.write_text, text)
        except Exception:
            self.dirty = True  # tried again at the next interval
            raise

    def _start_saver(self) -> None:
        if self.saver is None and self.location is not None:
            self.saver = asyncio.get_running_loop().create_task(self._save_every())

    async def _save_every(self) -> None:
        while True:
            await asyncio.sleep(self.persist_interval_s)
            try:
                await self.save()
            except Exception as exc:  # storage unreachable: keep the totals in memory, and try again
                log.warning("usage store: saving to %s failed: %s", self.location.uri, exc)


class Accounting:
    """The ingress side: admission and usage records of one replica, against the app's usage store (or, with
    no store configured and while it cannot be reached, a ledger of the replica's own). Also the per-key
    metrics, and the circuits the router shares."""

    def __init__(self, metrics: ServingMetrics, config: UsageStoreConfig | None = None, app_name: str = "",
                 router=None, head_node: bool = True):
        self.metrics = metrics
        self.config = config  # None: no store, this replica's ledger only
        self.app_name = app_name
        self.router = router
        self.head_node = head_node
        self.local = Ledger()  # limits (and, without a store, usage) of this replica alone
        self.pending: dict[str, list] = {}  # usage not yet in the store: key -> [requests, prompt, completion, cost]
        self.settlements: list[tuple[int, int]] = []
        self.sender = uuid.uuid4().hex  # this ledger, for the store's record of batches it applied
        self.seq = 0
        self.unsent: tuple | None = None  # a batch whose sending failed: sent again as it is, same number
        self.handle = None
        self.down_until = 0.0
        self.down_reason = ""
        self.flusher: asyncio.Task | None = None
        self.connecting: asyncio.Lock | None = None

    # -- what serving calls ---------------------------------------------------------------------------

    async def admit(self, key: ApiKey | None, models: list[str], reserve_tokens: int = 0):
        """Raise 403/429 (or 503 when the store is down and we fail closed). Returns the reservation to
        hand back to `record`."""
        name = key.name if key else ANONYMOUS
        if self.config is None:
            reservation = self.local.admit(key, models, reserve_tokens)
        elif not has_limits(key):
            check_models(key, models)
            self._pending(name)[0] += 1
            self._start_flusher()
            reservation = None
        else:
            reservation = await self._admit_in_store(key, models, reserve_tokens)
        self.metrics.key_requests.labels(metrics_id(key)).inc()
        return reservation

    def record(self, key: ApiKey | None, prompt_tokens: int, completion_tokens: int, cost_usd: float,
               reservation=None) -> None:
        name = key.name if key else ANONYMOUS
        label = metrics_id(key)
        self.metrics.key_tokens.labels(label, "prompt").inc(prompt_tokens)
        self.metrics.key_tokens.labels(label, "completion").inc(completion_tokens)
        self.metrics.key_cost.labels(label).inc(cost_usd)
        if self.config is None:
            self.local.record(key, prompt_tokens, completion_tokens, cost_usd, reservation)
            return
        totals = self._pending(name)
        totals[1] += prompt_tokens
        totals[2] += completion_tokens
        totals[3] += cost_usd
        if isinstance(reservation, int):  # reserved in the store
            self.settlements.append((reservation, prompt_tokens + completion_tokens))
        elif reservation is not None:  # reserved in this replica's ledger while the store was down
            self.local.record(key, prompt_tokens, completion_tokens, cost_usd, reservation)
        self._start_flusher()

    async def report(self) -> dict:
        """Every key's usage, from the store (after this replica's pending usage is in it)."""
        if self.config is None:
            return {"keys": self.local.report(), "store": "none: this replica's own"}
        await self.flush()
        handle = await self._store()
        if handle is not None:
            try:
                return {"keys": await self._call(handle.report), "store": "ok"}
            except Exception as exc:
                self._mark_down(exc)
        # Not yet stored: the batch whose sending failed and what came after it.
        batches = ([self.unsent[1]] if self.unsent is not None else []) + [self.pending]
        pending: dict[str, KeyUsage] = {}
        for batch in batches:
            for name, (requests, prompt, completion, cost) in batch.items():
                pending.setdefault(name, KeyUsage()).add({"requests": requests, "prompt_tokens": prompt,
                                                          "completion_tokens": completion, "cost_usd": cost})
        return {"keys": {name: usage.public() for name, usage in sorted(pending.items())},
                "store": f"unavailable ({self.down_reason}): this replica's usage not yet stored"}

    # -- the store ----------------------------------------------------------------------------------

    async def flush(self) -> None:
        """Send pending usage, settlements and circuit changes; take in the open circuits. A batch that
        failed is sent again first, unchanged: the store applies each batch once."""
        handle = await self._store()
        if handle is None:
            return
        for _ in range(2):  # the batch that failed before (if any), then the new one
            if self.unsent is None:
                self.seq += 1
                changes = self.router.take_changes() if self.router is not None else []
                self.unsent = (self.seq, self.pending, self.settlements, changes)
                self.pending, self.settlements = {}, []
            sent_at = time.monotonic()
            try:
                opens = await self._call(handle.sync, self.sender, *self.unsent)
            except Exception as exc:  # kept for the next try: nothing is lost
                self._mark_down(exc)
                return
            self.unsent = None
            if self.router is not None:
                self.router.apply_shared(opens, since=sent_at)
            if not (self.pending or self.settlements or (self.router is not None and self.router.changes)):
                return

    async def _admit_in_store(self, key: ApiKey, models: list[str], reserve_tokens: int):
        handle = await self._store()
        if handle is not None:
            try:
                outcome = await self._call(handle.admit, key, models, reserve_tokens)
            except Exception as exc:
                self._mark_down(exc)
            else:
                self._start_flusher()
                if outcome[0] == "refused":
                    _, status, message, code, param, headers = outcome
                    raise APIError(status, message, code=code, param=param, headers=headers)
                return outcome[1]
        if self.config.on_unavailable == "closed":
            raise APIError(503, "Usage store unreachable: requests of API keys with limits are refused until it "
                           f"is back ({self.down_reason}).", code="usage_store_unavailable",
                           headers={"Retry-After": str(max(1, round(self.config.retry_s)))})
        self._pending(key.name)[0] += 1  # counted here; the local ledger only enforces the limits
        self._start_flusher()
        return self.local.admit(key, models, reserve_tokens)

    async def _store(self):
        if self.handle is not None:
            return self.handle
        if time.monotonic() < self.down_until:
            return None
        if self.connecting is None:
            self.connecting = asyncio.Lock()
        async with self.connecting:  # one connection attempt at a time; the others take its outcome
            if self.handle is not None or time.monotonic() < self.down_until:
                return self.handle
            await self._connect_and_wait()
        return self.handle

    async def _connect_and_wait(self) -> None:
        try:
            handle = await asyncio.wait_for(asyncio.to_thread(self._connect), START_TIMEOUT_S)
            # A store created just now starts a worker process first: wait for it once, not per call.
            await asyncio.wait_for(handle.ready.remote(), START_TIMEOUT_S)
            self.handle = handle
        except Exception as exc:
            self._mark_down(exc)

    def _connect(self):
        """The app's store, created when it does not exist (or died for good); it reads the saved totals."""
        return open_state_actor(UsageStore, store_name(self.app_name), self.head_node,
                                state_uri(self.config.path, self.app_name), self.config.persist_interval_s)

    async def _call(self, method, *args):
        return await asyncio.wait_for(method.remote(*args), self.config.timeout_s)

    def _mark_down(self, exc: Exception) -> None:
        self.handle = None
        self.down_until = time.monotonic() + self.config.retry_s
        self.down_reason = f"{type(exc).__name__}: {str(exc)[:200]}"
        log.warning("usage store unreachable; trying again in %.0f s: %s", self.config.retry_s, self.down_reason)

    def _pending(self, name: str) -> list:
        totals = self.pending.get(name)
        if totals is None:
            totals = self.pending[name] = [0, 0, 0, 0.0]
        return totals

    def _start_flusher(self) -> None:
        if self.flusher is None or self.flusher.done():
            self.flusher = asyncio.get_running_loop().create_task(self._flush_every())

    async def _flush_every(self) -> None:
        idle_since = time.monotonic()
        while True:
            await asyncio.sleep(self.config.flush_interval_s)
            busy = (self.unsent or self.pending or self.settlements
                    or (self.router is not None and self.router.changes))
            if busy or time.monotonic() - idle_since >= SYNC_EVERY_S:
                idle_since = time.monotonic()
                try:
                    await self.flush()
                except Exception:  # never let the loop die
                    log.exception("usage flush failed")
