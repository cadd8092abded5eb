"""The docstore: documents, chunks, content hashes and vectors in one SQLite file.

Vectors are kept beside the chunks so that an index of any FAISS type can be rebuilt without
re-embedding, and so that an unchanged chunk text anywhere in the store is never embedded
twice (vectors are looked up by the hash of the text the embedder saw).
``vector_id`` is an AUTOINCREMENT key: a FAISS id is never reused for another chunk.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ingest.chunking import Chunk

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    doc_id TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    source TEXT NOT NULL,
    collection TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    title TEXT,
    n_chunks INTEGER NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    vector_id INTEGER PRIMARY KEY AUTOINCREMENT,
    chunk_id TEXT NOT NULL UNIQUE,
    doc_id TEXT NOT NULL REFERENCES documents(doc_id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    text TEXT NOT NULL,
    text_hash TEXT NOT NULL,
    metadata TEXT NOT NULL,
    vector BLOB NOT NULL,
    -- Copies of metadata fields that filters select on, indexed so a filter is no table scan.
    source TEXT NOT NULL,
    collection TEXT NOT NULL,
    section TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_doc ON chunks(doc_id, idx);
CREATE INDEX IF NOT EXISTS chunks_hash ON chunks(text_hash);
CREATE INDEX IF NOT EXISTS chunks_source ON chunks(source);
CREATE INDEX IF NOT EXISTS chunks_collection ON chunks(collection);
"""


@dataclass(frozen=True)
class StoredChunk:
    vector_id: int
    chunk_id: str
    doc_id: str
    idx: int
    text: str
    text_hash: str
    metadata: dict[str, Any]

    @property
    def source(self) -> str:
        return str(self.metadata.get("source", ""))


@dataclass(frozen=True)
class StoredDocument:
    doc_id: str
    path: str
    source: str
    collection: str
    fingerprint: str
    title: str | None
    n_chunks: int


class DocStore:
    def __init__(self, path: Path, readonly: bool = False) -> None:
        self.path = path
        uri = f"file:{path}?mode=ro" if readonly else f"file:{path}"
        self.conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
        self.conn.execute("PRAGMA foreign_keys = ON")
        if not readonly:
            self.conn.executescript(SCHEMA)

    def close(self) -> None:
        self.conn.close()

    def transaction(self) -> sqlite3.Connection:
        """``with db.transaction():`` commits on success, rolls back on error."""
        return self.conn

    def copy_to(self, target: Path) -> DocStore:
        """A consistent copy (SQLite online backup) to modify while this one stays untouched."""
        dest = sqlite3.connect(str(target))
        with dest:
            self.conn.backup(dest)
        dest.close()
        return DocStore(target)

    # meta
    def get_meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    # documents
    def documents(self) -> dict[str, StoredDocument]:
        rows = self.conn.execute(
            "SELECT doc_id, path, source, collection, fingerprint, title, n_chunks FROM documents"
        )
        return {r[0]: StoredDocument(*r) for r in rows}

    def upsert_document(self, doc: StoredDocument, updated_at: str) -> None:
        # A true upsert: INSERT OR REPLACE would delete the row and cascade to its chunks.
        self.conn.execute(
            "INSERT INTO documents(doc_id, path, source, collection, fingerprint, "
            "title, n_chunks, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(doc_id) DO UPDATE SET path=excluded.path, source=excluded.source, "
            "collection=excluded.collection, fingerprint=excluded.fingerprint, "
            "title=excluded.title, n_chunks=excluded.n_chunks, updated_at=excluded.updated_at",
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
        """Removes a document and its chunks; returns the vector ids that went away."""
        ids = [
            r[0]
            for r in self.conn.execute("SELECT vector_id FROM chunks WHERE doc_id = ?", (doc_id,))
        ]
        self.conn.execute("DELETE FROM chunks WHERE doc_id = ?", (doc_id,))
        self.conn.execute("DELETE FROM documents WHERE doc_id = ?", (doc_id,))
        return ids

    # chunks
    def chunk_hashes(self, doc_id: str) -> dict[int, tuple[int, str]]:
        """idx -> (vector_id, text_hash) for one document."""
        rows = self.conn.execute(
            "SELECT idx, vector_id, text_hash FROM chunks WHERE doc_id = ?", (doc_id,)
        )
        return {r[0]: (r[1], r[2]) for r in rows}

    def vectors_for_hashes(self, hashes: Iterable[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        wanted = list(set(hashes))
        for start in range(0, len(wanted), 500):
            part = wanted[start : start + 500]
            marks = ",".join("?" * len(part))
            for h, blob in self.conn.execute(
                f"SELECT text_hash, vector FROM chunks WHERE text_hash IN ({marks})", part
            ):
                found[h] = np.frombuffer(blob, dtype=np.float32)
        return found

    def delete_chunks(self, vector_ids: list[int]) -> None:
        self.conn.executemany("DELETE FROM chunks WHERE vector_id = ?", [(i,) for i in vector_ids])

    def insert_chunk(self, chunk: Chunk, vector: np.ndarray) -> int:
        cur = self.conn.execute(
            "INSERT INTO chunks(chunk_id, doc_id, idx, text, text_hash, metadata, vector, "
            "source, collection, section) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                chunk.chunk_id,
                chunk.doc_id,
                chunk.idx,
                chunk.text,
                chunk.text_hash,
                json.dumps(chunk.metadata, ensure_ascii=False),
                np.asarray(vector, dtype=np.float32).tobytes(),
                *filter_columns(chunk.metadata),
            ),
        )
        return int(cur.lastrowid or 0)

    def update_metadata(self, vector_id: int, metadata: dict[str, Any]) -> None:
        """Same text, same vector, same id: only metadata such as the page may have moved."""
        self.conn.execute(
            "UPDATE chunks SET metadata = ?, source = ?, collection = ?, section = ? "
            "WHERE vector_id = ?",
            (json.dumps(metadata, ensure_ascii=False), *filter_columns(metadata), vector_id),
        )

    def count_chunks(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM chunks").fetchone()[0])

    def all_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        ids, vecs = [], []
        for vid, blob in self.conn.execute(
            "SELECT vector_id, vector FROM chunks ORDER BY vector_id"
        ):
            ids.append(vid)
            vecs.append(np.frombuffer(blob, dtype=np.float32))
        if not ids:
            return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
        return np.asarray(ids, dtype=np.int64), np.vstack(vecs)

    def iter_chunks(self) -> Iterator[StoredChunk]:
        rows = self.conn.execute(
            "SELECT vector_id, chunk_id, doc_id, idx, text, text_hash, metadata FROM chunks "
            "ORDER BY vector_id"
        )
        for r in rows:
            yield StoredChunk(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]))

    def get_chunks(self, vector_ids: list[int]) -> dict[int, StoredChunk]:
        out: dict[int, StoredChunk] = {}
        for start in range(0, len(vector_ids), 500):
            part = [int(i) for i in vector_ids[start : start + 500]]
            marks = ",".join("?" * len(part))
            rows = self.conn.execute(
                "SELECT vector_id, chunk_id, doc_id, idx, text, text_hash, metadata FROM chunks "
                f"WHERE vector_id IN ({marks})",
                part,
            )
            for r in rows:
                out[r[0]] = StoredChunk(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]))
        return out


def filter_columns(metadata: dict[str, Any]) -> tuple[str, str, str]:
    return (
        str(metadata.get("source", "")),
        str(metadata.get("collection", "default")),
        str(metadata.get("section") or ""),
    )
