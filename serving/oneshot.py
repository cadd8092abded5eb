"""``docent ask``: one retrieval-augmented answer in the terminal, through the same
``RagService`` the API uses (no server)."""

from __future__ import annotations

import asyncio

from docent.settings import DocentSettings
from ingest.embedder import Embedder
from raft.merge import serving_engine
from retrieval import Filters, Retriever
from serving.adapters import AdapterCatalog
from serving.metrics import Metrics
from serving.rag import Answer, RagService


def ask_once(
    settings: DocentSettings,
    question: str,
    *,
    k: int | None = None,
    filters: Filters | None = None,
    adapter: str | None = None,
) -> Answer:
    embedder = Embedder.from_settings(settings)
    retriever = Retriever(settings, embedder=embedder)  # fails clearly when there is no index
    engine = serving_engine(settings, serving=False)
    try:
        rag = RagService(settings, retriever, engine, AdapterCatalog(settings, engine), Metrics())
        return asyncio.run(rag.answer(question, k=k, filters=filters, adapter=adapter))
    finally:
        engine.close()
        retriever.close()
