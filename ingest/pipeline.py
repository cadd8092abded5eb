"""``refresh_index``: incremental, crash-safe ingest of files into the knowledge store."""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from docent import pg
from docent.errors import ConfigError, DiskFullError, IndexMismatchError
from docent.progress import Progress, no_progress
from docent.settings import DocentSettings
from docent.workspace import Workspace
from ingest import pg_store, vector_index
from ingest import store as kstore
from ingest.chunking import Chunk, Chunker
from ingest.docstore import DocStore, StoredDocument
from ingest.embed_precision import LEGACY_PRECISION, slow_here
from ingest.embedder import Embedder
from ingest.lexical_index import LexicalIndex, lexical_text
from ingest.pg_store import PgDocStore
from ingest.readers import UnreadableFileError, is_supported, read_file

log = logging.getLogger(__name__)

IGNORE_FILE = ".docentignore"
# Bumped when readers or chunking change what they produce, so documents are re-chunked.
PIPELINE_VERSION = "1"


@dataclass
class RefreshReport:
    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    embedded: int = 0
    documents: int = 0
    documents_changed: int = 0
    documents_removed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    version: str | None = None
    published: bool = False
    total_chunks: int = 0
    index_type: str = ""
    seconds: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items()}


@dataclass
class _Source:
    doc_id: str
    path: Path
    source: str  # path relative to the root it was found under, as users name it
    fingerprint: str


def iter_sources(roots: list[Path]) -> Iterator[tuple[Path, Path]]:
    """(root, file) pairs of supported files, sorted, skipping hidden and ignored ones."""
    for root in roots:
        if root.is_file():
            yield root.parent, root
            continue
        patterns = _ignore_patterns(root)
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root).as_posix()
            if any(part.startswith(".") for part in Path(rel).parts):
                continue
            if any(
                fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(path.name, pat) for pat in patterns
            ):
                continue
            if path.is_file() and is_supported(path):
                yield root, path


def _ignore_patterns(root: Path) -> list[str]:
    ignore = root / IGNORE_FILE
    if not ignore.exists():
        return []
    lines = ignore.read_text(encoding="utf-8", errors="replace").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def _under(path: str, roots: list[Path]) -> bool:
    p = Path(path)
    return any(p == r or (r.is_dir() or not r.exists()) and p.is_relative_to(r) for r in roots)


class _Run:
    """One refresh: decide, embed, write a new version. State lives here, not in globals."""

    def __init__(
        self,
        settings: DocentSettings,
        embedder: Embedder,
        report: RefreshReport,
        progress: Progress,
    ) -> None:
        self.settings = settings
        if settings.embed_precision not in ("auto", embedder.precision):
            embedder = embedder.at_precision(settings.embed_precision)
        self.embedder = embedder
        self.report = report
        self.progress = progress
        self.chunker = Chunker(settings.chunk_size, settings.chunk_overlap, embedder.count_tokens)
        self.config_key = json.dumps(
            {
                "pipeline": PIPELINE_VERSION,
                "embedder": embedder.model_id,
                "chunk_size": settings.chunk_size,
                "chunk_overlap": settings.chunk_overlap,
            },
            sort_keys=True,
        )

    def fingerprint(self, path: Path, collection: str) -> str:
        digest = hashlib.sha256(self.config_key.encode())
        digest.update(collection.encode())
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()


def _check_compatible(old: DocStore | PgDocStore, run: _Run, index_dir: object) -> None:
    """Refuse to mix embedders or explicit precisions in one index; with
    ``embed_precision=auto`` keep embedding at the precision the index was built at."""
    embedder = run.embedder
    built_with = old.get_meta("embedder")
    if built_with and built_with != embedder.model_id:
        raise IndexMismatchError(
            f"the index in {index_dir} was built with the embedder {built_with!r}, but the "
            f"settings ask for {embedder.model_id!r}. Either set DOCENT_EMBEDDER back to "
            f"{built_with!r}, or re-embed everything with `docent ingest --rebuild PATH...` "
            "(the current index stays live until the rebuild finishes)"
        )
    if not built_with:
        return  # an empty store: nothing embedded yet
    built_at = old.get_meta("embed_precision") or LEGACY_PRECISION
    if built_at == embedder.precision:
        return
    if run.settings.embed_precision == "auto":
        run.embedder = embedder.at_precision(built_at)
        if (why := slow_here(built_at, embedder.device)) is not None:
            log.warning(why)
        return
    raise IndexMismatchError(
        f"the index in {index_dir} was embedded at {built_at}, but the settings ask for "
        f"{run.settings.embed_precision}: vectors of two precisions do not mix. Either set "
        f"DOCENT_EMBED_PRECISION={built_at} (or auto), or re-embed everything with "
        "`docent ingest --rebuild PATH...` (the current index stays live until the rebuild "
        "finishes)"
    )


