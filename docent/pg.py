"""Connections to the PostgreSQL database named by ``DOCENT_STORE=postgresql://…``.

One place opens them, so every user (the knowledge store, the API's serving state, jobs)
gets the same settings: autocommit (transactions are explicit, ``with conn.transaction()``),
pgvector's types registered, and pgvector 0.8's iterative index scans on so a filtered
vector search keeps walking the graph for k rows (up to pgvector's ``hnsw.max_scan_tuples``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from pgvector.psycopg import register_vector
from psycopg_pool import ConnectionPool

from docent.errors import ConfigError

# Advisory lock keys (pg_try_advisory_lock(bigint)): one per thing only one replica may do.
REFRESH_LOCK = 0x646F63656E74_01  # "docent" + 1: an index refresh
SCHEMA_LOCK = 0x646F63656E74_02  # "docent" + 2: creating tables (see create_tables)


def _configure(conn: psycopg.Connection, ef_search: int) -> None:
    present = conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'").fetchone()
    if not present:  # once per database; every later connection only checks
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    register_vector(conn)
    # relaxed_order: the HNSW scan keeps going until the filter has let k rows through
    # (pgvector >= 0.8); the search re-sorts the few rows it returns.
    conn.execute("SET hnsw.iterative_scan = relaxed_order")
    conn.execute(f"SET hnsw.ef_search = {int(ef_search)}")


def connect(url: str, ef_search: int = 200) -> psycopg.Connection:
    """A new autocommit connection, or a ConfigError that says how to reach the database."""
    try:
        conn = psycopg.connect(url, autocommit=True, connect_timeout=10)
    except psycopg.OperationalError as exc:
        raise ConfigError(
            f"cannot connect to the Postgres store {redact(url)}: {str(exc).strip()}. "
            "Check DOCENT_STORE and that the server is up"
        ) from exc
    try:
        _configure(conn, ef_search)
    except psycopg.Error as exc:
        conn.close()
        raise ConfigError(
            f"the database {redact(url)} has no pgvector: {str(exc).strip()}. Install the "
            "pgvector extension (0.8 or later) there, or ask its admin to run "
            "CREATE EXTENSION vector"
        ) from exc
    return conn


class Pool:
    """A small thread-safe pool (psycopg_pool) of configured connections, opened lazily."""

    def __init__(self, url: str, ef_search: int = 200, max_size: int = 8) -> None:
        self.url = url
        self._lock = threading.Lock()
        self._ef_search = ef_search
        self._max = max_size
        self._pool: ConnectionPool | None = None

    def _open(self) -> ConnectionPool:
        with self._lock:
            if self._pool is None:
                connect(self.url, self._ef_search).close()  # a clear error now, not a timeout
                self._pool = ConnectionPool(
                    self.url,
                    min_size=1,
                    max_size=self._max,
                    kwargs={"autocommit": True},
                    configure=lambda c: _configure(c, self._ef_search),
                    # A connection that died (e.g. the server restarted) is replaced, not lent.
                    check=ConnectionPool.check_connection,
                    open=True,
                )
            return self._pool

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        with self._open().connection() as conn:
            yield conn

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.close()
                self._pool = None


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://…"
    host = info.get("host", "")
    return f"postgresql://{info.get('user', '')}@{host}/{info.get('dbname', '')}"


def create_tables(conn: psycopg.Connection, ddl: str) -> None:
    """Run ``CREATE … IF NOT EXISTS`` statements in one transaction, under an advisory lock:
    replicas starting together would otherwise race in the catalog (IF NOT EXISTS is checked
    before the insert, so the loser fails with a unique violation on pg_type)."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
        conn.execute(ddl)
