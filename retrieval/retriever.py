"""The retriever: dense, lexical, hybrid (RRF or DBSF) and an optional cross-encoder rerank,
on the embedded store (FAISS + bm25s) or on Postgres (pgvector + full text) alike."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from docent import pg
from docent.errors import ConfigError, IndexMismatchError
from docent.settings import DocentSettings, SearchMode
from docent.workspace import Workspace
from ingest import pg_store
from ingest.docstore import StoredChunk
from ingest.embed_precision import LEGACY_PRECISION, slow_here
from ingest.embedder import Embedder
from ingest.store import current_version
from ingest.stores import AnyStore, open_store
from retrieval import candidates
from retrieval.filters import Filters
from retrieval.fusion import distribution_based_score_fusion, reciprocal_rank_fusion
from retrieval.rerank import CrossEncoderReranker

log = logging.getLogger(__name__)
MODES = ("hybrid", "dense", "bm25")


@dataclass
class Hit:
    chunk_id: str
    vector_id: int
    score: float
    text: str
    source: str
    title: str | None
    section: str | None
    page: int | None
    collection: str
    metadata: dict[str, Any] = field(default_factory=dict)
    # Per-stage scores, for debugging and eval: {"dense": 0.61, "bm25": 7.2, "rerank": 3.1}
    scores: dict[str, float] = field(default_factory=dict)

    def snippet(self, width: int = 200) -> str:
        flat = " ".join(self.text.split())
        return flat if len(flat) <= width else flat[: width - 1] + "…"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Retriever:
    """Reads one published version of the knowledge store; ``reload()`` switches to the newest."""

    def __init__(
        self,
        settings: DocentSettings,
        embedder: Embedder | None = None,
        reranker: CrossEncoderReranker | None = None,
    ) -> None:
        self.settings = settings
        self.index_dir = Workspace(settings.workspace).index_dir
        # One pool for every version this retriever opens (Postgres versions are not files).
        self._pg = (
            pg.Pool(settings.store, settings.pg_ef_search) if settings.uses_postgres else None
        )
        try:
            self.store: AnyStore = open_store(settings, self._pg)
        except BaseException:
            self.close_pool()
            raise
        # Queries in flight per store, and stores replaced by reload() that still have some:
        # a replaced store is closed when its last query ends, never under one.
        self._lock = threading.Lock()
        self._users: dict[int, int] = {}
        self._retired: dict[int, AnyStore] = {}
        self.embedder = embedder or Embedder.from_settings(settings)
        # FAISS's thread count is left alone on purpose: faiss and torch share one OpenMP
        # runtime, so faiss.omp_set_num_threads(1) also halved torch (embedding, training).
        self._check_embedder()  # also loads the index's precision now, not at the 1st query
        self.reranker = reranker
        if self.reranker is None and settings.reranker:
            self.reranker = CrossEncoderReranker(settings.reranker, settings.device)

    @classmethod
    def from_settings(cls, settings: DocentSettings) -> Retriever:
        return cls(settings)

    def _check_embedder(self) -> None:
        built = self.store.manifest.get("embedder")
        if built != self.embedder.model_id:
            raise IndexMismatchError(
                f"the index was built with the embedder {built!r}, but the settings ask for "
                f"{self.embedder.model_id!r}: run `docent ingest --rebuild PATH...` or set "
                f"DOCENT_EMBEDDER={built}"
            )
        built_at = self.query_embedder().precision
        if (why := slow_here(built_at, self.embedder.device)) is not None:
            log.warning(why)
        if self.settings.embed_precision not in ("auto", built_at):
            log.warning(
                "the index was embedded at %s but the settings ask for %s: queries follow the "
                "index (`docent ingest --rebuild PATH...` re-embeds it at the new precision)",
                built_at,
                self.settings.embed_precision,
            )

    def query_embedder(self, store: AnyStore | None = None) -> Embedder:
        """The embedder at the precision ``store`` (default: the current one) was built at:
        queries must be embedded the way its chunks were, whatever the settings now say."""
        manifest = (store or self.store).manifest
        if not manifest.get("embedder"):
            return self.embedder  # nothing indexed yet
        return self.embedder.at_precision(str(manifest.get("embed_precision") or LEGACY_PRECISION))

    @property
    def version(self) -> str:
        return self.store.version

    def latest_version(self) -> str | None:
        """The newest published version's name (None: none yet), read cheaply: serving polls
        it every few seconds to decide whether to ``reload()``."""
        if self._pg is not None:
            with self._pg.connection() as conn:
                return pg_store.committed_version(conn)
        folder = current_version(self.index_dir)
        return folder.name if folder else None

    def reload(self) -> bool:
        """Open the newest published version if it changed. Returns whether it switched."""
        fresh = open_store(self.settings, self._pg)
        if fresh.version == self.store.version:
            fresh.close()
            return False
        with self._lock:
            old, self.store = self.store, fresh  # readers see old or new, never a mix
            in_use = self._users.get(id(old), 0) > 0
            if in_use:
                self._retired[id(old)] = old
        self._check_embedder()
        if not in_use:
            old.close()
        return True

    @contextlib.contextmanager
    def _using(self) -> Iterator[AnyStore]:
        """The current store, kept open for the duration of one query."""
        with self._lock:
            store = self.store
            self._users[id(store)] = self._users.get(id(store), 0) + 1
        try:
            yield store
        finally:
            with self._lock:
                self._users[id(store)] -= 1
                done = self._users[id(store)] == 0
                if done:
                    del self._users[id(store)]
                retired = self._retired.pop(id(store), None) if done else None
            if retired is not None:
                retired.close()

    def search(
        self,
        query: str,
        k: int | None = None,
        mode: SearchMode | None = None,
        filters: Filters | None = None,
        rerank: bool | None = None,
    ) -> list[Hit]:
        """The ``k`` best chunks for ``query``, best first. On the embedded store a query
        started before a ``reload()`` finishes on the version it started with; on Postgres
        each search is one statement, so it reads one committed version, the newest."""
        with self._using() as store:
            return self._search(store, query, k, mode, filters, rerank)

    def _search(
        self,
        store: AnyStore,
        query: str,
        k: int | None,
        mode: SearchMode | None,
        filters: Filters | None,
        rerank: bool | None,
    ) -> list[Hit]:
        query = query.strip()
        if not query:
            raise ConfigError("the query is empty: ask a question")
        k = self.settings.top_k if k is None else k
        if k < 1:
            raise ConfigError(f"k must be at least 1, got {k}")
        mode = mode or self.settings.search_mode
        if mode not in MODES:
            raise ConfigError(f"unknown search mode {mode!r}: use one of {', '.join(MODES)}")
        flt = filters or Filters()
        use_rerank = self.reranker is not None if rerank is None else rerank
        if use_rerank and self.reranker is None:
            raise ConfigError("rerank asked for, but no reranker is configured (DOCENT_RERANKER)")
        pool = max(k, self.settings.candidate_pool) if (mode == "hybrid" or use_rerank) else k
        started = time.perf_counter()
        embedder = self.query_embedder(store)
        qvec = embedder.encode_query(query) if mode in ("dense", "hybrid") else None
        found = candidates.find(store, query, qvec, pool, flt, lexical=mode in ("bm25", "hybrid"))
        stage_scores: dict[int, dict[str, float]] = {}
        for key, scored in (("dense", found.dense), ("bm25", found.lexical)):
            for i, s in scored:
                stage_scores.setdefault(i, {})[key] = s
        if mode == "hybrid":
            fusion = self.settings.fusion
            if fusion == "rrf":
                rankings = [[i for i, _ in found.dense], [i for i, _ in found.lexical]]
                ranked = reciprocal_rank_fusion(rankings, self.settings.rrf_k)
            else:
                ranked = distribution_based_score_fusion([found.dense, found.lexical])
            for i, s in ranked:
                stage_scores[i][fusion] = s
        else:
            ranked = found.dense if mode == "dense" else found.lexical
        ranked = ranked[:pool]
        chunks = found.chunks
        hits = [self._hit(chunks[i], s, stage_scores[i]) for i, s in ranked if i in chunks]
        if use_rerank and self.reranker is not None:
            rerank_scores = self.reranker.scores(query, [h.text for h in hits])
            for hit, s in zip(hits, rerank_scores, strict=True):
                hit.scores["rerank"] = s
                hit.score = s
            hits.sort(key=lambda h: -h.score)
        log.debug(
            "search %r mode=%s took %.1f ms", query, mode, 1000 * (time.perf_counter() - started)
        )
        return hits[:k]

    @staticmethod
    def _hit(chunk: Any, score: float, scores: dict[str, float]) -> Hit:
        meta = chunk.metadata
        return Hit(
            chunk_id=chunk.chunk_id,
            vector_id=chunk.vector_id,
            score=float(score),
            text=chunk.text,
            source=str(meta.get("source", "")),
            title=meta.get("title"),
            section=meta.get("section"),
            page=meta.get("page"),
            collection=str(meta.get("collection", "default")),
            metadata=meta,
            scores=dict(scores),
        )

    def close(self) -> None:
        self.store.close()
        self.close_pool()

    def close_pool(self) -> None:
        if self._pg is not None:
            self._pg.close()

    def iter_chunks(self) -> Iterator[StoredChunk]:
        """Every chunk, in id order (eval and RAFT read the corpus): of the version in use
        on the embedded store, of the committed state on Postgres."""
        with self._using() as store:
            yield from store.iter_chunks()
