"""Where the adapter registry keeps which adapter is promoted, and the history a rollback
walks back: ``registry.json`` in ``<workspace>/adapters`` on the embedded store; with
``DOCENT_STORE=postgresql://…``, the same JSON in the database's ``docent_meta`` table (key
``adapter_registry``), so every API replica serves the same adapter and a promotion made
through one (or by the CLI, or the loop) reaches all within a poll.

The adapters' files stay in the workspace either way: replicas need its ``adapters/`` folder
on shared storage, or LLM servers (``DOCENT_LLM_URL``) that hold the adapters themselves.
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager
from typing import Any

import psycopg

from docent import pg
from docent.settings import DocentSettings
from docent.workspace import Workspace
from raft.adapters import AdapterRegistry

# The knowledge store's key/value table (ingest/pg_store.py creates it the same way).
META_TABLE = "CREATE TABLE IF NOT EXISTS docent_meta (key text PRIMARY KEY, value text NOT NULL)"
KEY = "adapter_registry"


class PgPromotion:
    """The registry's promotion state in ``docent_meta``. On ``pool`` where there is one (the
    API reads it per request), else on a connection per call (the CLI and the loop ask once
    or twice)."""

    def __init__(self, url: str, pool: pg.Pool | None = None) -> None:
        self.url = url
        self.pool = pool
        self._ready = False

    def _connection(self) -> AbstractContextManager[psycopg.Connection[Any]]:
        return self.pool.connection() if self.pool else pg.connect(self.url)

    def _ensure_table(self, conn: psycopg.Connection[Any]) -> None:
        if not self._ready:
            pg.create_tables(conn, META_TABLE)
            self._ready = True

    def load(self) -> dict[str, Any] | None:
        with self._connection() as conn:
            self._ensure_table(conn)
            row = conn.execute("SELECT value FROM docent_meta WHERE key = %s", (KEY,)).fetchone()
        return dict(json.loads(row[0])) if row else None

    def save(self, state: dict[str, Any]) -> None:
        with self._connection() as conn:
            self._ensure_table(conn)
            conn.execute(
                "INSERT INTO docent_meta (key, value) VALUES (%s, %s) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (KEY, json.dumps(state)),
            )


def open_registry(settings: DocentSettings, pool: pg.Pool | None = None) -> AdapterRegistry:
    """The workspace's adapters, promoted where ``settings.store`` says: registry.json
    (embedded) or the Postgres store (on ``pool`` if given)."""
    folder = Workspace(settings.workspace).adapters_dir
    if not settings.uses_postgres:
        return AdapterRegistry(folder)
    return AdapterRegistry(folder, PgPromotion(settings.store, pool))
