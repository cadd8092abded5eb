"""Candidate chunks from each store, before fusion and rerank: the one place that knows how a
store searches. The embedded store asks FAISS and bm25s in the process; Postgres answers
dense (pgvector HNSW) and full-text (tsvector) candidates and their chunks in one statement,
so one search reads one snapshot even while a refresh commits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ingest import vector_index
from ingest.docstore import StoredChunk
from ingest.pg_store import CHUNK_COLUMNS, PgKnowledgeStore, stored_chunk
from ingest.store import KnowledgeStore
from retrieval.filters import Filters


@dataclass
class Candidates:
    """Best-first (id, score) lists per retriever, and the chunks of every id in them."""

    dense: list[tuple[int, float]] = field(default_factory=list)
    lexical: list[tuple[int, float]] = field(default_factory=list)
    chunks: dict[int, StoredChunk] = field(default_factory=dict)


def find(
    store: KnowledgeStore | PgKnowledgeStore,
    query: str,
    qvec: np.ndarray | None,
    pool: int,
    filters: Filters,
    lexical: bool,
) -> Candidates:
    """Up to ``pool`` dense candidates (when ``qvec`` is given) and ``pool`` lexical ones
    (when ``lexical``), both restricted by ``filters`` inside the search, so a selective
    filter still fills the pool."""
    if isinstance(store, PgKnowledgeStore):
        return _postgres(store, query, qvec, pool, filters, lexical)
    return _embedded(store, query, qvec, pool, filters, lexical)


def _pairs(scores: np.ndarray, ids: np.ndarray) -> list[tuple[int, float]]:
    return [(int(i), float(s)) for s, i in zip(scores, ids, strict=True)]


def _embedded(
    store: KnowledgeStore,
    query: str,
    qvec: np.ndarray | None,
    pool: int,
    flt: Filters,
    lexical: bool,
) -> Candidates:
    found = Candidates()
    allowed = store.cached(flt, lambda: flt.allowed_ids(store.docstore))
    if allowed is not None and len(allowed) == 0:
        return found
    if qvec is not None:
        scores, ids = vector_index.search(
            store.vectors, qvec, pool, allowed, excluded_ids=store.tombstones
        )
        found.dense = _pairs(scores, ids)
    if lexical:
        mask = None
        if allowed is not None:
            allowed_rows = allowed
            mask = store.cached(("bm25", flt), lambda: store.lexical.mask_for(allowed_rows))
        scores, ids = store.lexical.search(query, pool, mask=mask)
        found.lexical = _pairs(scores, ids)
    wanted = {i for i, _ in found.dense} | {i for i, _ in found.lexical}
    found.chunks = store.get_chunks(sorted(wanted))
    return found


def _filter_sql(flt: Filters, params: dict[str, Any], col: str = "") -> str:
    """`` AND …`` conditions for ``flt`` (``col``: a table alias and dot, e.g. ``c.``)."""
    where = []
    if flt.source:
        where.append(f"{col}source = ANY(%(f_source)s)")
        params["f_source"] = list(flt.source)
    if flt.collection:
        where.append(f"{col}collection = ANY(%(f_collection)s)")
        params["f_collection"] = list(flt.collection)
    if flt.section:
        where.append(f"strpos(lower({col}section), %(f_section)s) > 0")
        params["f_section"] = flt.section.lower()
    return "".join(f" AND {w}" for w in where)


def _postgres(
    store: PgKnowledgeStore,
    query: str,
    qvec: np.ndarray | None,
    pool: int,
    flt: Filters,
    lexical: bool,
) -> Candidates:
    params: dict[str, Any] = {"k": pool}
    where = _filter_sql(flt, params)
    ctes, sources, joins, scores = [], [], [], []
    if qvec is not None:
        params["q"] = np.asarray(qvec, dtype=np.float32).reshape(-1)
        vtype = store.vector_type
        # The filter sits in the scan: with hnsw.iterative_scan = relaxed_order (docent.pg)
        # the index keeps walking until k rows pass. Relaxed order: the rows are re-sorted.
        ctes.append(
            "dense AS MATERIALIZED (SELECT vector_id, "
            f"embedding <=> %(q)s::{vtype} AS distance FROM docent_chunks "
            f"WHERE true{where} ORDER BY embedding <=> %(q)s::{vtype} LIMIT %(k)s)"
        )
        sources.append("SELECT vector_id FROM dense")
        joins.append("LEFT JOIN dense d USING (vector_id)")
        scores.append("1 - d.distance")
    else:
        scores.append("NULL::float8")
    if lexical:
        params["t"] = query
        # BM25-like: a chunk scores the IDF of each query lexeme it contains (binary term
        # frequency), so a rare error code outweighs common words; the GIN index finds the
        # chunks holding each lexeme. ts_rank alone has no IDF.
        ctes.append(
            "terms AS MATERIALIZED (SELECT quote_literal(q.lexeme)::tsquery AS tq, "
            "ln(1 + (n.total - coalesce(s.ndoc, 0) + 0.5) / (coalesce(s.ndoc, 0) + 0.5)) AS idf "
            "FROM unnest(to_tsvector('english', %(t)s)) q "
            "LEFT JOIN docent_lexemes s ON s.lexeme = q.lexeme "
            "CROSS JOIN (SELECT value::float8 AS total FROM docent_meta "
            "WHERE key = 'lexical_docs') n)"
        )
        ctes.append(
            "lex AS MATERIALIZED (SELECT c.vector_id, sum(t.idf) AS score "
            "FROM terms t JOIN docent_chunks c ON c.tsv @@ t.tq "
            f"WHERE true{_filter_sql(flt, params, 'c.')} "
            "GROUP BY c.vector_id ORDER BY score DESC, c.vector_id LIMIT %(k)s)"
        )
        sources.append("SELECT vector_id FROM lex")
        joins.append("LEFT JOIN lex l USING (vector_id)")
        scores.append("l.score")
    else:
        scores.append("NULL::float8")
    if not ctes:
        return Candidates()
    columns = ", ".join(f"c.{col.strip()}" for col in CHUNK_COLUMNS.split(","))
    sql = (
        f"WITH {', '.join(ctes)}, ids AS ({' UNION '.join(sources)}) "
        f"SELECT {columns}, {', '.join(scores)} FROM ids "
        f"JOIN docent_chunks c USING (vector_id) {' '.join(joins)}"
    )
    found = Candidates()
    with store.pool.connection() as conn:
        rows = conn.execute(sql, params).fetchall()
    for row in rows:
        chunk = stored_chunk(row)
        found.chunks[chunk.vector_id] = chunk
        dense_score, lexical_score = row[-2], row[-1]
        if dense_score is not None:
            found.dense.append((chunk.vector_id, float(dense_score)))
        if lexical_score is not None:
            found.lexical.append((chunk.vector_id, float(lexical_score)))
    # Best first; ties by id, as the embedded store's FAISS and bm25s order them.
    found.dense.sort(key=lambda p: (-p[1], p[0]))
    found.lexical.sort(key=lambda p: (-p[1], p[0]))
    return found
