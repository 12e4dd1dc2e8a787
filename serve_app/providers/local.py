"""A provider backed by one of our engine deployments, reached through a Ray Serve handle."""

from __future__ import annotations

from typing import AsyncIterator

from ray.serve.exceptions import BackPressureError

from serve_app.config import LOCAL_PROVIDER
from serve_app.providers.base import (OVERLOADED, EngineRequestError, Piece, ProviderCall, ProviderError,
                                      error_from_status)

OVERLOAD_RETRY_AFTER_S = 1.0


class LocalEngineProvider:
    """Streams from the engine deployment of the call's model (one Serve handle per local model or adapter)."""

    name = LOCAL_PROVIDER

    def __init__(self, handles: dict):
        self._handles = handles
        # Live adapters (serve_app/lora_registry.py): id -> (the base model's engine handle, multiplexed id).
        # Serve's multiplexing sends each to replicas that hold it; the engine loads it if none does.
        self.live: dict[str, tuple] = {}

    def add_live(self, adapter_id: str, base_handle, multiplexed_id: str) -> None:
        self.live[adapter_id] = (base_handle, multiplexed_id)

    def remove_live(self, adapter_id: str) -> None:
        self.live.pop(adapter_id, None)

    async def stream(self, call: ProviderCall) -> AsyncIterator[Piece]:
        live = self.live.get(call.body["model"])
        # The session (if the client named one) keeps to one engine replica (serve_app/replica_router.py).
        if live is not None:
            handle, multiplexed_id = live
            handle = handle.options(stream=True, multiplexed_model_id=multiplexed_id, session_id=call.session_id)
        else:
            handle = self._handles[call.body["model"]].options(stream=True, session_id=call.session_id)
        responses = handle.serve.remote(call.endpoint, call.body, call.request_id, call.client_wants_usage)
        done = False
        try:
            async for piece in responses:
                if piece.error is not None:
                    raise error_from_status(piece.status, piece.error, "local engine")
                yield piece
            done = True
        except (ProviderError, EngineRequestError, GeneratorExit):
            raise
        except BackPressureError as exc:  # every slot taken and the queue full: shed, do not wait
            raise ProviderError(f"local engine overloaded: {exc}", status=503, retry_after_s=OVERLOAD_RETRY_AFTER_S,
                                reason=OVERLOADED) from exc
        except Exception as exc:
            # replica died, Ray errors: the engine failed, not the client
            raise ProviderError(f"local engine failed: {type(exc).__name__}: {exc}", reason="engine") from exc
        finally:
            if not done:  # the client went away or failed: stop the engine's work on it
                responses.cancel()

    async def aclose(self) -> None:
        return None
