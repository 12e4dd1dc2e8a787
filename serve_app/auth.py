"""API keys: on when any key is configured. Keys are compared by their SHA-256 digest only."""

from __future__ import annotations

import hmac

from serve_app.config import ApiKey, hash_key
from serve_app.protocol import APIError


class KeyStore:
    def __init__(self, keys: list[ApiKey]):
        self._names_by_digest = {key.digest(): key.name for key in keys}

    @property
    def enabled(self) -> bool:
        return bool(self._names_by_digest)

    def authenticate(self, authorization: str | None) -> str | None:
        """Return the key's name, None when auth is off; raise a 401 APIError otherwise."""
        if not self.enabled:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "Missing API key. Send it as 'Authorization: Bearer <key>'.",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        digest = hash_key(token.strip())
        for known, name in self._names_by_digest.items():
            if hmac.compare_digest(known, digest):
                return name
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