def refresh_index(
    paths: Sequence[Path | str],
    settings: DocentSettings,
    *,
    collection: str = "default",
    rebuild: bool = False,
    embedder: Embedder | None = None,
    progress: Progress = no_progress,
) -> RefreshReport:
    """Bring the knowledge store in line with the files under ``paths``.

    New or changed chunks are embedded; chunks of changed or deleted documents (under these
    paths) are removed; unchanged ones are kept as they are. Nothing is published when nothing
    changed. Files that cannot be read are skipped and reported; if they were indexed before,
    their previous chunks stay (except with ``rebuild``, which starts from an empty store).
    """
    started = time.perf_counter()
    roots = [Path(p).expanduser().resolve() for p in paths]
    missing = [str(p) for p in roots if not p.exists()]
    if missing:
        raise ConfigError(f"no such file or folder: {', '.join(missing)}")
    if not collection or not collection.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"collection {collection!r} must be letters, digits, '-' or '_'")
    workspace = Workspace(settings.workspace).ensure()
    index_dir = workspace.index_dir
    embedder = embedder or Embedder.from_settings(settings)
    report = RefreshReport()
    run = _Run(settings, embedder, report, progress)
    if settings.chunk_size > embedder.max_tokens - 2:
        log.warning(
            "chunk_size %d is above the embedder's %d-token window: chunk tails will "
            "not be embedded",
            settings.chunk_size,
            embedder.max_tokens,
        )

    if settings.uses_postgres:
        _refresh_postgres(run, roots, collection, rebuild)
        report.seconds = time.perf_counter() - started
        return report

    with kstore.refresh_lock(index_dir):
        kstore.collect_garbage(index_dir, settings.keep_versions)
        live = None if rebuild else kstore.current_version(index_dir)
        number = kstore.next_version_number(index_dir)
        staging = index_dir / f"{kstore.TMP_PREFIX}{kstore.version_name(number)}"
        staging.mkdir(parents=True)
        try:
            final = _build_version(run, index_dir, staging, live, number, roots, collection)
        except BaseException as exc:
            # The half-written version goes at once: on a full disk it holds the space a
            # retry needs. The published version was never touched.
            shutil.rmtree(staging, ignore_errors=True)
            if disk_full(exc):
                raise DiskFullError(
                    f"the disk under {index_dir} is full ({exc}); the previous index is still "
                    "in use, unchanged (nothing stored was lost): free some space and run the "
                    "refresh again"
                ) from exc
            raise
        if final is None:  # nothing changed: the live version stays
            kstore.collect_garbage(index_dir, settings.keep_versions)
            report.version = live.name if live else ""
            report.seconds = time.perf_counter() - started
            return report
        kstore.collect_garbage(index_dir, settings.keep_versions)
    report.version = final.name
    report.published = True
    report.seconds = time.perf_counter() - started
    log.info("published %s: %s", final.name, report.as_dict())
    return report


def _refresh_postgres(run: _Run, roots: list[Path], collection: str, rebuild: bool) -> None:
    """The same refresh on the Postgres store: one transaction under an advisory lock, so
    readers on every replica see all of it or none, and a second refresh gets IndexBusyError.
    A process killed mid-way loses its connection: the server rolls back and unlocks."""
    settings, report = run.settings, run.report
    vtype = settings.pg_vector_type
    conn = pg.connect(settings.store, settings.pg_ef_search)
    try:
        with pg_store.RefreshLock(conn, settings.store):
            with conn.transaction():
                fits = pg_store.ensure_schema(conn, run.embedder.dim, vtype, rebuild)
            db = PgDocStore(conn)
            meta = pg_store.read_meta(conn)
            if not rebuild:
                _check_compatible(db, run, pg.redact(settings.store))
            with db.transaction():
                # Loading into an indexed table is several times slower than building the
                # HNSW graph once after the load. Only into an empty table, though: dropping
                # the index locks the table, which would stall the readers of a live store
                # (a rebuild of one keeps the index and updates it row by row instead).
                if not fits:  # a rebuild to another vector size or type
                    pg_store.recreate_chunks(conn, run.embedder.dim, vtype)
                first = db.count_chunks() == 0
                if rebuild:
                    db.delete_all()
                if first:
                    pg_store.drop_vector_index(conn)
                changed = _apply(run, db, roots, collection)
                if first:
                    run.progress("index", 0, 1)
                    pg_store.create_vector_index(conn, vtype)
                    run.progress("index", 1, 1)
                report.total_chunks = db.count_chunks()
                report.documents = len(db.documents())
                report.index_type = f"pgvector-hnsw-{vtype}"
                if not (changed or rebuild) and "version" in meta:
                    report.version = meta["version"]
                    return
                pg_store.update_lexeme_stats(conn)
                number = int(meta.get("version", "v0")[1:] or 0) + 1
                report.version = kstore.version_name(number)
                manifest = _manifest(run, db, report.version, report.index_type)
                db.set_meta("version", report.version)
                db.set_meta("manifest", json.dumps(manifest))
            report.published = True
    finally:
        conn.close()


