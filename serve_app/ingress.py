"""The HTTP front: FastAPI routes of the OpenAI API, deployed as the Serve ingress.

Routes stay thin: validation lives in protocol.py, generation in serving.py, providers behind them.
The ingress never imports vLLM.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app.adapters import AdapterRequest, RegistryView, adapter_not_found, mux_id, read_adapter_config
from serve_app.auth import KeyStore, check_exposure, is_loopback, serve_listen_host
from serve_app.config import LOCAL_PROVIDER, NAME_PATTERN, AppConfig, engine_deployment_name
from serve_app.metrics import ServingMetrics, cluster_exposition
from serve_app.protocol import REQUEST_MODELS, APIError, format_validation_error
from serve_app.providers.local import LocalEngineProvider
from serve_app.providers.remote import RemoteProvider
from serve_app.router import Router
from serve_app.serving import OpenAIServing
from serve_app.usage_store import Accounting

log = logging.getLogger("tuneserve.ingress")

HEALTH_TIMEOUT_S = 10.0
REGISTRY_TIMEOUT_S = 30.0
ADAPTER_CHECK_TIMEOUT_S = 300.0  # an engine replica fetches the adapter from storage and loads it
STATIC_DIR = Path(__file__).resolve().parent / "static"


TIMEOUT_HEADER = "X-Tuneserve-Timeout"  # a request's own deadline, in seconds
SESSION_HEADER = "X-Session-Id"  # a conversation's id: its requests keep to one engine replica (routing.py)
SESSION_ID_MAX_CHARS = 256


class RequestGuard:
    """ASGI middleware run before the body is parsed: load shedding (503), API keys on /v1/*, and the body
    size limit (413)."""

    def __init__(self, app, max_body_bytes: int = 1 << 20, keys: KeyStore | None = None,
                 max_ongoing_requests: int = 1000):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.keys = keys or KeyStore([])
        self.max_ongoing_requests = max_ongoing_requests
        self.ongoing = 0  # API requests in this replica, streams included until their last byte

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            path, root = scope["path"], scope.get("root_path", "")
            if root and path.startswith(root):  # an app under a route prefix: match its own routes
                path = path[len(root):]
            api_call = path.startswith("/v1/")
            if api_call and self.ongoing >= self.max_ongoing_requests:
                # Shed here, in OpenAI's format, before Serve's own queue (whose 503 is plain text) fills.
                raise APIError(503, f"The server is at its limit of {self.max_ongoing_requests} requests in "
                               "progress per replica. Retry shortly.", code="overloaded",
                               headers={"Retry-After": "1"})
            if api_call or path.startswith("/admin/") or path == "/metrics":
                headers = dict(scope.get("headers") or ())
                authorization = headers.get(b"authorization", b"").decode("latin-1") or None
                scope.setdefault("state", {})["api_key"] = self.keys.authenticate(authorization)
                declared = headers.get(b"content-length")
                if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
                    raise self._too_large()
        except APIError as exc:
            return await exc.response()(scope, receive, send)
        received = 0

        async def limited_receive():  # bodies without Content-Length (chunked) are counted as they arrive
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise self._too_large()
            return message

        self.ongoing += 1
        try:
            await self.app(scope, limited_receive, send)
        except APIError as exc:
            await exc.response()(scope, receive, send)
        finally:
            self.ongoing -= 1

    def _too_large(self) -> APIError:
        return APIError(413, f"Request body is larger than the limit of {self.max_body_bytes} bytes.",
                        code="request_too_large")


api = FastAPI(title="tuneserve", description="OpenAI-compatible API over vLLM engines on Ray Serve.",
              docs_url="/docs", redoc_url=None)
api.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")  # the chat page's JS and CSS


@api.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return exc.response()


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    body_level = errors and tuple(errors[0].get("loc", ())) == ("body",)
    if body_level and errors[0].get("type") in ("missing", "model_attributes_type", "dict_type", "model_type"):
        return APIError(400, "The request body must be a JSON object (Content-Type: application/json).",
                        code="invalid_body").response()
    return format_validation_error(errors).response()


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return APIError(exc.status_code, str(exc.detail)).response()


@api.exception_handler(Exception)
async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error")
    return APIError(500, f"Internal error: {type(exc).__name__}").response()


async def _json(request: Request):
    try:
        return json.loads(await request.body())
    except ValueError as exc:
        raise APIError(400, f"Request body is not valid JSON: {exc}", code="invalid_json") from None


def _adapter_object(entry: dict) -> dict:
    return {"id": entry["id"], "object": "adapter", "base": entry["base"], "uri": entry["uri"],
            "created": entry["created"]}


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
@serve.ingress(api)
class Ingress:
    def __init__(self, config: AppConfig, engines: dict):
        self.config = config
        self.replica = serve.get_replica_context()
        self.metrics = ServingMetrics(self.replica.app_name)
        # An adapter is served by its base model's engine.
        local = self.local = LocalEngineProvider({i: engines[m.id] for i, m in config.local_models()})
        self.engines = engines
        providers = {LOCAL_PROVIDER: local} if engines else {}
        providers.update({p.name: RemoteProvider(p) for p in config.providers})
        self.providers = providers
        self.router = Router(config)
        self.accounting = Accounting(self.metrics, config.ingress.usage_store, self.replica.app_name, self.router,
                                     head_node=config.ingress.placement == "head")
        ingress = config.ingress
        self.serving = OpenAIServing(providers, self.router, self.accounting, self.metrics, ingress.max_n,
                                     retry_policies={LOCAL_PROVIDER: ingress.local_engines.retry,
                                                     **{p.name: p.retry for p in config.providers}},
                                     tasks=config.tasks(),
                                     contexts={i: m.max_model_len for i, m in config.local_models()},
                                     request_timeout_s=ingress.request_timeout_s,
                                     local_attempt_timeout_s=ingress.local_engines.attempt_timeout_s,
                                     keepalive_s=ingress.sse_keepalive_s)
        # Live adapters: registered at runtime, on the engines of models that allow them.
        self.live_bases = {m.id: m for m in config.models if m.live_adapters.enabled and m.task == "generate"}
        self.live: dict[str, dict] = {}  # adapter id -> its registry entry, as routed by this replica
        self.registry = None
        self.registry_waited = False
        if self.live_bases:
            self.registry = RegistryView(self.replica.app_name, config.adapter_registry.path,
                                         config.ingress.placement == "head", on_change=self._adapters_changed)
        # Checked here too, not only when the app is built: `serve run module:app` builds it before Serve
        # starts, when the host it will listen on is not known yet.
        listen_host = serve_listen_host()
        check_exposure(ingress.api_keys, listen_host, ingress.allow_unauthenticated)
        self.keys = KeyStore(ingress.api_keys, loopback_only=is_loopback(listen_host))
        # Added per replica: the guard's limits and keys come from this app's config.
        api.user_middleware.clear()
        api.add_middleware(RequestGuard, max_body_bytes=ingress.max_body_bytes, keys=self.keys,
                           max_ongoing_requests=ingress.max_ongoing_requests)

    def _require_admin(self, request: Request, what: str) -> None:
        client = request.client.host if request.client else None
        self.keys.require_admin(request.state.api_key, client, what)

    @api.get("/", include_in_schema=False)
    async def chat_page(self) -> FileResponse:
        """The web chat (static/): it talks to this same app through /v1."""
        return FileResponse(STATIC_DIR / "index.html")

    @api.get("/chat", include_in_schema=False)
    async def chat_page_alias(self) -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    @api.get("/v1/models")
    async def list_models(self) -> dict:
        """Local and remote models, each with the providers that serve it; then live adapters; then the
        aliases."""
        await self._live_ready()
        local = dict(self.config.local_models())
        models = []
        for model_id in self.config.model_ids():
            providers = self.router.owners[model_id]
            entry = {"id": model_id, "object": "model", "created": 0, "providers": providers,
                     "owned_by": local[model_id].owned_by if model_id in local else providers[0]}
            if model_id in local:
                entry["max_model_len"] = local[model_id].max_model_len
                if local[model_id].id != model_id:  # a LoRA adapter on that model's engine
                    entry["parent"] = local[model_id].id
            models.append(entry)
        for entry in self.live.values():
            base = self.live_bases[entry["base"]]
            # No storage URI here: that is for admin keys, through /v1/adapters.
            models.append({"id": entry["id"], "object": "model", "created": entry["created"],
                           "owned_by": base.owned_by, "providers": [LOCAL_PROVIDER], "parent": base.id,
                           "max_model_len": base.max_model_len})
        models += [{"id": alias, "object": "model", "created": 0, "owned_by": "alias", "alias_of": targets}
                   for alias, targets in self.config.aliases.items()]
        return {"object": "list", "data": models}

    @api.get("/v1/models/{model_id:path}")
    async def get_model(self, model_id: str) -> dict:
        for model in (await self.list_models())["data"]:
            if model["id"] == model_id:
                return model
        raise APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._serve("chat", request)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._serve("completions", request)

    @api.post("/v1/embeddings")
    async def embeddings(self, request: Request):
        return await self._serve("embeddings", request)

    @api.post("/v1/responses")
    async def responses(self, request: Request):
        """The Responses API, stateless (store: false): every request carries its whole input."""
        return await self._serve("responses", request)

    async def _serve(self, endpoint: str, request: Request):
        """Validate the client's JSON, then hand it on as it was sent (see serve_app/protocol.py)."""
        await self._live_ready()
        raw = await _json(request)
        if not isinstance(raw, dict):
            raise APIError(400, "The request body must be a JSON object (Content-Type: application/json).",
                           code="invalid_body")
        try:
            body = REQUEST_MODELS[endpoint].model_validate(raw)
        except ValidationError as exc:
            raise format_validation_error(exc.errors()) from None
        timeout_s = self._timeout(request.headers.get(TIMEOUT_HEADER))
        session_id = request.headers.get(SESSION_HEADER, "")
        if len(session_id) > SESSION_ID_MAX_CHARS:
            raise APIError(400, f"Invalid {SESSION_HEADER} header: at most {SESSION_ID_MAX_CHARS} characters.",
                           param=SESSION_HEADER, code="invalid_session_id")
        return await self.serving.handle(endpoint, raw, body, request.state.api_key, timeout_s, session_id)

    def _timeout(self, value: str | None) -> float | None:
        if value is None:
            return None
        limit = self.config.ingress.max_request_timeout_s
        try:
            timeout_s = float(value)
        except ValueError:
            timeout_s = -1.0
        if not 0 < timeout_s <= limit:
            raise APIError(400, f"Invalid {TIMEOUT_HEADER} header '{value[:40]}': seconds, more than 0 and at most "
                           f"{limit:g}.", param=TIMEOUT_HEADER, code="invalid_timeout")
        return timeout_s

    # -- live adapters (serve_app/adapters.py) ------------------------------------------------------------

    async def _live_ready(self) -> None:
        """This replica's copy of the adapter registry, taken on its first request and then kept current."""
        if self.registry is None or self.registry.version is not None or self.registry_waited:
            return
        try:
            await self.registry.ready(timeout_s=10)
        except Exception as exc:  # serve the configured models meanwhile; the view keeps trying
            self.registry_waited = True  # once: later requests do not wait for it
            log.warning("adapter registry not reachable yet: %s", exc)

    def _adapters_changed(self, entries: dict[str, dict]) -> None:
        """Route what the registry holds: new adapters to their base model's engines, deleted ones nowhere."""
        configured = set(self.config.model_ids()) | set(self.config.aliases)
        wanted = {i: e for i, e in entries.items() if e["base"] in self.live_bases and i not in configured}
        for adapter_id in set(self.live) - set(wanted):
            self.router.withdraw(adapter_id)
            self.local.live.pop(adapter_id, None)
            self.serving.tasks.pop(adapter_id, None)
            self.serving.contexts.pop(adapter_id, None)
        for adapter_id, entry in wanted.items():
            if self.live.get(adapter_id, {}).get("seq") == entry["seq"]:
                continue
            base = self.live_bases[entry["base"]]
            self.router.offer_live(adapter_id, base.price)
            self.local.live[adapter_id] = (self.engines[base.id], mux_id(entry))
            self.serving.tasks[adapter_id] = "generate"
            self.serving.contexts[adapter_id] = base.max_model_len
        self.live = wanted

    async def _registry_call(self, method: str, *args):
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

    async def _register(self, wanted: AdapterRequest) -> dict:
        """Check everything, then store: a refused adapter leaves nothing behind."""
        from cluster.storage import StorageError, confined

        await self._live_ready()
        base_id = wanted.base
        if base_id is None:
            if len(self.live_bases) != 1:
                raise APIError(400, "'base' is required: it names the model the adapter was trained on (here: "
                               f"{', '.join(self.live_bases) or 'none takes live adapters'}).", param="base",
                               code="invalid_value")
            base_id = next(iter(self.live_bases))
        base = self.live_bases.get(base_id)
        if base is None:
            local = dict(self.config.local_models())
            if base_id in local:
                raise APIError(400, f"The model '{base_id}' does not take live adapters (set live_adapters.enabled "
                               "in its config).", param="base", code="live_adapters_off")
            raise APIError(404, f"The base model '{base_id}' is not served here; live adapters go on: "
                           f"{', '.join(self.live_bases)}.", param="base", code="model_not_found")
        if wanted.id in set(self.config.model_ids()) | set(self.config.aliases) or wanted.id in self.live:
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
        outcome, entry = await self._registry_call("add", {"id": wanted.id, "base": base.id, "uri": uri})
        if outcome == "exists":
            raise APIError(409, f"The model id '{wanted.id}' is taken.", param="id", code="adapter_exists")
        await self.registry.refresh()
        log.info("live adapter %s registered on %s from %s", wanted.id, base.id, uri)
        return entry

    async def _unregister(self, adapter_id: str) -> dict:
        await self._live_ready()
        entry = await self._registry_call("remove", adapter_id)
        if entry is None:
            raise APIError(404, f"No live adapter '{adapter_id}'.", param="id", code="adapter_not_found")
        await self.registry.refresh()
        log.info("live adapter %s deleted", adapter_id)
        return entry

    @api.get("/v1/adapters")
    async def list_adapters(self, request: Request) -> dict:
        """Live adapters: id, base model, storage URI, when registered."""
        self._require_admin(request, "manage adapters")
        await self._live_ready()
        return {"object": "list", "data": [_adapter_object(e) for e in self.live.values()]}

    @api.post("/v1/adapters")
    async def create_adapter(self, request: Request) -> dict:
        """Register a LoRA adapter: {id, base, uri}. Served within moments, by every replica, no restart."""
        self._require_admin(request, "manage adapters")
        return _adapter_object(await self._register(AdapterRequest.parse(await _json(request), vllm_shape=False)))

    @api.delete("/v1/adapters/{adapter_id:path}")
    async def delete_adapter(self, adapter_id: str, request: Request) -> dict:
        """Unregister: new requests get 404 at once; streams running on it finish."""
        self._require_admin(request, "manage adapters")
        await self._unregister(adapter_id)
        return {"id": adapter_id, "object": "adapter", "deleted": True}

    @api.post("/v1/load_lora_adapter")
    async def load_lora_adapter(self, request: Request) -> Response:
        """vLLM's shape of a registration: {lora_name, lora_path, base_model_name}."""
        self._require_admin(request, "manage adapters")
        entry = await self._register(AdapterRequest.parse(await _json(request), vllm_shape=True))
        return Response(f"Success: LoRA adapter '{entry['id']}' added successfully.", media_type="text/plain")

    @api.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(self, request: Request) -> Response:
        """vLLM's shape of a deletion: {lora_name}."""
        self._require_admin(request, "manage adapters")
        body = await _json(request)
        name = body.get("lora_name") if isinstance(body, dict) else None
        if not isinstance(name, str) or not name:
            raise APIError(400, "'lora_name' must be a non-empty string.", param="lora_name", code="invalid_value")
        await self._unregister(name)
        return Response(f"Success: LoRA adapter '{name}' removed successfully.", media_type="text/plain")

    @api.get("/admin/usage")
    async def usage(self, request: Request) -> dict:
        """Per-key usage (from the usage store, so every replica answers the same), and this replica's live
        view of each provider."""
        self._require_admin(request, "read usage")
        return {**await self.accounting.report(), "providers": self.router.snapshot(),
                "replica": self.replica.replica_id.unique_id}

    @api.get("/health")
    async def health(self) -> JSONResponse:
        """200 while every local model has a running engine replica; 503 naming those that have none.

        Serve's own view: its controller health-checks each replica outside the request queue, so a busy
        engine (every request slot taken) is still healthy. A call to the engine would queue behind them."""
        try:
            states = await asyncio.wait_for(asyncio.to_thread(self._engine_states), HEALTH_TIMEOUT_S)
        except Exception as exc:  # the controller did not answer: we cannot vouch for the engines
            states = {m.id: f"unknown: {type(exc).__name__}" for m in self.config.models}
        healthy = all(state == "ok" for state in states.values())
        circuits = {name: state["circuit"] for name, state in self.router.snapshot().items()}
        return JSONResponse({"status": "ok" if healthy else "unhealthy", "models": states, "providers": circuits},
                            status_code=200 if healthy else 503)

    def _engine_states(self) -> dict[str, str]:
        app = serve.status().applications.get(serve.get_replica_context().app_name)
        states = {}
        for model in self.config.models:
            deployment = app.deployments.get(engine_deployment_name(model.id)) if app else None
            running = deployment.replica_states.get("RUNNING", 0) if deployment else 0
            if running:
                states[model.id] = "ok"
            else:
                why = f"{deployment.status}: {deployment.message}"[:300] if deployment else "not deployed"
                states[model.id] = f"unhealthy: no running replica ({why})"
        return states

    @api.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        """Prometheus text for the whole cluster: every node's Ray metrics export (ingress and engine replicas),
        summed over processes. With API keys configured it takes an admin key: it names keys and their spend."""
        self._require_admin(request, "read metrics")
        return Response(await cluster_exposition(), media_type="text/plain; version=0.0.4")
