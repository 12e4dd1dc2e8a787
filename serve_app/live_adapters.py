"""Live adapters, as one ingress replica sees them: LoRA adapters registered at runtime on the engines of
models that allow them (`live_adapters.enabled`), kept in the app's registry (serve_app/lora_registry.py).

`LiveAdapters` owns this replica's view of the registry and the checks a registration goes through. When the
registry changes it offers each adapter to the router, the local engine provider and the serving layer, and
withdraws deleted ones, through their own methods.
"""

from __future__ import annotations

import asyncio
import logging
import re

from serve_app.config import LOCAL_PROVIDER, NAME_PATTERN, AppConfig, ModelConfig
from serve_app.lora_registry import AdapterRequest, RegistryView, adapter_not_found, mux_id, read_adapter_config
from serve_app.protocol import APIError
from serve_app.providers.local import LocalEngineProvider
from serve_app.providers.ranking import Router
from serve_app.serving import OpenAIServing

log = logging.getLogger("tuneserve.live_adapters")

REGISTRY_TIMEOUT_S = 30.0
FIRST_COPY_TIMEOUT_S = 10.0  # a replica's first request waits at most this for the registry's set
ADAPTER_CHECK_TIMEOUT_S = 300.0  # an engine replica fetches the adapter from storage and loads it


def adapter_object(entry: dict) -> dict:
    """An adapter as /v1/adapters shows it (admin keys only: it carries the storage URI)."""
    return {"id": entry["id"], "object": "adapter", "base": entry["base"], "uri": entry["uri"],
            "created": entry["created"]}