def _manifest(run: _Run, db: DocStore | PgDocStore, version: str, kind: str) -> dict[str, object]:
    docs = db.documents()
    return {
        "version": version,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "embedder": run.embedder.model_id,
        "embed_precision": run.embedder.precision,
        "dim": run.embedder.dim,
        "chunk_size": run.settings.chunk_size,
        "chunk_overlap": run.settings.chunk_overlap,
        "index_type": kind,
        "n_documents": len(docs),
        "n_chunks": db.count_chunks(),
        "collections": sorted({d.collection for d in docs.values()}),
        "pipeline_version": PIPELINE_VERSION,
    }


def _build_version(
    run: _Run,
    index_dir: Path,
    staging: Path,
    live: Path | None,
    number: int,
    roots: list[Path],
    collection: str,
) -> Path | None:
    """Write the next version in ``staging`` and publish it; None when nothing changed."""
    report = run.report
    if live is not None:
        old = DocStore(live / kstore.DOCSTORE, readonly=True)
        try:
            _check_compatible(old, run, index_dir)
            db = old.copy_to(staging / kstore.DOCSTORE)
        finally:
            old.close()
    else:
        db = DocStore(staging / kstore.DOCSTORE)
    try:
        changed = _apply(run, db, roots, collection)
        if not changed and live is not None:
            report.total_chunks = db.count_chunks()
            report.documents = len(db.documents())
            report.index_type = json.loads((live / kstore.MANIFEST).read_text())["index_type"]
            return None
        _write_indexes(run, db, staging, live, number)
    finally:
        db.close()
    return kstore.publish(index_dir, staging, number)


