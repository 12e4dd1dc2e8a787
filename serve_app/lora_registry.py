"""Live adapters: LoRA adapters registered while the service runs, served without a restart.

- **The registry** (`AdapterRegistry`): one detached Ray actor per app on the head node, like the usage
  store. It holds `{id, base, uri, seq}` per adapter and writes every change to
  `<adapter_registry.path>/<app>/registry.json` before it answers, so the set survives ingress and engine
  restarts, a redeploy, and the actor's own loss (it reads the file back when it is created again).
- **Every replica watches it** (`RegistryView`): a long poll that returns as soon as the set changes, so an
  adapter registered through one ingress replica is routable on all of them within milliseconds.
- **Engines load on demand** (serve_app/engine.py): the first request for an adapter loads it into the
  replica's vLLM through vLLM's own runtime LoRA loading. Serve's model multiplexing keeps the last
  `cache_size` per replica and sends an adapter's requests to replicas that hold it. Its multiplexed id is
  `<id>#<seq>`: an id deleted and registered again names new weights, never the old replica cache.
- **Registration checks before anything is stored:** the base model is served here with live adapters on,
  the id is new, the URI holds a PEFT adapter of a rank the engine takes, and one engine replica loads it
  (vLLM's own check of its modules and shapes against the base model). A failure leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import ray

from serve_app.protocol import APIError
from serve_app.state_actors import open_state_actor, state_uri

log = logging.getLogger("tuneserve.adapters")
REGISTRY_FILE = "registry.json"
WATCH_TIMEOUT_S = 30.0  # a long poll returns after this long even without a change
START_TIMEOUT_S = 60.0  # a registry being created (a new worker process) may take this long to answer first
RETRY_S = 2.0  # a replica that lost the registry tries again this much later


def registry_name(app_name: str) -> str:
    return f"adapter-registry:{app_name}"


def mux_id(entry: dict) -> str:
    """The Serve multiplexed model id of one registration."""
    return f"{entry['id']}#{entry['seq']}"


@ray.remote(num_cpus=0)
class AdapterRegistry:
    """Every live adapter of one application."""

    def __init__(self, uri: str | None):
        from cluster.storage import locate

        self.location = locate(uri).join(REGISTRY_FILE) if uri else None
        self.entries: dict[str, dict] = {}
        self.seq = 0  # registrations so far, saved: a seq is never reused
        self.changed: asyncio.Event | None = None
        if self.location is not None and self.location.exists():
            saved = json.loads(self.location.read_text())
            self.entries, self.seq = saved["adapters"], saved["seq"]
            log.info("adapter registry: %d adapters read from %s", len(self.entries), self.location.uri)
        self.version = self.seq  # a restarted registry never repeats a version a watcher may hold

    async def ready(self) -> bool:
        return True

    async def add(self, entry: dict) -> tuple[str, dict]:
        """("added", the entry with its seq), or ("exists", the entry already under that id)."""
        if entry["id"] in self.entries:
            return "exists", self.entries[entry["id"]]
        self.seq += 1
        entry = {**entry, "seq": self.seq, "created": int(time.time())}
        self.entries[entry["id"]] = entry
        await self._changed()
        return "added", entry

    async def remove(self, adapter_id: str) -> dict | None:
        entry = self.entries.pop(adapter_id, None)
        if entry is not None:
            await self._changed()
        return entry

    async def snapshot(self) -> tuple[int, dict[str, dict]]:
        return self.version, self.entries

    async def watch(self, version: int, timeout_s: float = WATCH_TIMEOUT_S) -> tuple[int, dict[str, dict]]:
        """The set as soon as its version differs from `version` (or after `timeout_s`)."""
        deadline = time.monotonic() + timeout_s
        while self.version == version and time.monotonic() < deadline:
            if self.changed is None:
                self.changed = asyncio.Event()
            try:
                await asyncio.wait_for(self.changed.wait(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                break
        return self.version, self.entries

    async def _changed(self) -> None:
        self.version += 1
        if self.location is not None:  # saved before the caller hears of it: an answered change is durable
            text = json.dumps({"seq": self.seq, "adapters": self.entries}, indent=1)
            await asyncio.to_thread(self.location.write_text, text)
        if self.changed is not None:
            self.changed.set()
            self.changed = None


class RegistryView:
    """One replica's copy of the registry, kept current by a long poll. `on_change(entries)` runs on the
    replica's event loop after every change. Reads never wait for the registry: while it cannot be reached
    the last copy serves, and the view connects again every RETRY_S."""

    def __init__(self, app_name: str, path: str | None, head_node: bool,
                 on_change: Callable[[dict[str, dict]], None] | None = None):
        self.app_name = app_name
        self.path = path
        self.head_node = head_node
        self.on_change = on_change
        self.entries: dict[str, dict] = {}
        self.version: int | None = None
        self.handle = None
        self.watcher: asyncio.Task | None = None
        self.first: asyncio.Future | None = None

    def start(self) -> None:
        """Begin watching (idempotent); `ready()` waits for the first copy."""
        if self.watcher is None or self.watcher.done():
            loop = asyncio.get_running_loop()
            if self.first is None:
                self.first = loop.create_future()
            self.watcher = loop.create_task(self._watch())

    async def ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        self.start()
        await asyncio.wait_for(asyncio.shield(self.first), timeout_s)

    async def registry(self):
        if self.handle is None:
            self.handle = await asyncio.to_thread(self._connect)
        return self.handle

    def _connect(self):
        return open_state_actor(AdapterRegistry, registry_name(self.app_name), self.head_node,
                                state_uri(self.path, self.app_name))

    async def refresh(self) -> None:
        """Take the registry's set now (after a change this replica made)."""
        registry = await self.registry()
        self._take(*await asyncio.wait_for(registry.snapshot.remote(), START_TIMEOUT_S))

    def _take(self, version: int, entries: dict[str, dict]) -> None:
        if version == self.version:
            return
        self.version, self.entries = version, entries
        if self.first is not None and not self.first.done():
            self.first.set_result(None)
        if self.on_change is not None:
            try:
                self.on_change(entries)
            except Exception:
                log.exception("applying the adapter registry failed")

    async def _watch(self) -> None:
        while True:
            try:
                if self.version is None:
                    await self.refresh()
                registry = await self.registry()
                version, entries = await asyncio.wait_for(registry.watch.remote(self.version),
                                                          WATCH_TIMEOUT_S + 10)
                self._take(version, entries)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the registry died or is being created again: keep the last copy
                log.warning("adapter registry unreachable (%s: %s); trying again in %.0f s", type(exc).__name__,
                            str(exc)[:200], RETRY_S)
                self.handle = None
                await asyncio.sleep(RETRY_S)


