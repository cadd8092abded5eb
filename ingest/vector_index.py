"""FAISS vector index behind ``IndexIDMap2``, so chunks can be added and removed by id.

Kinds: ``flat`` (exact inner product), ``hnsw`` (graph; cannot remove, so it is rebuilt from
the docstore's vectors when chunks go away) and ``ivf`` (clustered; trained on the vectors).
``auto`` is exact below ``exact_search_limit`` chunks and IVF above.

Filters must not shrink top-k: approximate indexes with a selector return few hits when the
filter is selective (HNSW's graph walk and IVF's probed lists rarely reach the allowed ids), so a
filtered search on them is made exact: IVF probes every list, HNSW scores the allowed vectors
directly when there are at most ``EXACT_FILTER_LIMIT`` of them.

HNSW cannot remove vectors. Removed chunks stay in the graph as tombstones (ids the docstore no
longer has) and are excluded at search time; the index is rebuilt once they pass
``HNSW_MAX_TOMBSTONES`` of it.
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
IVF_PROBE_FRACTION = 10  # probe 1/10 of the lists: recall@10 ~0.95 at 200k (bench/search.py)
EXACT_FILTER_LIMIT = 50_000
HNSW_MAX_TOMBSTONES = 0.2


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
        inner.nprobe = max(1, min(nlist, max(16, nlist // IVF_PROBE_FRACTION)))
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


def ids_of(index: faiss.Index) -> np.ndarray:
    """The external ids an ``IndexIDMap2`` holds."""
    return faiss.vector_to_array(index.id_map).astype(np.int64)


def search(
    index: faiss.Index,
    query: np.ndarray,
    k: int,
    allowed_ids: np.ndarray | None = None,
    excluded_ids: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Scores and ids of the ``k`` nearest vectors, best first.

    ``allowed_ids``: only these may be returned (a filter); ``excluded_ids``: never these
    (HNSW tombstones). Allowed ids are assumed not to include excluded ones.
    """
    if index.ntotal == 0 or k <= 0 or (allowed_ids is not None and len(allowed_ids) == 0):
        return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.int64)
    query = query.reshape(1, -1).astype(np.float32)
    kind = index_kind(index)
    if kind == "hnsw" and allowed_ids is not None and len(allowed_ids) <= EXACT_FILTER_LIMIT:
        return _exact_among(index, query, k, allowed_ids)
    selector = None
    if allowed_ids is not None:
        selector = faiss.IDSelectorBatch(allowed_ids.astype(np.int64))
    elif excluded_ids is not None and len(excluded_ids):
        selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(excluded_ids.astype(np.int64)))
    if kind == "hnsw":
        params = faiss.SearchParametersHNSW(efSearch=max(HNSW_EF_SEARCH, k))
    elif kind == "ivf":
        inner = faiss.downcast_index(index.index)
        # Filtered: probe every list, so the allowed ids are all reached (exact).
        params = faiss.SearchParametersIVF(
            nprobe=inner.nlist if allowed_ids is not None else inner.nprobe
        )
    else:
        params = faiss.SearchParameters()
    if selector is not None:
        params.sel = selector
    scores, ids = index.search(query, min(k, index.ntotal), params=params)
    keep = ids[0] >= 0
    return scores[0][keep], ids[0][keep]


def _exact_among(
    index: faiss.Index, query: np.ndarray, k: int, allowed_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    ids = allowed_ids.astype(np.int64)
    vectors = index.reconstruct_batch(ids)
    scores = vectors @ query[0]
    top = np.argsort(-scores, kind="stable")[:k]
    return scores[top].astype(np.float32), ids[top]


def write_index(index: faiss.Index, path: Path) -> None:
    faiss.write_index(index, str(path))


def read_index(path: Path) -> faiss.Index:
    return faiss.read_index(str(path))
