"""API keys: ``DOCENT_API_KEYS="key1,key2:admin,key3:user:acme+globex"``: a key, its scope
(``user`` by default, or ``admin``) and optionally the collections it may read and refresh,
joined by ``+``. A key limited to collections never retrieves another collection's chunks and
sees only its own chat sessions and answers. With no keys set the API is open, which is only
sensible on 127.0.0.1 (``docent serve`` warns otherwise).

Keys are compared in constant time and never logged: logs and stored rows carry a key's
fingerprint (a hash prefix) instead."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from fastapi import HTTPException, Request

from docent.errors import ConfigError

SCOPES = ("user", "admin")


@dataclass(frozen=True)
class Principal:
    key_id: str  # a fingerprint of the key, for logs and ownership; never the key itself
    admin: bool
    collections: frozenset[str] | None = None  # None: every collection

    def may_read(self, collection: str) -> bool:
        return self.collections is None or collection in self.collections

    @property
    def sees_all(self) -> bool:
        """Reads every session and answer: an admin key not limited to collections."""
        return self.admin and self.collections is None

    def owner_check(self) -> str | None:
        """The owner stored rows must have for this key to read them; None: any."""
        return None if self.sees_all else self.key_id

    def readable(self, asked: list[str] | str | None) -> list[str] | None:
        """The collections a request may search: what it asked for, checked against the key;
        with nothing asked, everything the key may read (None: no limit)."""
        wanted = [asked] if isinstance(asked, str) else list(asked or [])
        denied = [c for c in wanted if not self.may_read(c)]
        if denied:
            raise HTTPException(403, f"this API key may not read collection {denied[0]!r}")
        if wanted:
            return wanted
        return sorted(self.collections) if self.collections is not None else None


OPEN = Principal("open", True)


def fingerprint(key: str) -> str:
    return "key_" + hashlib.sha256(key.encode()).hexdigest()[:12]


class KeyRing:
    def __init__(self, spec: str | None) -> None:
        self.keys: list[tuple[bytes, Principal]] = []
        for raw in (spec or "").split(","):
            entry = raw.strip()
            if not entry:
                continue
            key, _, rest = entry.partition(":")
            scope, _, limited = rest.partition(":")
            scope = scope or "user"
            if scope not in SCOPES:
                raise ConfigError(
                    f"API key scope {scope!r} is unknown: use KEY, KEY:admin or "
                    "KEY:user:COLLECTION+COLLECTION"
                )
            if len(key) < 8:
                raise ConfigError("API keys must be at least 8 characters long")
            collections = None
            if limited:
                collections = frozenset(c.strip() for c in limited.split("+") if c.strip())
                if not collections:
                    raise ConfigError(f"API key {fingerprint(key)}: name at least one collection")
            principal = Principal(fingerprint(key), scope == "admin", collections)
            self.keys.append((key.encode(), principal))

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def find(self, presented: str) -> Principal | None:
        found = None
        given = presented.encode()
        for key, principal in self.keys:
            # Compare against every key in constant time: timing reveals nothing.
            if hmac.compare_digest(key, given):
                found = principal
        return found


def presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.headers.get("x-api-key")


def authenticate(request: Request, admin: bool = False) -> Principal:
    ring: KeyRing = request.app.state.keys
    if not ring.enabled:
        return OPEN
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


def require_full_admin(request: Request) -> Principal:
    """Admin routes that act on every collection at once (RAFT regeneration, feedback export)."""
    principal = authenticate(request, admin=True)
    if not principal.sees_all:
        raise HTTPException(403, "this needs an admin key that is not limited to collections")
    return principal
