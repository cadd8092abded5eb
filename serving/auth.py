"""API keys: ``DOCENT_API_KEYS="key1,key2:admin"``. With no keys set the API is open, which
is only sensible on 127.0.0.1 (``docent serve`` warns otherwise)."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from fastapi import HTTPException, Request

from docent.errors import ConfigError

SCOPES = ("user", "admin")


@dataclass(frozen=True)
class Principal:
    key_id: str  # the key's first characters, for logs; never the key itself
    admin: bool


class KeyRing:
    def __init__(self, spec: str | None) -> None:
        self.keys: list[tuple[str, bool]] = []
        for raw in (spec or "").split(","):
            entry = raw.strip()
            if not entry:
                continue
            key, _, scope = entry.partition(":")
            scope = scope or "user"
            if scope not in SCOPES:
                raise ConfigError(f"API key scope {scope!r} is unknown: use KEY or KEY:admin")
            if len(key) < 8:
                raise ConfigError("API keys must be at least 8 characters long")
            self.keys.append((key, scope == "admin"))

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def find(self, presented: str) -> Principal | None:
        found = None
        for key, admin in self.keys:
            # Compare against every key in constant time: timing reveals nothing.
            if hmac.compare_digest(key.encode(), presented.encode()):
                found = Principal(key[:4] + "…", admin)
        return found


def presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.headers.get("x-api-key")


def authenticate(request: Request, admin: bool = False) -> Principal:
    ring: KeyRing = request.app.state.keys
    if not ring.enabled:
        return Principal("open", True)
    key = presented_key(request)
    if not key:
        raise HTTPException(
            401,
            "an API key is required: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    principal = ring.find(key)
    if principal is None:
        raise HTTPException(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})
    if admin and not principal.admin:
        raise HTTPException(403, "this needs an admin key (DOCENT_API_KEYS entry 'KEY:admin')")
    return principal


def require_user(request: Request) -> Principal:
    return authenticate(request)


def require_admin(request: Request) -> Principal:
    return authenticate(request, admin=True)