class LiveAdapters:
    def __init__(self, config: AppConfig, engines: dict, app_name: str, router: Router,
                 local: LocalEngineProvider, serving: OpenAIServing):
        self.config = config
        self.engines = engines
        self.router, self.local, self.serving = router, local, serving
        self.bases: dict[str, ModelConfig] = {m.id: m for m in config.models
                                              if m.live_adapters.enabled and m.task == "generate"}
        self.taken = set(config.model_ids()) | set(config.aliases)  # ids an adapter may not take
        self.entries: dict[str, dict] = {}  # adapter id -> its registry entry, as routed by this replica
        self.registry: RegistryView | None = None
        self.waited = False
        if self.bases:
            self.registry = RegistryView(app_name, config.adapter_registry.path, config.ingress.placement == "head",
                                         on_change=self._route)

    async def ready(self) -> None:
        """This replica's copy of the registry, taken on its first request and then kept current."""
        if self.registry is None or self.registry.version is not None or self.waited:
            return
        try:
            await self.registry.ready(timeout_s=FIRST_COPY_TIMEOUT_S)
        except Exception as exc:  # serve the configured models meanwhile; the view keeps trying
            self.waited = True  # once: later requests do not wait for it
            log.warning("adapter registry not reachable yet: %s", exc)

    def models(self) -> list[dict]:
        """The adapters as /v1/models lists them: no storage URI (that is for admin keys, /v1/adapters)."""
        listed = []
        for entry in self.entries.values():
            base = self.bases[entry["base"]]
            listed.append({"id": entry["id"], "object": "model", "created": entry["created"],
                           "owned_by": base.owned_by, "providers": [LOCAL_PROVIDER], "parent": base.id,
                           "max_model_len": base.max_model_len})
        return listed

    def _route(self, entries: dict[str, dict]) -> None:
        """Route what the registry holds: new adapters to their base model's engines, deleted ones nowhere."""
        wanted = {i: e for i, e in entries.items() if e["base"] in self.bases and i not in self.taken}
        for adapter_id in set(self.entries) - set(wanted):
            self.router.withdraw(adapter_id)
            self.local.remove_live(adapter_id)
            self.serving.remove_model(adapter_id)
        for adapter_id, entry in wanted.items():
            if self.entries.get(adapter_id, {}).get("seq") == entry["seq"]:
                continue
            base = self.bases[entry["base"]]
            self.router.offer_live(adapter_id, base.price)
            self.local.add_live(adapter_id, self.engines[base.id], mux_id(entry))
            self.serving.add_model(adapter_id, "generate", base.max_model_len)
        self.entries = wanted

    async def _call_registry(self, method: str, *args):
        if self.registry is None:
            raise APIError(400, "No model here takes live adapters (set live_adapters.enabled on a model).",
                           code="live_adapters_off")
        try:
            registry = await self.registry.registry()
            return await asyncio.wait_for(getattr(registry, method).remote(*args), REGISTRY_TIMEOUT_S)
        except Exception as exc:
            self.registry.handle = None
            raise APIError(503, f"The adapter registry cannot be reached ({type(exc).__name__}). Retry shortly.",
                           code="adapter_registry_unavailable", headers={"Retry-After": "2"}) from None

    def _base_for(self, base_id: str | None) -> ModelConfig:
        if base_id is None:
            if len(self.bases) != 1:
                raise APIError(400, "'base' is required: it names the model the adapter was trained on (here: "
                               f"{', '.join(self.bases) or 'none takes live adapters'}).", param="base",
                               code="invalid_value")
            base_id = next(iter(self.bases))
        base = self.bases.get(base_id)
        if base is None:
            if base_id in dict(self.config.local_models()):
                raise APIError(400, f"The model '{base_id}' does not take live adapters (set live_adapters.enabled "
                               "in its config).", param="base", code="live_adapters_off")
            raise APIError(404, f"The base model '{base_id}' is not served here; live adapters go on: "
                           f"{', '.join(self.bases)}.", param="base", code="model_not_found")
        return base

    async def register(self, wanted: AdapterRequest) -> dict:
        """Check everything, then store: a refused adapter leaves nothing behind."""
        from cluster.storage import StorageError, confined

        await self.ready()
        base = self._base_for(wanted.base)
        if wanted.id in self.taken or wanted.id in self.entries:
            raise APIError(409, f"The model id '{wanted.id}' is taken.", param="id", code="adapter_exists")
        if "#" in wanted.id or not re.fullmatch(NAME_PATTERN, wanted.id):
            raise APIError(400, f"Invalid adapter id '{wanted.id[:80]}': letters, digits and . _ : / -, starting "
                           "with a letter or digit.", param="id", code="invalid_value")
        try:  # a storage-relative path becomes the URI every node resolves; only under the allowed roots
            uri = (await asyncio.to_thread(confined, wanted.uri, self.config.storage.allowed_roots)).uri
        except StorageError:
            raise adapter_not_found(wanted.uri) from None
        adapter_config = await asyncio.to_thread(read_adapter_config, uri, wanted.uri)
        if adapter_config["r"] > base.live_adapters.max_rank:
            raise APIError(400, f"The adapter's rank {adapter_config['r']} exceeds live_adapters.max_rank "
                           f"({base.live_adapters.max_rank}) of '{base.id}'.", param="uri", code="invalid_adapter")
        try:  # one engine replica loads it and lets it go: vLLM's own check against the base model
            why = await asyncio.wait_for(self.engines[base.id].check_adapter.remote(uri), ADAPTER_CHECK_TIMEOUT_S)
        except Exception as exc:
            raise APIError(503, f"No engine of '{base.id}' could check the adapter ({type(exc).__name__}: "
                           f"{str(exc)[:200]}). Retry shortly.", code="engine_unavailable") from None
        if why:
            raise APIError(400, f"The adapter at {uri} does not fit '{base.id}': {why[:500]}", param="uri",
                           code="invalid_adapter")
        outcome, entry = await self._call_registry("add", {"id": wanted.id, "base": base.id, "uri": uri})
        if outcome == "exists":
            raise APIError(409, f"The model id '{wanted.id}' is taken.", param="id", code="adapter_exists")
        await self.registry.refresh()
        log.info("live adapter %s registered on %s from %s", wanted.id, base.id, uri)
        return entry

    async def unregister(self, adapter_id: str) -> dict:
        await self.ready()
        entry = await self._call_registry("remove", adapter_id)
        if entry is None:
            raise APIError(404, f"No live adapter '{adapter_id}'.", param="id", code="adapter_not_found")
        await self.registry.refresh()
        log.info("live adapter %s deleted", adapter_id)
        return entry
