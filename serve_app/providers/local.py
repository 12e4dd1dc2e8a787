"""A provider backed by one of our engine deployments, reached through a Ray Serve handle."""

from __future__ import annotations

from typing import AsyncIterator

from serve_app.config import LOCAL_PROVIDER
from serve_app.engine_api import EngineRequestError, GenerateChunk
from serve_app.providers.base import ProviderError, ProviderRequest


class LocalEngineProvider:
    """Streams from the engine deployment of `request.upstream_model` (one Serve handle per local model)."""

    name = LOCAL_PROVIDER

    def __init__(self, handles: dict):
        self._handles = handles

    async def stream(self, request: ProviderRequest) -> AsyncIterator[GenerateChunk]:
        handle = self._handles[request.upstream_model]
        request.generate.model = request.upstream_model  # selects the adapter, if it is one
        responses = handle.options(stream=True).generate.remote(request.generate)
        finished = False
        try:
            async for chunk in responses:
                finished = chunk.finished
                if chunk.error is not None:
                    raise chunk.error
                yield chunk
        except EngineRequestError:
            raise
        except Exception as exc:  # replica died, backpressure, Ray errors: the engine failed, not the client
            raise ProviderError(f"local engine failed: {type(exc).__name__}: {exc}", reason="engine") from exc
        finally:
            if not finished:  # the client went away or failed: stop the engine's work on it
                responses.cancel()

    async def check_health(self, model_id: str) -> None:
        await self._handles[model_id].check_health.remote()

    async def aclose(self) -> None:
        return None
