"""The versioned knowledge store on disk, published atomically.

Layout under ``<workspace>/index``::

    CURRENT            name of the live version, replaced with os.replace (atomic)
    v000003/           docstore.sqlite, vectors.faiss, lexical/, manifest.json
    v000002/           the previous version, kept for readers that opened it just before a swap
    .lock              held while a refresh runs

A refresh builds ``.tmp-v000004`` from a copy of the live docstore, fsyncs it, renames it to
``v000004`` and only then points ``CURRENT`` at it. A refresh killed at any moment therefore
leaves ``CURRENT`` on a complete, consistent version; leftovers are removed by the next one.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from filelock import FileLock, Timeout

from docent.errors import EmptyIndexError, IndexBusyError
from ingest import vector_index
from ingest.docstore import DocStore, StoredChunk
from ingest.lexical_index import LexicalIndex

CURRENT = "CURRENT"
DOCSTORE = "docstore.sqlite"
VECTORS = "vectors.faiss"
LEXICAL = "lexical"
MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"


def version_name(number: int) -> str:
    return f"v{number:06d}"


def current_version(index_dir: Path) -> Path | None:
    pointer = index_dir / CURRENT
    if not pointer.exists():
        return None
    folder = index_dir / pointer.read_text().strip()
    return folder if (folder / MANIFEST).exists() else None


def next_version_number(index_dir: Path) -> int:
    numbers = [int(p.name[1:]) for p in index_dir.glob("v[0-9]*") if p.name[1:].isdigit()]
    return max(numbers, default=0) + 1


@contextmanager
def refresh_lock(index_dir: Path):  # type: ignore[no-untyped-def]
    """Held for a whole refresh; the OS drops it if the process dies (flock)."""
    index_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(index_dir / ".lock"), timeout=0)
    try:
        lock.acquire()
    except Timeout as exc:
        raise IndexBusyError(
            f"another refresh of {index_dir} is running (lock {index_dir / '.lock'} is held); "
            "wait for it to finish and run this again"
        ) from exc
    try:
        yield
    finally:
        lock.release()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for root, _dirs, files in os.walk(folder):
        for name in files:
            _fsync_path(Path(root) / name)
        _fsync_path(Path(root))


def publish(index_dir: Path, staging: Path, number: int) -> Path:
    """Make the fully written ``staging`` folder the live version, atomically."""
    _fsync_tree(staging)
    final = index_dir / version_name(number)
    os.rename(staging, final)
    pointer_tmp = index_dir / f"{CURRENT}.tmp"
    with open(pointer_tmp, "w") as fh:
        fh.write(final.name)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(pointer_tmp, index_dir / CURRENT)
    _fsync_path(index_dir)
    return final


def collect_garbage(index_dir: Path, keep: int) -> None:
    """Drop staging leftovers of killed refreshes and versions older than the newest ``keep``.
    Call only under the refresh lock."""
    for leftover in index_dir.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    live = current_version(index_dir)
    versions = sorted(p for p in index_dir.glob("v[0-9]*") if p.is_dir())
    for old in versions[:-keep]:
        if old != live:
            shutil.rmtree(old, ignore_errors=True)


@dataclass
class KnowledgeStore:
    """One published version, opened read-only: what retrieval, raft and serving read."""

    folder: Path
    docstore: DocStore
    vectors: faiss.Index
    lexical: LexicalIndex
    manifest: dict[str, Any]

    @classmethod
    def open(cls, index_dir: Path) -> KnowledgeStore:
        folder = current_version(index_dir)
        if folder is None:
            raise EmptyIndexError(
                f"no index in {index_dir}: run `docent ingest PATH` first "
                "(e.g. `docent ingest examples/handbook`)"
            )
        return cls.open_version(folder)

    @classmethod
    def open_version(cls, folder: Path) -> KnowledgeStore:
        manifest = json.loads((folder / MANIFEST).read_text())
        return cls(
            folder=folder,
            docstore=DocStore(folder / DOCSTORE, readonly=True),
            vectors=vector_index.read_index(folder / VECTORS),
            lexical=LexicalIndex.load(folder / LEXICAL),
            manifest=manifest,
        )

    def __post_init__(self) -> None:
        # HNSW keeps removed chunks as tombstones: ids in FAISS that the docstore no longer has.
        self.tombstones = np.zeros(0, dtype=np.int64)
        if not vector_index.supports_removal(self.vectors):
            self.tombstones = np.setdiff1d(vector_index.ids_of(self.vectors), self.lexical.ids)
        self._filter_cache: dict[object, np.ndarray | None] = {}

    @property
    def version(self) -> str:
        return self.folder.name

    def __len__(self) -> int:
        return int(self.vectors.ntotal - len(self.tombstones))

    def iter_chunks(self) -> Iterator[StoredChunk]:
        return self.docstore.iter_chunks()

    def get_chunks(self, vector_ids: list[int]) -> dict[int, StoredChunk]:
        return self.docstore.get_chunks(vector_ids)

    def cached(self, key: object, compute: Callable[[], np.ndarray | None]) -> np.ndarray | None:
        """Per-version cache (e.g. the ids a filter allows): a version never changes."""
        if key not in self._filter_cache:
            if len(self._filter_cache) > 256:
                self._filter_cache.clear()
            self._filter_cache[key] = compute()
        return self._filter_cache[key]

    def close(self) -> None:
        self.docstore.close()
