"""The knowledge store in PostgreSQL (``DOCENT_STORE=postgresql://…``): one database that
several API replicas read and one refresh at a time writes.

Tables (``docent_`` prefix, so a database can hold other things too)::

    docent_meta        key/value: embedder, dim, vector type, version, manifest
    docent_lexemes     document frequency per lexeme (IDF for full-text ranking)
    docent_documents   one row per document (fingerprint: skip unchanged files)
    docent_chunks      text, metadata, content hash, filter columns, the vector (pgvector,
                       HNSW with cosine) and a generated tsvector (GIN) for full-text search

A refresh is one transaction: readers see the whole previous version or the whole new one,
never half (Postgres MVCC; each search is one statement, so one snapshot). A session-level
advisory lock lets one refresh run at a time across every replica; the server drops it, and
rolls the transaction back, if the refreshing process dies.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psycopg
from psycopg.types.json import Jsonb

from docent import pg
from docent.errors import EmptyIndexError, IndexBusyError, IndexMismatchError
from ingest.chunking import Chunk
from ingest.docstore import StoredChunk, StoredDocument, filter_columns
from ingest.lexical_index import lexical_text, token_lists

HNSW_M = 16
HNSW_EF_CONSTRUCTION = 64
# Sized for a 200k-chunk HNSW build in memory (pgvector warns and slows down when the graph
# no longer fits maintenance_work_mem).
BUILD_MEMORY = "1GB"
CHUNK_COLUMNS = "vector_id, chunk_id, doc_id, idx, text, text_hash, metadata"

TABLES = """
CREATE TABLE IF NOT EXISTS docent_meta (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE IF NOT EXISTS docent_documents (
    doc_id text PRIMARY KEY,
    path text NOT NULL,
    source text NOT NULL,
    collection text NOT NULL,
    fingerprint text NOT NULL,
    title text,
    n_chunks integer NOT NULL,
    updated_at text NOT NULL
);
CREATE TABLE IF NOT EXISTS docent_chunks (
    vector_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    chunk_id text NOT NULL UNIQUE,
    doc_id text NOT NULL REFERENCES docent_documents(doc_id) ON DELETE CASCADE,
    idx integer NOT NULL,
    text text NOT NULL,
    text_hash text NOT NULL,
    metadata jsonb NOT NULL,
    embedding {vtype}({dim}) NOT NULL,
    -- Filter columns, copied from metadata so the scan can test them without parsing JSON.
    source text NOT NULL,
    collection text NOT NULL,
    section text NOT NULL,
    -- What BM25 sees in the embedded store (title, section, text) as bm25s's stemmed tokens,
    -- so full-text ranking here matches it; dl: their number (BM25's document length).
    lexical text NOT NULL,
    dl integer NOT NULL,
    tsv tsvector GENERATED ALWAYS AS (to_tsvector('simple', lexical)) STORED
);
-- Document frequency of each lexeme, for BM25-style IDF weights in full-text ranking
-- (ts_rank has none: "error" would weigh as much as "QF-1042"). Rebuilt by each refresh.
CREATE TABLE IF NOT EXISTS docent_lexemes (lexeme text PRIMARY KEY, ndoc integer NOT NULL);
CREATE INDEX IF NOT EXISTS docent_chunks_doc ON docent_chunks (doc_id, idx);
CREATE INDEX IF NOT EXISTS docent_chunks_hash ON docent_chunks (text_hash);
CREATE INDEX IF NOT EXISTS docent_chunks_source ON docent_chunks (source);
CREATE INDEX IF NOT EXISTS docent_chunks_collection ON docent_chunks (collection);
CREATE INDEX IF NOT EXISTS docent_chunks_tsv ON docent_chunks USING gin (tsv);
"""
HNSW_INDEX = (
    "CREATE INDEX IF NOT EXISTS docent_chunks_hnsw ON docent_chunks "
    "USING hnsw (embedding {vtype}_cosine_ops) WITH (m = {m}, ef_construction = {ef})"
)


def stored_chunk(row: tuple[Any, ...]) -> StoredChunk:
    return StoredChunk(int(row[0]), row[1], row[2], row[3], row[4], row[5], row[6])


def _vector(value: Any) -> np.ndarray:
    """pgvector's Vector/HalfVector (or a numpy array) as float32."""
    array = value.to_numpy() if hasattr(value, "to_numpy") else np.asarray(value)
    return np.asarray(array, dtype=np.float32)


def _no_nul(value: Any) -> Any:
    """Postgres text and jsonb cannot hold U+0000, which SQLite stores and some PDFs yield."""
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, dict):
        return {_no_nul(k): _no_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nul(v) for v in value]
    return value


def tables_exist(conn: psycopg.Connection) -> bool:
    row = conn.execute("SELECT to_regclass('docent_chunks') IS NOT NULL").fetchone()
    return bool(row and row[0])


def read_meta(conn: psycopg.Connection) -> dict[str, str]:
    if not tables_exist(conn):
        return {}
    return {k: v for k, v in conn.execute("SELECT key, value FROM docent_meta")}


class PgDocStore:
    """The docstore interface of ``ingest.docstore.DocStore`` on Postgres tables, so
    ``ingest.pipeline`` applies a refresh to either store with the same code.

    New chunks are buffered and written with COPY before anything is read (or at the end of
    the transaction): one round trip per chunk would dominate a large ingest. Writes need not
    wait for them: deletes and updates name rows that exist, and a chunk's document row is
    written before its chunks are inserted."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn
        self._pending: list[tuple[Chunk, np.ndarray]] = []
        self._pending_docs: set[str] = set()

    def transaction(self) -> AbstractContextManager[Any]:
        return _Flushing(self)

    def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        self._pending_docs.clear()
        tokens = token_lists([lexical_text(c.text, c.metadata) for c, _ in pending])
        with (
            self.conn.cursor() as cur,
            cur.copy(
                "COPY docent_chunks (chunk_id, doc_id, idx, text, text_hash, metadata, embedding, "
                "source, collection, section, lexical, dl) FROM STDIN"
            ) as copy,
        ):
            for (chunk, vector), words in zip(pending, tokens, strict=True):
                copy.write_row(
                    (
                        chunk.chunk_id,
                        chunk.doc_id,
                        chunk.idx,
                        _no_nul(chunk.text),
                        chunk.text_hash,
                        Jsonb(_no_nul(chunk.metadata)),
                        vector,
                        *filter_columns(chunk.metadata),
                        " ".join(words),
                        len(words),
                    )
                )

    def discard(self) -> None:
        """Forget the buffered chunks (their transaction is rolled back)."""
        self._pending.clear()
        self._pending_docs.clear()

    def close(self) -> None:
        self.flush()

    # meta
    def get_meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM docent_meta WHERE key = %s", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.conn.execute(
            "INSERT INTO docent_meta (key, value) VALUES (%s, %s) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    # documents
    def documents(self) -> dict[str, StoredDocument]:
        self.flush()
        rows = self.conn.execute(
            "SELECT doc_id, path, source, collection, fingerprint, title, n_chunks "
            "FROM docent_documents"
        )
        return {r[0]: StoredDocument(*r) for r in rows}

    def upsert_document(self, doc: StoredDocument, updated_at: str) -> None:
        self.conn.execute(
            "INSERT INTO docent_documents (doc_id, path, source, collection, fingerprint, "
            "title, n_chunks, updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (doc_id) DO UPDATE SET path = excluded.path, source = excluded.source, "
            "collection = excluded.collection, fingerprint = excluded.fingerprint, "
            "title = excluded.title, n_chunks = excluded.n_chunks, "
            "updated_at = excluded.updated_at",
            (
                doc.doc_id,
                doc.path,
                doc.source,
                doc.collection,
                doc.fingerprint,
                doc.title,
                doc.n_chunks,
                updated_at,
            ),
        )

    def delete_document(self, doc_id: str) -> list[int]:
        if doc_id in self._pending_docs:
            self.flush()
        rows = self.conn.execute(
            "DELETE FROM docent_chunks WHERE doc_id = %s RETURNING vector_id", (doc_id,)
        ).fetchall()
        self.conn.execute("DELETE FROM docent_documents WHERE doc_id = %s", (doc_id,))
        return [int(r[0]) for r in rows]

    def delete_all(self) -> None:
        self.conn.execute("DELETE FROM docent_chunks")
        self.conn.execute("DELETE FROM docent_documents")

    # chunks
    def chunk_hashes(self, doc_id: str) -> dict[int, tuple[int, str]]:
        if doc_id in self._pending_docs:  # else one COPY per document of a refresh
            self.flush()
        rows = self.conn.execute(
            "SELECT idx, vector_id, text_hash FROM docent_chunks WHERE doc_id = %s", (doc_id,)
        )
        return {r[0]: (int(r[1]), r[2]) for r in rows}

    def vectors_for_hashes(self, hashes: Iterable[str]) -> dict[str, np.ndarray]:
        self.flush()
        wanted = list(set(hashes))
        rows = self.conn.execute(
            "SELECT DISTINCT ON (text_hash) text_hash, embedding FROM docent_chunks "
            "WHERE text_hash = ANY(%s)",
            (wanted,),
        )
        return {h: _vector(v) for h, v in rows}

    def delete_chunks(self, vector_ids: list[int]) -> None:
        if vector_ids:
            self.conn.execute(
                "DELETE FROM docent_chunks WHERE vector_id = ANY(%s)",
                ([int(i) for i in vector_ids],),
            )

    def insert_chunk(self, chunk: Chunk, vector: np.ndarray) -> int:
        """Buffered: the id is assigned when the buffer is written (callers do not use it)."""
        self._pending.append((chunk, np.asarray(vector, dtype=np.float32)))
        self._pending_docs.add(chunk.doc_id)
        return 0

    def update_metadata(self, vector_id: int, metadata: dict[str, Any]) -> None:
        self.conn.execute(
            # Called for an unchanged embedded text (title and section included), so the
            # lexical tokens are unchanged too: only metadata such as the page may have moved.
            "UPDATE docent_chunks SET metadata = %s, source = %s, collection = %s, "
            "section = %s WHERE vector_id = %s",
            (Jsonb(_no_nul(metadata)), *filter_columns(_no_nul(metadata)), vector_id),
        )

    def count_chunks(self) -> int:
        self.flush()
        row = self.conn.execute("SELECT count(*) FROM docent_chunks").fetchone()
        return int(row[0]) if row else 0


class _Flushing:
    """A transaction that writes the buffered chunks before it commits."""

    def __init__(self, db: PgDocStore) -> None:
        self.db = db
        self.tx = db.conn.transaction()

    def __enter__(self) -> _Flushing:
        self.tx.__enter__()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            try:
                self.db.flush()
            except BaseException as error:  # the COPY failed: roll back, and say why
                self.db.discard()
                self.tx.__exit__(type(error), error, error.__traceback__)
                raise
        else:
            self.db.discard()
        self.tx.__exit__(exc_type, exc, tb)


def ensure_schema(
    conn: psycopg.Connection, dim: int, vector_type: str, rebuild: bool = False
) -> bool:
    """Create the tables (first refresh) or check they fit the embedder and vector type.
    Returns False when they do not but ``rebuild`` may replace them (``recreate_chunks``)."""
    if tables_exist(conn):
        meta = read_meta(conn)
        built = (meta.get("dim"), meta.get("vector_type"))
        if built == (str(dim), vector_type):
            return True
        if rebuild:
            return False
        raise IndexMismatchError(
            f"the Postgres store holds {built[1]}({built[0]}) vectors but the settings ask "
            f"for {vector_type}({dim}): set DOCENT_PG_VECTOR_TYPE={built[1]} (or the embedder "
            "it was built with), or re-create it with `docent ingest --rebuild PATH...`"
        )
    pg.create_tables(conn, TABLES.format(vtype=vector_type, dim=int(dim)))
    _set_shape(conn, dim, vector_type)
    return True


def recreate_chunks(conn: psycopg.Connection, dim: int, vector_type: str) -> None:
    """For a rebuild with another vector size or type, inside its transaction. Readers on
    every replica wait on the table lock until it commits (they see no half-built store, but
    searches stall for the whole rebuild: do it when a pause is acceptable)."""
    conn.execute("DROP TABLE IF EXISTS docent_chunks, docent_lexemes")
    conn.execute(TABLES.format(vtype=vector_type, dim=int(dim)))
    _set_shape(conn, dim, vector_type)


def _set_shape(conn: psycopg.Connection, dim: int, vector_type: str) -> None:
    conn.execute(
        "INSERT INTO docent_meta (key, value) VALUES ('dim', %s), ('vector_type', %s) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (str(dim), vector_type),
    )


def update_lexeme_stats(conn: psycopg.Connection) -> None:
    """Recount lexeme document frequencies (inside the refresh's transaction)."""
    conn.execute("DELETE FROM docent_lexemes")
    conn.execute(
        "INSERT INTO docent_lexemes (lexeme, ndoc) "
        "SELECT word, ndoc FROM ts_stat('SELECT tsv FROM docent_chunks')"
    )
    conn.execute(
        "INSERT INTO docent_meta (key, value) "
        "SELECT 'lexical_docs', count(*)::text FROM docent_chunks UNION ALL "
        "SELECT 'lexical_avgdl', coalesce(avg(dl), 1)::text FROM docent_chunks "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
    )


def drop_vector_index(conn: psycopg.Connection) -> None:
    conn.execute("DROP INDEX IF EXISTS docent_chunks_hnsw")


def create_vector_index(conn: psycopg.Connection, vector_type: str) -> None:
    conn.execute(f"SET LOCAL maintenance_work_mem = '{BUILD_MEMORY}'")
    conn.execute(HNSW_INDEX.format(vtype=vector_type, m=HNSW_M, ef=HNSW_EF_CONSTRUCTION))


class RefreshLock:
    """``pg_try_advisory_lock`` on the refresh's connection: one refresh across all replicas;
    the server drops it with that connection if the process dies."""

    def __init__(self, conn: psycopg.Connection, url: str) -> None:
        self.conn = conn
        self.url = url

    def __enter__(self) -> RefreshLock:
        row = self.conn.execute("SELECT pg_try_advisory_lock(%s)", (pg.REFRESH_LOCK,)).fetchone()
        if not (row and row[0]):
            raise IndexBusyError(
                f"another refresh of the Postgres store {pg.redact(self.url)} is running "
                "(on this or another replica); wait for it to finish and run this again"
            )
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self.conn.closed:
            self.conn.execute("SELECT pg_advisory_unlock(%s)", (pg.REFRESH_LOCK,))


@dataclass
class PgKnowledgeStore:
    """A read handle on the Postgres store: what retrieval, raft and serving read.

    Unlike a FAISS version folder, it does not pin a snapshot between calls: each call reads
    the committed state, and ``version`` says which refresh that was when it was opened."""

    pool: pg.Pool
    version: str
    manifest: dict[str, Any]
    vector_type: str
    owns_pool: bool = False
    _counts: dict[Any, int] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, pool: pg.Pool, owns_pool: bool = False) -> PgKnowledgeStore:
        with pool.connection() as conn:
            meta = read_meta(conn)
        if "version" not in meta:
            raise EmptyIndexError(
                f"the Postgres store {pg.redact(pool.url)} holds no index yet: run "
                "`docent ingest PATH` with the same DOCENT_STORE first"
            )
        return cls(
            pool=pool,
            version=meta["version"],
            manifest=json.loads(meta.get("manifest", "{}")),
            vector_type=meta.get("vector_type", "vector"),
            owns_pool=owns_pool,
        )

    def __len__(self) -> int:
        return int(self.manifest.get("n_chunks", 0))

    def iter_chunks(self) -> Iterator[StoredChunk]:
        # A named (server-side) cursor streams, so a million chunks are not held in memory at
        # once; it lives inside a transaction.
        with (
            self.pool.connection() as conn,
            conn.transaction(),
            conn.cursor(name="docent_chunks_scan") as cur,
        ):
            cur.execute(f"SELECT {CHUNK_COLUMNS} FROM docent_chunks ORDER BY vector_id")
            for row in cur:
                yield stored_chunk(row)

    def get_chunks(self, vector_ids: list[int]) -> dict[int, StoredChunk]:
        with self.pool.connection() as conn:
            rows = conn.execute(
                f"SELECT {CHUNK_COLUMNS} FROM docent_chunks WHERE vector_id = ANY(%s)",
                ([int(i) for i in vector_ids],),
            )
            return {int(r[0]): stored_chunk(r) for r in rows}

    def count(self, key: Any, where: str, params: dict[str, Any]) -> int:
        """Chunks passing a filter (``where``: `` AND …`` conditions), counted once per
        version: a version does not change, and a filter's size decides how it is searched."""
        if key not in self._counts:
            if len(self._counts) > 256:
                self._counts.clear()
            with self.pool.connection() as conn:
                row = conn.execute(
                    f"SELECT count(*) FROM docent_chunks WHERE true{where}", params
                ).fetchone()
            self._counts[key] = int(row[0]) if row else 0
        return self._counts[key]

    def close(self) -> None:
        """Closes the pool only if this handle made it (a retriever shares one across
        versions)."""
        if self.owns_pool:
            self.pool.close()


def committed_version(conn: psycopg.Connection) -> str | None:
    """The committed refresh's version name, or None when nothing was ingested yet."""
    if not tables_exist(conn):
        return None
    row = conn.execute("SELECT value FROM docent_meta WHERE key = 'version'").fetchone()
    return row[0] if row else None


def live_version(url: str) -> str | None:
    with pg.connect(url) as conn:
        return committed_version(conn)
