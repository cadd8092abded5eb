"""Incremental refresh, locking, model changes and crash safety, on a real FAISS index and on
a real PostgreSQL + pgvector store (tests parametrized over ``STORES``)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from docent.errors import ConfigError, IndexBusyError, IndexMismatchError
from docent.settings import DocentSettings
from ingest import vector_index
from ingest.pipeline import refresh_index
from ingest.store import KnowledgeStore, current_version
from ingest.stores import live_version

from conftest import ROOT, STORES, settings_on, write_corpus

CORPUS = {
    "lighthouse.md": "# Lighthouse\n\n## Keeper\n\nThe keeper of the Varrow lighthouse is Ilse "
    "Montague.\n\n## Lamp\n\nThe lamp turns every 11 seconds and was installed in 1911.\n",
    "bakery.md": "# Bakery\n\n## Hours\n\nThe Cobble Lane bakery opens at 05:40 on weekdays."
    "\n\n## Bread\n\nIts rye loaf uses a starter called Old Bertram.\n",
    "ferry.md": "# Ferry\n\nThe Saltmarsh ferry crosses to Quarry Isle in 27 minutes and "
    "costs 3.20 EUR for adults.\n",
    "guide/orchard.md": "# Orchard\n\nThe orchard grows the Pellucid Gold apple, picked "
    "in the second week of October.\n",
}
MUSEUM = {"museum.md": "# Museum\n\nThe Tidewater museum is closed on Tuesdays."}


def _settings(tmp_path: Path, **kw) -> DocentSettings:
    return DocentSettings(workspace=tmp_path / "ws", **kw)


@pytest.fixture(params=STORES)
def settings(request, tmp_path) -> DocentSettings:
    return settings_on(request.param, request, workspace=tmp_path / "ws")


def _consistent(settings: DocentSettings):  # type: ignore[no-untyped-def]
    """Open the live version and check that its parts agree: docstore, FAISS and BM25; or,
    on Postgres, chunks, documents, the manifest and the lexeme statistics."""
    if settings.uses_postgres:
        return _consistent_pg(settings)
    store = KnowledgeStore.open(settings.workspace / "index")
    n = store.docstore.count_chunks()
    assert len(store) == n == len(store.lexical.ids) == store.manifest["n_chunks"]
    live = np.setdiff1d(vector_index.ids_of(store.vectors), store.tombstones)
    ids = sorted(c.vector_id for c in store.docstore.iter_chunks())
    assert sorted(store.lexical.ids.tolist()) == ids == sorted(live.tolist())
    return store


def _consistent_pg(settings: DocentSettings):  # type: ignore[no-untyped-def]
    import psycopg

    from ingest.stores import open_store

    with psycopg.connect(settings.store) as conn:
        n = conn.execute("SELECT count(*) FROM docent_chunks").fetchone()[0]
        per_doc = conn.execute("SELECT coalesce(sum(n_chunks), 0) FROM docent_documents")
        counted = conn.execute("SELECT value FROM docent_meta WHERE key = 'lexical_docs'")
        assert per_doc.fetchone()[0] == n == int(counted.fetchone()[0])
    store = open_store(settings)
    assert store.manifest["n_chunks"] == n == len(list(store.iter_chunks()))
    return store


def _top_sources(settings, query: str, embedder) -> list[str]:
    from retrieval import Retriever

    retriever = Retriever(settings, embedder=embedder)
    try:
        return [h.source for h in retriever.search(query, k=3)]
    finally:
        retriever.close()


def test_rerun_on_unchanged_tree_embeds_nothing(tmp_path, embedder, settings):
    corpus = write_corpus(tmp_path / "docs", CORPUS)
    first = refresh_index([corpus], settings, embedder=embedder)
    assert first.published and first.added == first.embedded == first.total_chunks > 0
    assert first.documents == 4 and first.version == "v000001"
    second = refresh_index([corpus], settings, embedder=embedder)
    assert not second.published and second.version == "v000001"
    assert second.embedded == 0 and second.unchanged == first.total_chunks
    assert second.added == second.updated == second.removed == 0
    _consistent(settings).close()


def test_add_edit_delete_reembeds_only_what_changed(tmp_path, embedder, settings):
    corpus = write_corpus(tmp_path / "docs", CORPUS)
    base = refresh_index([corpus], settings, embedder=embedder)

    write_corpus(corpus, MUSEUM)
    added = refresh_index([corpus], settings, embedder=embedder)
    assert added.added == added.embedded == 1
    assert added.unchanged == base.total_chunks and added.removed == 0

    text = (corpus / "bakery.md").read_text().replace("05:40", "06:15")
    (corpus / "bakery.md").write_text(text)
    edited = refresh_index([corpus], settings, embedder=embedder)
    assert edited.updated == 1 and edited.embedded == 1 and edited.added == 0
    store = _consistent(settings)
    texts = " ".join(c.text for c in store.iter_chunks())
    store.close()
    assert "06:15" in texts and "05:40" not in texts

    (corpus / "ferry.md").unlink()
    deleted = refresh_index([corpus], settings, embedder=embedder)
    assert deleted.removed == 1 and deleted.embedded == 0 and deleted.documents_removed == 1
    assert "ferry.md" not in _top_sources(
        settings, "How long does the Saltmarsh ferry take?", embedder
    )
    store = _consistent(settings)
    assert store.version == "v000004"
    store.close()
    if not settings.uses_postgres:
        versions = sorted(p.name for p in (settings.workspace / "index").glob("v*"))
        assert versions == ["v000003", "v000004"]  # keep_versions=2: older ones are collected


def test_refreshing_one_folder_keeps_documents_from_another(tmp_path, embedder, settings):
    a = write_corpus(tmp_path / "a", {"one.md": CORPUS["lighthouse.md"]})
    b = write_corpus(tmp_path / "b", {"two.md": CORPUS["bakery.md"]})
    refresh_index([a], settings, embedder=embedder)
    refresh_index([b], settings, embedder=embedder, collection="bakeries")
    (a / "one.md").unlink()
    refresh_index([b], settings, embedder=embedder, collection="bakeries")  # a untouched
    store = _consistent(settings)
    sources = {c.source: c.metadata["collection"] for c in store.iter_chunks()}
    store.close()
    assert sources == {"one.md": "default", "two.md": "bakeries"}


def test_changed_embedder_is_refused_and_rebuild_replaces(tmp_path, embedder, settings):
    corpus = write_corpus(tmp_path / "docs", CORPUS)
    refresh_index([corpus], settings, embedder=embedder)
    other = copy.copy(embedder)
    other.model_id = "example/other-embedder"
    with pytest.raises(IndexMismatchError, match="--rebuild"):
        refresh_index([corpus], settings, embedder=other)
    store = _consistent(settings)  # nothing lost
    assert store.version == "v000001" and store.manifest["embedder"] == embedder.model_id
    store.close()
    rebuilt = refresh_index([corpus], settings, embedder=other, rebuild=True)
    assert rebuilt.published and rebuilt.embedded == rebuilt.total_chunks
    store = _consistent(settings)
    assert store.manifest["embedder"] == "example/other-embedder"
    store.close()


def test_changed_chunk_size_rechunks(tmp_path, embedder):
    corpus = write_corpus(
        tmp_path / "docs",
        {
            "long.md": "# Long\n\n"
            + " ".join(
                f"Sentence number {i} mentions the harbour crane Gantry-{i}." for i in range(120)
            )
        },
    )
    first = refresh_index([corpus], _settings(tmp_path, chunk_size=192), embedder=embedder)
    second = refresh_index(
        [corpus], _settings(tmp_path, chunk_size=64, chunk_overlap=8), embedder=embedder
    )
    assert second.published and second.total_chunks > first.total_chunks
    store = KnowledgeStore.open(tmp_path / "ws" / "index")
    assert store.manifest["chunk_size"] == 64
    store.close()


def test_second_refresh_while_one_runs_is_refused(tmp_path, embedder, settings):
    """Another process (on Postgres: any replica) holds the refresh lock: the file lock, or
    the database's advisory lock."""
    corpus = write_corpus(tmp_path / "docs", CORPUS)
    index_dir = settings.workspace / "index"
    index_dir.mkdir(parents=True)
    if settings.uses_postgres:
        hold = f"""
        import time
        from docent import pg
        conn = pg.connect({settings.store!r})
        conn.execute("SELECT pg_advisory_lock(%s)", (pg.REFRESH_LOCK,))
        """
    else:
        hold = f"""
        import time
        from filelock import FileLock
        lock = FileLock({str(index_dir / ".lock")!r}); lock.acquire()
        """
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(hold) + "print('held', flush=True); time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(IndexBusyError, match="another refresh"):
            refresh_index([corpus], settings, embedder=embedder)
    finally:
        holder.kill()
        holder.wait()
    assert refresh_index([corpus], settings, embedder=embedder).published  # lock released