def disk_full(exc: BaseException) -> bool:
    """Whether a write failed for lack of space, however the library reports it: OSError
    (Python), "database or disk is full" (SQLite), a RuntimeError naming errno's text (FAISS)."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    text = str(exc).lower()
    return any(s in text for s in ("disk is full", "no space left", "file too large"))


def _apply(run: _Run, db: DocStore | PgDocStore, roots: list[Path], collection: str) -> bool:
    """Update the docstore copy in one transaction. Returns whether anything changed."""
    report = run.report
    known = db.documents()
    seen: set[str] = set()
    pending: list[tuple[_Source, list[Chunk], str | None]] = []
    sources = list(iter_sources(roots))
    for n, (root, path) in enumerate(sources, start=1):
        run.progress("read", n - 1, len(sources))
        doc_id = str(path)
        seen.add(doc_id)
        src = _Source(doc_id, path, path.relative_to(root).as_posix(), "")
        try:
            size_mb = path.stat().st_size / 1e6
            if size_mb > run.settings.max_file_mb:
                raise UnreadableFileError(
                    f"{size_mb:.4g} MB is over max_file_mb={run.settings.max_file_mb:g} "
                    "(raise DOCENT_MAX_FILE_MB to include it)"
                )
            src.fingerprint = run.fingerprint(path, collection)
            previous = known.get(doc_id)
            if previous is not None and previous.fingerprint == src.fingerprint:
                report.unchanged += previous.n_chunks
                continue
            docs = read_file(path)
        except (UnreadableFileError, OSError) as exc:
            kept = " (its previous chunks are kept)" if doc_id in known else ""
            report.skipped.append((src.source, f"{exc}{kept}"))
            continue
        base = {"source": src.source, "path": str(path), "collection": collection}
        chunks = run.chunker.chunk(doc_id, docs, base)
        title = docs[0].metadata.get("title") if docs else None
        pending.append((src, chunks, title))
    run.progress("read", len(sources), len(sources))

    removed_docs = [d for d in known if d not in seen and _under(known[d].path, roots)]
    if not pending and not removed_docs:
        return False

    vectors = _vectors_for(run, db, [c for _, chunks, _ in pending for c in chunks])
    now = datetime.now(UTC).isoformat(timespec="seconds")
    with db.transaction():  # one transaction: the copy is all-old or all-new
        for doc_id in removed_docs:
            report.removed += len(db.delete_document(doc_id))
            report.documents_removed += 1
        for src, chunks, title in pending:
            old = db.chunk_hashes(src.doc_id)
            new_idx = {c.idx for c in chunks}
            gone = [vector_id for idx, (vector_id, _) in old.items() if idx not in new_idx]
            report.removed += len(gone)
            db.delete_chunks(gone)
            document = StoredDocument(
                src.doc_id,
                str(src.path),
                src.source,
                collection,
                src.fingerprint,
                title,
                len(chunks),
            )
            db.upsert_document(document, now)
            for chunk in chunks:
                before = old.get(chunk.idx)
                if before is not None and before[1] == chunk.text_hash:
                    # Unchanged chunk keeps its id (and so its FAISS entry and RAFT references).
                    db.update_metadata(before[0], chunk.metadata)
                    report.unchanged += 1
                    continue
                if before is None:
                    report.added += 1
                else:
                    db.delete_chunks([before[0]])
                    report.updated += 1
                db.insert_chunk(chunk, vectors[chunk.text_hash])
            report.documents_changed += 1
        db.set_meta("embedder", run.embedder.model_id)
        db.set_meta("embed_precision", run.embedder.precision)
        db.set_meta("dim", str(run.embedder.dim))
    return True


def _vectors_for(
    run: _Run, db: DocStore | PgDocStore, chunks: list[Chunk]
) -> dict[str, np.ndarray]:
    """Vectors by text hash: reused from the store where the same text was embedded before."""
    wanted = {c.text_hash: c.embed_text for c in chunks}
    vectors = db.vectors_for_hashes(wanted)
    # Sorted by length so each batch pads little (sentence-transformers sorts only within a call).
    todo = sorted(
        ((h, t) for h, t in wanted.items() if h not in vectors), key=lambda ht: len(ht[1])
    )
    batch = run.settings.embed_batch_size
    for start in range(0, len(todo), batch):
        run.progress("embed", start, len(todo))
        part = todo[start : start + batch]
        encoded = run.embedder.encode([t for _, t in part], batch_size=batch)
        vectors.update({h: v for (h, _), v in zip(part, encoded, strict=True)})
    run.progress("embed", len(todo), len(todo))
    run.report.embedded += len(todo)
    return vectors


def _write_indexes(run: _Run, db: DocStore, staging: Path, live: Path | None, number: int) -> None:
    """FAISS and BM25 for the new docstore, plus the manifest."""
    ids, vectors = db.all_vectors()
    kind = vector_index.choose_kind(
        run.settings.index_type, len(ids), run.settings.exact_search_limit
    )
    dim = run.embedder.dim
    index = _updated_index(live, kind, ids, vectors, dim)
    run.progress("index", 0, 1)
    vector_index.write_index(index, staging / kstore.VECTORS)
    texts, lex_ids = [], []
    for chunk in db.iter_chunks():
        texts.append(lexical_text(chunk.text, chunk.metadata))
        lex_ids.append(chunk.vector_id)
    LexicalIndex.build(texts, np.asarray(lex_ids, dtype=np.int64)).save(staging / kstore.LEXICAL)
    run.progress("index", 1, 1)
    manifest = _manifest(run, db, kstore.version_name(number), kind)
    (staging / kstore.MANIFEST).write_text(json.dumps(manifest, indent=2))
    run.report.total_chunks = int(len(ids))
    run.report.documents = int(manifest["n_documents"])  # type: ignore[call-overload]
    run.report.index_type = kind


def _updated_index(live: Path | None, kind: str, ids: np.ndarray, vectors: np.ndarray, dim: int):  # type: ignore[no-untyped-def]
    """The live FAISS index patched with the changes where its type allows it; otherwise
    (new type, first build, too many HNSW tombstones) a fresh build from the stored vectors."""
    if live is not None and len(ids):
        index = vector_index.read_index(live / kstore.VECTORS)
        if vector_index.index_kind(index) == kind and index.d == dim:
            old_ids = vector_index.ids_of(index)
            gone = np.setdiff1d(old_ids, ids)
            new = np.isin(ids, old_ids, invert=True)
            if vector_index.supports_removal(index):
                if len(gone):
                    index.remove_ids(gone.astype(np.int64))
            elif len(gone) > vector_index.HNSW_MAX_TOMBSTONES * (len(old_ids) + new.sum()):
                return vector_index.build_index(kind, vectors, ids, dim)
            if new.any():
                index.add_with_ids(vectors[new], ids[new])
            return index
    return vector_index.build_index(kind, vectors, ids, dim)
