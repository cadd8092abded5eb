"""Everything a running server holds: settings, engine, retriever, stores, jobs. Built once in
the app's lifespan and reached from handlers as ``request.app.state.docent``."""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from docent.engine import Engine
from docent.errors import DocentError, EmptyIndexError
from docent.progress import Progress
from docent.settings import DocentSettings
from docent.workspace import Workspace
from ingest.embedder import Embedder
from ingest.store import current_version
from raft.merge import serving_engine
from retrieval import Retriever
from serving.adapters import AdapterCatalog
from serving.jobs import JobManager
from serving.metrics import Metrics
from serving.rag import RagService
from serving.store import ServingStore

log = logging.getLogger(__name__)
INDEX_POLL_S = 2.0  # how often the server looks for an index published by `docent ingest`


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
    started_in: Path = field(default_factory=Path.cwd)  # the default refresh root
    reload_lock: threading.Lock = field(default_factory=threading.Lock)

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
        adapters = AdapterCatalog(settings, engine)
        loaded = adapters.warm()
        log.info("engine %s (%s), adapters: %s", engine.model, engine.kind, loaded or "none")
        metrics.watch_engine(engine.queue_depth)
        rag = RagService(settings, _open_retriever(settings, embedder), engine, adapters, metrics)
        return cls(
            settings=settings,
            engine=engine,
            embedder=embedder,
            metrics=metrics,
            store=ServingStore(folder),
            jobs=JobManager(folder / "jobs", metrics),
            adapters=adapters,
            rag=rag,
            owns_engine=owns_engine,
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
            newest = current_version(self.index_dir)
            if newest is None or newest.name == retriever.version:
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
            except DocentError as exc:
                log.warning("index reload failed, still on the old version: %s", exc)

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
        import json

        rows = self.store.corrections_as_qa()
        if not rows:
            return None
        path = Workspace(self.settings.workspace).root / "feedback" / "corrections.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(path)
        return path

    def close(self) -> None:
        self.jobs.shutdown()
        if self.rag.retriever is not None:
            self.rag.retriever.close()
        self.store.close()
        if self.owns_engine:
            self.engine.close()


def _open_retriever(settings: DocentSettings, embedder: Embedder) -> Retriever | None:
    try:
        return Retriever(settings, embedder=embedder)
    except EmptyIndexError:
        log.warning("no index yet: questions get 503 until POST /v1/index/refresh runs")
        return None
