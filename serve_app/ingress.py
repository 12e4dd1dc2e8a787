"""The HTTP front: FastAPI routes of the OpenAI API, deployed as the Serve ingress.

Routes stay thin: validation lives in protocol.py, generation in serving.py, providers behind them.
The ingress never imports vLLM.
"""

from __future__ import annotations

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

from serve_app.auth import KeyStore
from serve_app.config import LOCAL_PROVIDER, AppConfig, engine_deployment_name
from serve_app.metrics import ServingMetrics, cluster_exposition
from serve_app.protocol import REQUEST_MODELS, APIError, format_validation_error
from serve_app.providers.local import LocalEngineProvider
from serve_app.providers.remote import RemoteProvider
from serve_app.router import Router
from serve_app.serving import OpenAIServing
from serve_app.usage_store import Accounting

log = logging.getLogger("tuneserve.ingress")

HEALTH_TIMEOUT_S = 10.0
STATIC_DIR = Path(__file__).resolve().parent / "static"


TIMEOUT_HEADER = "X-Tuneserve-Timeout"  # a request's own deadline, in seconds


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


def _require_admin(request: Request, what: str) -> None:
    key = request.state.api_key  # None when auth is off
    if key is not None and not key.admin:
        raise APIError(403, f"This API key may not {what}: it needs admin: true.", code="not_admin")


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
@serve.ingress(api)
class Ingress:
    def __init__(self, config: AppConfig, engines: dict):
        self.config = config
        self.replica = serve.get_replica_context()
        self.metrics = ServingMetrics(self.replica.app_name)
        # An adapter is served by its base model's engine.
        local = LocalEngineProvider({i: engines[m.id] for i, m in config.local_models()})
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
        # Added per replica: the guard's limits and keys come from this app's config.
        api.user_middleware.clear()
        api.add_middleware(RequestGuard, max_body_bytes=ingress.max_body_bytes, keys=KeyStore(ingress.api_keys),
                           max_ongoing_requests=ingress.max_ongoing_requests)

    @api.get("/", include_in_schema=False)
    async def chat_page(self) -> FileResponse:
        """The web chat (static/): it talks to this same app through /v1."""
        return FileResponse(STATIC_DIR / "index.html")

    @api.get("/chat", include_in_schema=False)
    async def chat_page_alias(self) -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    @api.get("/v1/models")
    async def list_models(self) -> dict:
        """Local and remote models, each with the providers that serve it; then the aliases."""
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
        try:
            raw = json.loads(await request.body())
        except ValueError as exc:
            raise APIError(400, f"Request body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(raw, dict):
            raise APIError(400, "The request body must be a JSON object (Content-Type: application/json).",
                           code="invalid_body")
        try:
            body = REQUEST_MODELS[endpoint].model_validate(raw)
        except ValidationError as exc:
            raise format_validation_error(exc.errors()) from None
        timeout_s = self._timeout(request.headers.get(TIMEOUT_HEADER))
        return await self.serving.handle(endpoint, raw, body, request.state.api_key, timeout_s)

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

    @api.get("/admin/usage")
    async def usage(self, request: Request) -> dict:
        """Per-key usage (from the usage store, so every replica answers the same), and this replica's live
        view of each provider."""
        _require_admin(request, "read usage")
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
        _require_admin(request, "read metrics")
        return Response(await cluster_exposition(), media_type="text/plain; version=0.0.4")
