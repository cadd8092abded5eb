"""FAISS vector index behind ``IndexIDMap2``, so chunks can be added and removed by id.

Kinds: ``flat`` (exact inner product), ``hnsw`` (graph; cannot remove, so it is rebuilt from
the docstore's vectors when chunks go away) and ``ivf`` (clustered; trained on the vectors).
``auto`` is exact below ``exact_search_limit`` chunks and IVF above.
"""

from __future__ import annotations

import math
from pathlib import Path

import faiss
import numpy as np

HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128
IVF_MIN_TRAIN_PER_LIST = 39  # FAISS warns below this many training points per centroid


def choose_kind(requested: str, n_vectors: int, exact_limit: int) -> str:
    if requested != "auto":
        return requested
    return "flat" if n_vectors <= exact_limit else "ivf"


def build_index(kind: str, vectors: np.ndarray, ids: np.ndarray, dim: int) -> faiss.Index:
    """A new index of ``kind`` holding ``vectors`` under the int64 ``ids``."""
    if kind == "flat":
        inner: faiss.Index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        inner = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        inner.hnsw.efSearch = HNSW_EF_SEARCH
    elif kind == "ivf":
        nlist = max(
            1,
            min(
                int(4 * math.sqrt(max(len(vectors), 1))),
                len(vectors) // IVF_MIN_TRAIN_PER_LIST or 1,
            ),
        )
        quantizer = faiss.IndexFlatIP(dim)
        inner = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        if len(vectors):
            inner.train(vectors)
        inner.nprobe = max(1, min(nlist, 32))
    else:
        raise ValueError(f"unknown index type {kind!r}: use flat, hnsw, ivf or auto")
    index = faiss.IndexIDMap2(inner)
    if len(vectors):
        index.add_with_ids(vectors, ids.astype(np.int64))
    return index


def index_kind(index: faiss.Index) -> str:
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    if isinstance(inner, faiss.IndexHNSWFlat):
        return "hnsw"
    if isinstance(inner, faiss.IndexIVFFlat):
        return "ivf"
    return "flat"


def supports_removal(index: faiss.Index) -> bool:
    return index_kind(index) != "hnsw"


def search(
    index: faiss.Index, query: np.ndarray, k: int, allowed_ids: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Scores and ids of the ``k`` nearest vectors, optionally only among ``allowed_ids``."""
    if index.ntotal == 0 or k <= 0:
        return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.int64)
    k = min(k, index.ntotal)
    params = None
    kind = index_kind(index)
    selector = (
        faiss.IDSelectorBatch(allowed_ids.astype(np.int64)) if allowed_ids is not None else None
    )
    if kind == "hnsw":
        params = faiss.SearchParametersHNSW(efSearch=max(HNSW_EF_SEARCH, k))
    elif kind == "ivf":
        inner = faiss.downcast_index(index.index)
        params = faiss.SearchParametersIVF(nprobe=inner.nprobe)
    elif selector is not None:
        params = faiss.SearchParameters()
    if selector is not None and params is not None:
        params.sel = selector
    scores, ids = index.search(query.reshape(1, -1).astype(np.float32), k, params=params)
    keep = ids[0] >= 0
    return scores[0][keep], ids[0][keep]


def write_index(index: faiss.Index, path: Path) -> None:
    faiss.write_index(index, str(path))


def read_index(path: Path) -> faiss.Index:
    return faiss.read_index(str(path))
