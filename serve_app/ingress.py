"""The HTTP front: FastAPI routes of the OpenAI API, deployed as the Serve ingress.

Routes stay thin: validation lives in protocol.py, generation in serving.py, providers behind them.
The ingress never imports vLLM.
"""

# No `from __future__ import annotations` here: the routes are the deployment's bound methods, and Serve
# ships the class by value, so FastAPI could not resolve string annotations (Request) against its globals.
import asyncio
import json
import logging
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app.auth import KeyStore, check_exposure, is_loopback, serve_listen_host
from serve_app.config import LOCAL_PROVIDER, AppConfig, engine_deployment_name
from serve_app.live_adapters import LiveAdapters, adapter_object
from serve_app.lora_registry import AdapterRequest
from serve_app.metrics import ServingMetrics, cluster_exposition
from serve_app.protocol import REQUEST_MODELS, APIError, format_validation_error
from serve_app.providers.local import LocalEngineProvider
from serve_app.providers.remote import RemoteProvider
from serve_app.providers.ranking import Router
from serve_app.serving import OpenAIServing
from serve_app.usage_store import Accounting

log = logging.getLogger("tuneserve.ingress")

HEALTH_TIMEOUT_S = 10.0
STATIC_DIR = Path(__file__).resolve().parent / "static"


TIMEOUT_HEADER = "X-Tuneserve-Timeout"  # a request's own deadline, in seconds
SESSION_HEADER = "X-Session-Id"  # a conversation's id: its requests keep to one engine replica (replica_router.py)
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


async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    body_level = errors and tuple(errors[0].get("loc", ())) == ("body",)
    if body_level and errors[0].get("type") in ("missing", "model_attributes_type", "dict_type", "model_type"):
        return APIError(400, "The request body must be a JSON object (Content-Type: application/json).",
                        code="invalid_body").response()
    return format_validation_error(errors).response()


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return APIError(exc.status_code, str(exc.detail)).response()


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error")
    return APIError(500, f"Internal error: {type(exc).__name__}").response()


async def _json(request: Request):
    try:
        return json.loads(await request.body())
    except ValueError as exc:
        raise APIError(400, f"Request body is not valid JSON: {exc}", code="invalid_json") from None


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
@serve.ingress()  # the FastAPI app is built per replica, from its config (__serve_build_asgi_app__)
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
        self.adapters = LiveAdapters(config, engines, self.replica.app_name, self.router, local, self.serving)
        # Checked here too, not only when the app is built: `serve run module:app` builds it before Serve
        # starts, when the host it will listen on is not known yet.
        listen_host = serve_listen_host()
        check_exposure(ingress.api_keys, listen_host, ingress.allow_unauthenticated)
        self.keys = KeyStore(ingress.api_keys, loopback_only=is_loopback(listen_host))

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self)

    def _require_admin(self, request: Request, what: str) -> None:
        client = request.client.host if request.client else None
        self.keys.require_admin(request.state.api_key, client, what)

    async def chat_page(self) -> FileResponse:
        """The web chat (static/): it talks to this same app through /v1."""
        return FileResponse(STATIC_DIR / "index.html")

    async def chat_page_alias(self) -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    async def list_models(self) -> dict:
        """Local and remote models, each with the providers that serve it; then live adapters; then the
        aliases."""
        await self.adapters.ready()
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
        models += self.adapters.models()
        models += [{"id": alias, "object": "model", "created": 0, "owned_by": "alias", "alias_of": targets}
                   for alias, targets in self.config.aliases.items()]
        return {"object": "list", "data": models}

    async def get_model(self, model_id: str) -> dict:
        for model in (await self.list_models())["data"]:
            if model["id"] == model_id:
                return model
        raise APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")

    async def chat_completions(self, request: Request):
        return await self._serve("chat", request)

    async def completions(self, request: Request):
        return await self._serve("completions", request)

    async def embeddings(self, request: Request):
        return await self._serve("embeddings", request)

    async def responses(self, request: Request):
        """The Responses API, stateless (store: false): every request carries its whole input."""
        return await self._serve("responses", request)

    async def _serve(self, endpoint: str, request: Request):
        """Validate the client's JSON, then hand it on as it was sent (see serve_app/protocol.py)."""
        await self.adapters.ready()
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

    async def list_adapters(self, request: Request) -> dict:
        """Live adapters: id, base model, storage URI, when registered."""
        self._require_admin(request, "manage adapters")
        await self.adapters.ready()
        return {"object": "list", "data": [adapter_object(e) for e in self.adapters.entries.values()]}

    async def create_adapter(self, request: Request) -> dict:
        """Register a LoRA adapter: {id, base, uri}. Served within moments, by every replica, no restart."""
        self._require_admin(request, "manage adapters")
        return adapter_object(await self.adapters.register(AdapterRequest.parse(await _json(request), vllm_shape=False)))

    async def delete_adapter(self, adapter_id: str, request: Request) -> dict:
        """Unregister: new requests get 404 at once; streams running on it finish."""
        self._require_admin(request, "manage adapters")
        await self.adapters.unregister(adapter_id)
        return {"id": adapter_id, "object": "adapter", "deleted": True}

    async def load_lora_adapter(self, request: Request) -> Response:
        """vLLM's shape of a registration: {lora_name, lora_path, base_model_name}."""
        self._require_admin(request, "manage adapters")
        entry = await self.adapters.register(AdapterRequest.parse(await _json(request), vllm_shape=True))
        return Response(f"Success: LoRA adapter '{entry['id']}' added successfully.", media_type="text/plain")

    async def unload_lora_adapter(self, request: Request) -> Response:
        """vLLM's shape of a deletion: {lora_name}."""
        self._require_admin(request, "manage adapters")
        body = await _json(request)
        name = body.get("lora_name") if isinstance(body, dict) else None
        if not isinstance(name, str) or not name:
            raise APIError(400, "'lora_name' must be a non-empty string.", param="lora_name", code="invalid_value")
        await self.adapters.unregister(name)
        return Response(f"Success: LoRA adapter '{name}' removed successfully.", media_type="text/plain")

    async def usage(self, request: Request) -> dict:
        """Per-key usage (from the usage store, so every replica answers the same), and this replica's live
        view of each provider."""
        self._require_admin(request, "read usage")
        return {**await self.accounting.report(), "providers": self.router.snapshot(),
                "replica": self.replica.replica_id.unique_id}

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

    async def prometheus_metrics(self, request: Request) -> Response:
        """Prometheus text for the whole cluster: every node's Ray metrics export (ingress and engine replicas),
        summed over processes. With API keys configured it takes an admin key: it names keys and their spend."""
        self._require_admin(request, "read metrics")
        return Response(await cluster_exposition(), media_type="text/plain; version=0.0.4")


