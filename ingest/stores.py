"""Which knowledge store the settings name: the embedded one (FAISS + SQLite version folders
in the workspace) or Postgres (``DOCENT_STORE=postgresql://…``). Stages above ``retrieval/``
go through these two functions and the ``Retriever``, never through a store directly."""

from __future__ import annotations

from docent import pg
from docent.settings import DocentSettings
from docent.workspace import Workspace
from ingest import pg_store
from ingest.store import KnowledgeStore, current_version

AnyStore = KnowledgeStore | pg_store.PgKnowledgeStore


def open_store(settings: DocentSettings, pool: pg.Pool | None = None) -> AnyStore:
    """The live version, read-only. Raises EmptyIndexError when nothing was ingested yet."""
    if settings.uses_postgres:
        if pool is not None:
            return pg_store.PgKnowledgeStore.open(pool)
        own = pg.Pool(settings.store, settings.pg_ef_search, max_size=2)
        try:
            return pg_store.PgKnowledgeStore.open(own, owns_pool=True)
        except BaseException:
            own.close()
            raise
    return KnowledgeStore.open(Workspace(settings.workspace).index_dir)


def live_version(settings: DocentSettings) -> str | None:
    """The name of the published version (e.g. ``v000004``), or None when there is none."""
    if settings.uses_postgres:
        return pg_store.live_version(settings.store)
    folder = current_version(Workspace(settings.workspace).index_dir)
    return folder.name if folder else None
