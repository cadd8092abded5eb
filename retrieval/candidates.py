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
from ingest.lexical_index import query_tokens
from ingest.pg_store import CHUNK_COLUMNS, PgKnowledgeStore, stored_chunk
from ingest.store import KnowledgeStore
from retrieval.filters import Filters

# bm25s's defaults, so both stores rank full-text matches alike.
BM25_K1 = 1.5
BM25_B = 0.75
# A lexeme in more chunks than this does not select rows unless it is the query's rarest (and
# then only this many); it still scores the rows others select. Common lexemes weigh little
# (low IDF), but selecting every row that holds one would read much of the table.
COMMON_TERM_ROWS = 2000
# A filter leaving at most this many chunks is searched exactly (each distance read from the
# heap: ~3 us a row on 2 cores, bench/store.py); larger ones walk the HNSW graph.
PG_EXACT_FILTER_LIMIT = 5000
# Rows per wanted candidate that the full-text search scores exactly (see _postgres).
SHORTLIST = 4


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
        # A filter sits in the scan: with hnsw.iterative_scan = relaxed_order (docent.pg)
        # the index keeps walking until k rows pass (relaxed order: rows are re-sorted). A
        # filter that leaves few chunks is searched exactly instead, as in the embedded store:
        # the graph walk finds those few poorly, and scoring them all is cheap. "+ 0" keeps
        # the planner off the HNSW index for that.
        exact = bool(where) and (store.count(flt, where, params) <= PG_EXACT_FILTER_LIMIT)
        order = f"(embedding <=> %(q)s::{vtype}){' + 0' if exact else ''}"
        ctes.append(
            "dense AS MATERIALIZED (SELECT vector_id, "
            f"embedding <=> %(q)s::{vtype} AS distance FROM docent_chunks "
            f"WHERE true{where} ORDER BY {order} LIMIT %(k)s)"
        )
        sources.append("SELECT vector_id FROM dense")
        joins.append("LEFT JOIN dense d USING (vector_id)")
        scores.append("1 - d.distance")
    else:
        scores.append("NULL::float8")
    if lexical:
        # BM25 as bm25s computes it (same tokens, IDF, k1, b), over a tsvector of bm25s's
        # tokens: document frequencies from the lexeme statistics each refresh keeps, term
        # frequency from the lexeme's positions, length from the token count. (Postgres's own
        # ts_rank has no IDF: "error" would weigh as much as "QF-1042".)
        # Only the rarer query lexemes select rows (each found through the GIN index): a very
        # common one alone would make every search read much of the table for a few points.
        params.update(k1=BM25_K1, b=BM25_B, common=COMMON_TERM_ROWS)
        ctes.append(
            "stats AS (SELECT max(value) FILTER (WHERE key = 'lexical_docs')::float8 AS n, "
            "max(value) FILTER (WHERE key = 'lexical_avgdl')::float8 AS avgdl "
            "FROM docent_meta WHERE key IN ('lexical_docs', 'lexical_avgdl'))"
        )
        # Parsed by the same to_tsvector as the chunks' tokens (it splits "max_file_mb" as
        # it split them); a lexeme no chunk holds cannot match, so it is left out.
        params["terms"] = " ".join(query_tokens(query))
        params["shortlist"] = SHORTLIST * pool
        ctes.append(
            "terms AS MATERIALIZED (SELECT lexeme, quote_literal(lexeme)::tsquery AS tq, "
            "times * ln(1 + (st.n - df + 0.5) / (df + 0.5)) AS idf, "
            "(df <= %(common)s OR rarity = 1) AS selects FROM ("
            "SELECT q.lexeme, cardinality(q.positions) AS times, s.ndoc AS df, "
            "row_number() OVER (ORDER BY s.ndoc, q.lexeme) AS rarity "
            "FROM unnest(to_tsvector('simple', %(terms)s)) q "
            "JOIN docent_lexemes s ON s.lexeme = q.lexeme) w, stats st)"
        )
        # Two steps, so the exact term frequencies (read from each row's tsvector) are
        # computed for a short list only: rows found by the selecting lexemes (at most
        # COMMON_TERM_ROWS each), ranked by BM25 with tf = 1, then the best scored in full.
        ctes.append(
            "found AS MATERIALIZED (SELECT m.vector_id, sum(t.idf) AS idf FROM terms t "
            "CROSS JOIN LATERAL (SELECT c.vector_id FROM docent_chunks c WHERE c.tsv @@ t.tq"
            f"{_filter_sql(flt, params, 'c.')} LIMIT %(common)s) m "
            "WHERE t.selects GROUP BY m.vector_id)"
        )
        ctes.append(
            "shortlist AS MATERIALIZED (SELECT c.vector_id, c.tsv, c.dl FROM found f "
            "JOIN docent_chunks c USING (vector_id), stats st "
            "ORDER BY f.idf / (1 + %(k1)s * (1 - %(b)s + %(b)s * c.dl / st.avgdl)) DESC, "
            "c.vector_id LIMIT %(shortlist)s)"
        )
        ctes.append(
            "lex AS MATERIALIZED (SELECT l.vector_id, sum(t.idf * f.tf / "
            "(f.tf + %(k1)s * (1 - %(b)s + %(b)s * l.dl / st.avgdl))) AS score "
            "FROM shortlist l JOIN terms t ON l.tsv @@ t.tq "
            "CROSS JOIN LATERAL (SELECT cardinality(u.positions)::float8 AS tf "
            "FROM unnest(l.tsv) u WHERE u.lexeme = t.lexeme) f, stats st "
            "GROUP BY l.vector_id ORDER BY score DESC, l.vector_id LIMIT %(k)s)"
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
