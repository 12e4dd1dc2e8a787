"""A provider backed by one of our engine deployments, reached through a Ray Serve handle."""

from __future__ import annotations

from typing import AsyncIterator

from serve_app.engine_api import EngineRequestError, GenerateChunk, GenerateRequest, ModelInfo


def _engine_error(exc: BaseException) -> EngineRequestError | None:
    """Ray wraps a replica's exception (RayTaskError); find our typed error inside, if it is one."""
    seen = exc
    for _ in range(5):
        if isinstance(seen, EngineRequestError):
            return seen
        nxt = getattr(seen, "cause", None) or seen.__cause__
        if nxt is None:
            return None
        seen = nxt
    return None


class LocalEngineProvider:
    def __init__(self, model_id: str, handle):
        self.model_id = model_id
        self._handle = handle

    async def stream(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        responses = self._handle.options(stream=True).generate.remote(request)
        finished = False
        try:
            async for chunk in responses:
                finished = chunk.finished
                if chunk.error is not None:
                    raise chunk.error
                yield chunk
        except EngineRequestError:
            raise
        except Exception as exc:
            typed = _engine_error(exc)
            if typed is not None:
                raise typed from None
            raise
        finally:
            if not finished:  # the client went away or failed: stop the engine's work on it
                responses.cancel()

    async def model_info(self) -> ModelInfo:
        return await self._handle.model_info.remote()

    async def check_health(self) -> None:
        await self._handle.check_health.remote()