# -- what registration checks --------------------------------------------------------------------------


@dataclass
class AdapterRequest:
    """A registration, from `POST /v1/adapters` ({id, base, uri}) or vLLM's `POST /v1/load_lora_adapter`
    ({lora_name, lora_path, base_model_name})."""

    id: str
    base: str | None
    uri: str

    @classmethod
    def parse(cls, body: object, vllm_shape: bool) -> "AdapterRequest":
        names = ("lora_name", "base_model_name", "lora_path") if vllm_shape else ("id", "base", "uri")
        if not isinstance(body, dict):
            raise APIError(400, "The request body must be a JSON object.", code="invalid_body")
        allowed = set(names) | ({"load_inplace", "is_3d_lora_weight"} if vllm_shape else set())
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise APIError(400, f"Unknown field '{unknown[0]}': an adapter takes {', '.join(names)}.",
                           param=unknown[0], code="unknown_parameter")
        if vllm_shape and body.get("load_inplace"):
            raise APIError(400, "load_inplace is not supported: register the new weights under a new id, or "
                           "delete the adapter and register it again.", param="load_inplace",
                           code="unsupported_parameter")
        values = []
        for name in names:
            value = body.get(name)
            required = name != names[1]
            if (value is None and required) or (value is not None and (not isinstance(value, str) or not value)):
                raise APIError(400, f"'{name}' must be a non-empty string.", param=name, code="invalid_value")
            values.append(value)
        return cls(values[0], values[1], values[2])


def adapter_not_found(given: str) -> APIError:
    """The one answer for a path that is missing, is no adapter, or lies outside the allowed storage: a caller
    learns nothing about which paths exist."""
    return APIError(400, f"No adapter at '{given[:300]}': not found, or outside the storage this service reads "
                    "adapters from (storage.allowed_roots).", param="uri", code="adapter_not_found")


def adapter_rank(config: Any, where: str) -> int:
    """The LoRA rank `r` of an adapter_config.json; ValueError naming `where` unless it is a positive integer."""
    rank = config.get("r") if isinstance(config, dict) else None
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{where}: adapter_config.json needs 'r', the LoRA rank, as a positive integer (it has "
                         f"{rank!r})")
    return rank


def read_adapter_config(uri: str, given: str | None = None) -> dict:
    """The adapter's adapter_config.json, from storage, with `r` checked; a 400 when it is not there (the same
    answer as a path outside the allowed storage) or not a PEFT LoRA adapter."""
    from cluster.storage import StorageError, check

    try:
        location = check(uri, must_exist=True)
        config_file = location.join("adapter_config.json")
        if not config_file.is_file():
            raise adapter_not_found(given or uri)
        config = json.loads(config_file.read_text())
    except StorageError:
        raise adapter_not_found(given or uri) from None
    except ValueError as exc:
        raise APIError(400, f"{uri}: adapter_config.json is not valid JSON ({exc}).", param="uri",
                       code="invalid_adapter") from None
    if not isinstance(config, dict) or str(config.get("peft_type", "")).upper() != "LORA":
        raise APIError(400, f"{uri} is not a LoRA adapter (adapter_config.json has peft_type "
                       f"{config.get('peft_type') if isinstance(config, dict) else None!r}).", param="uri",
                       code="invalid_adapter")
    try:
        config["r"] = adapter_rank(config, uri)
    except ValueError as exc:
        raise APIError(400, str(exc), param="uri", code="invalid_adapter") from None
    return config