def build_api(ingress: "Ingress") -> FastAPI:
    """The replica's FastAPI app: the guard with this app's limits and keys, OpenAI-format errors, the chat
    page's files, and the routes, each bound to the replica's Ingress."""
    api = FastAPI(title="tuneserve", description="OpenAI-compatible API over vLLM engines on Ray Serve.",
                  docs_url="/docs", redoc_url=None)
    settings = ingress.config.ingress
    api.add_middleware(RequestGuard, max_body_bytes=settings.max_body_bytes, keys=ingress.keys,
                       max_ongoing_requests=settings.max_ongoing_requests)
    api.add_exception_handler(APIError, _api_error)
    api.add_exception_handler(RequestValidationError, _validation_error)
    api.add_exception_handler(StarletteHTTPException, _http_error)
    api.add_exception_handler(Exception, _unexpected)
    api.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")  # the chat page's JS and CSS
    routes = [
        ("GET", "/", ingress.chat_page, False),
        ("GET", "/chat", ingress.chat_page_alias, False),
        ("GET", "/v1/models", ingress.list_models, True),
        ("GET", "/v1/models/{model_id:path}", ingress.get_model, True),
        ("POST", "/v1/chat/completions", ingress.chat_completions, True),
        ("POST", "/v1/completions", ingress.completions, True),
        ("POST", "/v1/embeddings", ingress.embeddings, True),
        ("POST", "/v1/responses", ingress.responses, True),
        ("GET", "/v1/adapters", ingress.list_adapters, True),
        ("POST", "/v1/adapters", ingress.create_adapter, True),
        ("DELETE", "/v1/adapters/{adapter_id:path}", ingress.delete_adapter, True),
        ("POST", "/v1/load_lora_adapter", ingress.load_lora_adapter, True),
        ("POST", "/v1/unload_lora_adapter", ingress.unload_lora_adapter, True),
        ("GET", "/admin/usage", ingress.usage, True),
        ("GET", "/health", ingress.health, True),
        ("GET", "/metrics", ingress.prometheus_metrics, True),
    ]
    for method, path, endpoint, in_schema in routes:
        api.add_api_route(path, endpoint, methods=[method], include_in_schema=in_schema)
    return api