KILLER = """
import os, signal, sys
from pathlib import Path
from docent.settings import DocentSettings
from ingest import pg_store, pipeline, store, vector_index
from ingest.embedder import Embedder

point, corpus, workspace, url = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

if point == "embed":
    Embedder.encode = die
elif point == "write-index":
    vector_index.write_index = die
elif point == "rename":
    store.os.rename = die
elif point == "pointer":
    store.os.replace = die
elif point == "pg-write":  # in the middle of writing the new chunks
    pg_store.PgDocStore.flush = die
elif point == "pg-commit":  # everything written, the transaction not yet committed
    pg_store.update_lexeme_stats = die
pipeline.refresh_index([corpus], DocentSettings(workspace=workspace, store=url))
print("survived")
"""


@pytest.mark.parametrize(
    "store,point",
    [("embedded", p) for p in ("embed", "write-index", "rename", "pointer")]
    + [("postgres", p) for p in ("embed", "pg-write", "pg-commit")],
)
def test_sigkill_during_refresh_leaves_previous_index_intact(
    tmp_path, embedder, store, point, request
):
    """A refresh killed at any point leaves the previous version whole and live; the next
    refresh works (the lock died with the process: flock, or the server's session)."""
    corpus = write_corpus(tmp_path / "docs", CORPUS)
    settings = settings_on(store, request, workspace=tmp_path / "ws")
    refresh_index([corpus], settings, embedder=embedder)
    write_corpus(corpus, MUSEUM)
    (corpus / "ferry.md").unlink()

    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    proc = subprocess.run(
        [sys.executable, str(script), point, str(corpus), str(settings.workspace), settings.store],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == -9, proc.stderr[-2000:]

    live = _consistent(settings)  # the previous version, whole
    assert live.version == "v000001"
    sources = {c.source for c in live.iter_chunks()}
    live.close()
    assert "ferry.md" in sources and "museum.md" not in sources
    assert live_version(settings) == "v000001"

    retry = refresh_index([corpus], settings, embedder=embedder)  # the kill released the lock
    assert retry.published and retry.added == 1 and retry.removed == 1
    assert list((settings.workspace / "index").glob(".tmp-*")) == []
    _consistent(settings).close()


def test_reader_keeps_answering_during_refresh_and_switches_on_reload(tmp_path, embedder, settings):
    from retrieval import Retriever

    corpus = write_corpus(tmp_path / "docs", CORPUS)
    refresh_index([corpus], settings, embedder=embedder)
    retriever = Retriever(settings, embedder=embedder)
    before = retriever.version
    write_corpus(corpus, MUSEUM)
    refresh_index([corpus], settings, embedder=embedder)
    assert retriever.version == before  # still on the old version, still answering
    assert retriever.search("Who keeps the Varrow lighthouse?", k=1)[0].source == "lighthouse.md"
    assert retriever.reload() and retriever.version != before
    assert retriever.search("When is the Tidewater museum closed?", k=1)[0].source == "museum.md"
    assert not retriever.reload()
    retriever.close()


def test_missing_path_is_a_clear_error(tmp_path, embedder):
    with pytest.raises(ConfigError, match="no such file or folder"):
        refresh_index([tmp_path / "nope"], _settings(tmp_path), embedder=embedder)


@pytest.mark.parametrize(
    "index_type,limit,expected",
    [
        ("hnsw", 50_000, "hnsw"),
        ("ivf", 50_000, "ivf"),
        ("auto", 3, "ivf"),
        ("auto", 50_000, "flat"),
    ],
)
def test_index_type_by_flag_or_size_survives_removals(
    tmp_path, embedder, index_type, limit, expected
):
    corpus = write_corpus(tmp_path / "docs", CORPUS)
    settings = _settings(tmp_path, index_type=index_type, exact_search_limit=limit)
    assert refresh_index([corpus], settings, embedder=embedder).index_type == expected
    (corpus / "ferry.md").unlink()
    write_corpus(corpus, MUSEUM)
    report = refresh_index([corpus], settings, embedder=embedder)
    assert report.index_type == expected and report.removed == 1 and report.added == 1
    store = _consistent(settings)
    assert vector_index.index_kind(store.vectors) == expected
    store.close()
    top = _top_sources(settings, "When is the Tidewater museum closed?", embedder)
    assert top[0] == "museum.md" and "ferry.md" not in top


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MiB filesystem (tmpfs), so writes fail with ENOSPC as on a full disk."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.decode()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_during_refresh_keeps_the_old_index(tmp_path, small_disk, embedder):
    from docent.errors import DiskFullError

    corpus = write_corpus(tmp_path / "docs", CORPUS)
    settings = DocentSettings(workspace=small_disk / "ws")
    refresh_index([corpus], settings, embedder=embedder)
    write_corpus(corpus, MUSEUM)
    filler = small_disk / "filler"  # takes every byte left: the next version cannot be written
    with filler.open("wb", buffering=0) as out, pytest.raises(OSError):
        while True:
            out.write(b"\0" * 4096)
    with pytest.raises(DiskFullError, match="disk .* is full.*previous index is still in use"):
        refresh_index([corpus], settings, embedder=embedder)
    assert current_version(settings.workspace / "index").name == "v000001"
    assert list((settings.workspace / "index").glob(".tmp-*")) == []  # its space came back
    _consistent(settings).close()
    assert "museum.md" not in _top_sources(settings, "When is the museum closed?", embedder)

    filler.unlink()
    retry = refresh_index([corpus], settings, embedder=embedder)
    assert retry.published and retry.added == 1
    assert _top_sources(settings, "When is the museum closed?", embedder)[0] == "museum.md"


def test_postgres_vector_type_change_needs_a_rebuild(tmp_path, embedder, request):
    """halfvec is chosen before the first ingest; switching later is a --rebuild, which
    re-creates the vectors in one transaction (the old ones answer until it commits)."""
    from docent.errors import IndexMismatchError as Mismatch

    corpus = write_corpus(tmp_path / "docs", CORPUS)
    settings = settings_on("postgres", request, workspace=tmp_path / "ws")
    first = refresh_index([corpus], settings, embedder=embedder)
    half = settings.with_overrides(pg_vector_type="halfvec")
    with pytest.raises(Mismatch, match="DOCENT_PG_VECTOR_TYPE=vector"):
        refresh_index([corpus], half, embedder=embedder)
    assert live_version(settings) == "v000001"  # nothing lost
    rebuilt = refresh_index([corpus], half, embedder=embedder, rebuild=True)
    assert rebuilt.published and rebuilt.total_chunks == first.total_chunks
    assert rebuilt.index_type == "pgvector-hnsw-halfvec" and rebuilt.version == "v000002"
    store = _consistent(half)
    assert store.vector_type == "halfvec"
    store.close()
    assert _top_sources(half, "Who keeps the Varrow lighthouse?", embedder)[0] == "lighthouse.md"
