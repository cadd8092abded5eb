"""Everything a running server holds: settings, engine, retriever, stores, jobs. Built once in
the app's lifespan and reached from handlers as ``request.app.state.docent``."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import PoolTimeout

from docent import pg
from docent.engine import Engine, build_engine
from docent.engine.factory import resolve_engine_kind
from docent.engine.routed import RoutedEngine
from docent.errors import DocentError, EmptyIndexError
from docent.progress import Progress
from docent.settings import DocentSettings
from docent.workspace import Workspace
from ingest.embedder import Embedder
from raft.adapters import AdapterInfo
from raft.merge import merged_weights, serving_engine
from raft.registry_store import open_registry
from retrieval import Retriever
from serving.adapters import BASE, PROMOTED, AdapterCatalog
from serving.jobs import JobManager, open_jobs
from serving.metrics import Metrics
from serving.rag import RagService
from serving.store import ServingStore, open_serving_store

log = logging.getLogger(__name__)
INDEX_POLL_S = 2.0  # how often the server looks for an index published by `docent ingest`
ADAPTER_POLL_S = 3.0  # how often it looks for a newly promoted (or rolled back) adapter
SWITCH_RETRY_S = 300.0  # the poll retries a failed switch to the same adapter after this


@dataclass(frozen=True)
class LiveAdapter:
    """The adapter default requests are answered with (None: the base model) and since when
    (``time.time()``). On a RoutedEngine it is the one its fast engine holds: ``switching``
    while a newly promoted one is loaded (its requests go to the slower engine meanwhile);
    ``error`` says why the last switch failed."""

    adapter: str | None
    since: float = field(default_factory=time.time)
    switching: bool = False
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter,
            "since": self.since,
            "switching": self.switching,
            "error": self.error,
        }


@dataclass
class ServingState:
    settings: DocentSettings
    engine: Engine
    embedder: Embedder
    metrics: Metrics
    store: ServingStore
    jobs: JobManager
    adapters: AdapterCatalog
    rag: RagService
    owns_engine: bool = True
    pool: pg.Pool | None = None  # the Postgres store's connections (store, jobs, promotion)
    started_in: Path = field(default_factory=Path.cwd)  # the default refresh root
    reload_lock: threading.Lock = field(default_factory=threading.Lock)
    live: LiveAdapter = field(default_factory=lambda: LiveAdapter(None))
    follow_lock: threading.Lock = field(default_factory=threading.Lock)
    _switch: threading.Thread | None = field(default=None, init=False, repr=False)
    _failed: tuple[str, float] | None = field(default=None, init=False, repr=False)

    @classmethod
    def build(
        cls,
        settings: DocentSettings,
        engine: Engine | None = None,
        embedder: Embedder | None = None,
        metrics: Metrics | None = None,
    ) -> ServingState:
        workspace = Workspace(settings.workspace).ensure()
        folder = workspace.root / "serving"
        metrics = metrics or Metrics()
        embedder = embedder or Embedder.from_settings(settings)
        owns_engine = engine is None
        engine = engine or serving_engine(settings, serving=True)
        # With a Postgres store, chat sessions, answers, feedback, jobs and the promoted
        # adapter's name live in the database, so any replica can answer any request.
        pool = pg.Pool(settings.store, settings.pg_ef_search) if settings.uses_postgres else None
        adapters = AdapterCatalog(settings, engine, open_registry(settings, pool))
        loaded = adapters.warm()
        log.info("engine %s (%s), adapters: %s", engine.model, engine.kind, loaded or "none")
        metrics.watch_engine(engine.queue_depth)
        metrics.watch_replicas(engine.replicas)
        rag = RagService(settings, _open_retriever(settings, embedder), engine, adapters, metrics)
        return cls(
            settings=settings,
            engine=engine,
            embedder=embedder,
            metrics=metrics,
            store=open_serving_store(settings, folder, pool),
            jobs=open_jobs(settings, folder / "jobs", metrics, pool),
            adapters=adapters,
            rag=rag,
            owns_engine=owns_engine,
            pool=pool,
            live=LiveAdapter(_served_default(engine, adapters)),
        )

    # The index -----------------------------------------------------------------------------
    @property
    def index_dir(self) -> Path:
        return Workspace(self.settings.workspace).index_dir

    def sync_index(self) -> bool:
        """Switch to the newest published index version, if there is a newer one. Queries in
        flight finish on the version they started with (the retriever swaps atomically)."""
        with self.reload_lock:
            retriever = self.rag.retriever
            if retriever is None:
                self.rag.retriever = _open_retriever(self.settings, self.embedder)
                return self.rag.retriever is not None
            newest = retriever.latest_version()
            if newest is None or newest == retriever.version:
                return False
            switched = retriever.reload()
            if switched:
                log.info("now answering from index %s", retriever.version)
            return switched

    async def watch_index(self) -> None:
        while True:
            await asyncio.sleep(INDEX_POLL_S)
            try:
                await asyncio.to_thread(self.sync_index)
            except (DocentError, psycopg.Error, PoolTimeout) as exc:  # e.g. Postgres restarting
                log.warning("index reload failed, still on the old version: %s", exc)

    # The promoted adapter ------------------------------------------------------------------
    def follow_promoted(self, wait: bool = False, retry_failed: bool = True) -> LiveAdapter:
        """Serve the adapter promoted now (by `docent adapters promote`, `docent train
        --promote`, the loop or a rollback) and say what is live. The catalog resolves the
        adapter per request, so most engines only need it recorded. A RoutedEngine (vLLM on a
        CPU, adapters merged) gets a vLLM engine over the new weights, built in a background
        thread while the old one answers, then swapped in; ``wait`` waits for that."""
        engine = self.engine
        if not (isinstance(engine, RoutedEngine) and self.settings.serve_adapter == PROMOTED):
            self._set_live(self.adapters.default_name())
            return self.live
        info = self.adapters.registry.promoted()
        wanted = info.name if info else None
        with self.follow_lock:
            switch = self._switch
            busy = switch is not None and switch.is_alive()
            if (
                not busy
                and wanted != engine.primary_adapter
                and (retry_failed or not self._failed_recently(wanted))
            ):
                switch = self._switch = threading.Thread(
                    target=self._switch_primary,
                    args=(engine, info),
                    daemon=True,
                    name="docent-adapter-switch",
                )
                self.live = replace(self.live, switching=True)
                switch.start()
        if not busy and wanted == engine.primary_adapter:
            self._set_live(wanted)  # clears the error of a switch rolled back since
        if wait and switch is not None:
            switch.join()
        return self.live

    async def watch_adapters(self) -> None:
        last_error = None
        while True:
            await asyncio.sleep(ADAPTER_POLL_S)
            try:
                await asyncio.to_thread(self.follow_promoted, retry_failed=False)
                last_error = None
            except (DocentError, OSError, ValueError, psycopg.Error, PoolTimeout) as exc:
                if str(exc) != last_error:  # once, not every few seconds
                    log.warning("cannot follow the promoted adapter: %s", exc)
                last_error = str(exc)

    def _switch_primary(self, engine: RoutedEngine, info: AdapterInfo | None) -> None:
        name = info.name if info else None
        log.info(
            "serving %s: building a vLLM engine over its weights; %s answers meanwhile",
            name or "the base model",
            engine.primary_adapter or "the base model",
        )
        try:
            if info is not None:
                self.adapters.registry.check_base(info, self.settings.generator)
            path = str(merged_weights(info, self.settings)) if info else None
            kind = resolve_engine_kind(self.settings)
            primary = build_engine(self.settings, kind, serving=True, model_path=path, lora=False)
        except Exception as exc:  # noqa: BLE001 - whatever failed, the old engine keeps serving
            with self.follow_lock:
                self._failed = (name or BASE, time.monotonic())
                self.live = replace(self.live, switching=False, error=str(exc))
            log.warning(
                "could not switch the fast engine to %s, it still answers with %s (requests for "
                "%s go to the slower transformers engine): %s. Fix the cause; the switch is "
                "retried in %.0f s, or roll back (POST /v1/adapters/rollback)",
                name or "the base model",
                engine.primary_adapter or "the base model",
                name or "the base model",
                exc,
                SWITCH_RETRY_S,
                exc_info=not isinstance(exc, DocentError),
            )
            return
        self._set_live(name)  # first: the swap returns only once the old engine is drained
        engine.swap_primary(primary, name)

    def _failed_recently(self, wanted: str | None) -> bool:
        failed = self._failed
        return (
            failed is not None
            and failed[0] == (wanted or BASE)
            and (time.monotonic() - failed[1] < SWITCH_RETRY_S)
        )

    def _set_live(self, name: str | None) -> None:
        with self.follow_lock:
            if name == self.live.adapter:
                self.live = replace(self.live, switching=False, error=None)
                return
            self._failed = None
            self.live = LiveAdapter(name)
        log.info("now serving %s", f"adapter {name}" if name else "the base model")

    # Jobs ----------------------------------------------------------------------------------
    def refresh_job(self, paths: list[Path], collection: str, rebuild: bool) -> Any:
        from ingest.pipeline import refresh_index

        def run(progress: Progress) -> dict[str, Any]:
            report = refresh_index(
                paths,
                self.settings,
                collection=collection,
                rebuild=rebuild,
                embedder=self.embedder,
                progress=progress,
            )
            self.sync_index()
            return report.as_dict()

        return run

    def regenerate_job(
        self, limit: int | None, qa_file: Path | None, include_feedback: bool, name: str | None
    ) -> Any:
        from raft.build import build_raft_set, latest_manifest

        def run(progress: Progress) -> dict[str, Any]:
            feedback_file = None
            if include_feedback:
                feedback_file = self.export_corrections()
            workspace = Workspace(self.settings.workspace)
            # After the first set, a regeneration is a refresh of the latest one: the same
            # parameters, only changed chunks sent to the teacher again.
            refresh = limit is None and qa_file is None and latest_manifest(workspace.raft_dir)
            report = build_raft_set(
                self.settings,
                limit=limit,
                name=name,
                refresh=bool(refresh),
                qa_file=qa_file,
                feedback_file=feedback_file,
                engine=self.engine,  # the served engine doubles as the teacher
                embedder=self.embedder,
                progress=progress,
            )
            return report.as_dict()

        return run

    def export_corrections(self) -> Path | None:
        path = Workspace(self.settings.workspace).root / "feedback" / "corrections.jsonl"
        return self.store.export_corrections(path)

    def close(self) -> None:
        self.jobs.shutdown()
        if self.rag.retriever is not None:
            self.rag.retriever.close()
        self.store.close()
        if self.pool is not None:
            self.pool.close()
        if self.owns_engine:
            self.engine.close()


def _served_default(engine: Engine, adapters: AdapterCatalog) -> str | None:
    if isinstance(engine, RoutedEngine):
        return engine.primary_adapter
    try:
        return adapters.default_name()
    except DocentError:
        return None


def _open_retriever(settings: DocentSettings, embedder: Embedder) -> Retriever | None:
    try:
        retriever = Retriever(settings, embedder=embedder)
    except EmptyIndexError:
        log.warning("no index yet: questions get 503 until POST /v1/index/refresh runs")
        return None
    # The first question would otherwise wait for the question path's one-time build.
    retriever.query_embedder().warm_questions()
    return retriever
