"""FAISS index kinds: exact results under selective filters, tombstones, save/load."""

from __future__ import annotations

import numpy as np
import pytest

from ingest import vector_index


def _data(n: int = 4000, dim: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors, np.arange(1000, 1000 + n, dtype=np.int64)


def _exact(vectors, ids, query, k, allowed=None):
    scores = vectors @ query
    order = [i for i in np.argsort(-scores) if allowed is None or ids[i] in allowed]
    return ids[order[:k]]


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_selective_filter_still_returns_the_exact_top_k(kind):
    vectors, ids = _data()
    index = vector_index.build_index(kind, vectors, ids, vectors.shape[1])
    allowed = np.random.default_rng(1).choice(ids, size=25, replace=False)
    for q in range(5):
        query = vectors[q * 7]
        _, got = vector_index.search(index, query, 10, allowed_ids=allowed)
        assert list(got) == list(_exact(vectors, ids, query, 10, set(allowed.tolist())))


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_unfiltered_search_finds_the_query_vector_itself(kind, tmp_path):
    vectors, ids = _data()
    index = vector_index.build_index(kind, vectors, ids, vectors.shape[1])
    vector_index.write_index(index, tmp_path / "v.faiss")
    loaded = vector_index.read_index(tmp_path / "v.faiss")
    assert vector_index.index_kind(loaded) == kind and loaded.ntotal == len(ids)
    hits = sum(vector_index.search(loaded, vectors[i], 1)[1][0] == ids[i] for i in range(50))
    assert hits >= 48  # approximate kinds may miss a rare one


def test_hnsw_tombstones_are_never_returned():
    vectors, ids = _data(n=500)
    index = vector_index.build_index("hnsw", vectors, ids, vectors.shape[1])
    assert not vector_index.supports_removal(index)
    dead = ids[:50]
    for i in range(10):
        _, got = vector_index.search(index, vectors[i], 5, excluded_ids=dead)
        assert len(got) == 5 and not set(got.tolist()) & set(dead.tolist())


def test_empty_filter_and_empty_index_return_nothing():
    vectors, ids = _data(n=50)
    index = vector_index.build_index("flat", vectors, ids, vectors.shape[1])
    assert len(vector_index.search(index, vectors[0], 5, allowed_ids=np.zeros(0))[1]) == 0
    empty = vector_index.build_index("flat", vectors[:0], ids[:0], vectors.shape[1])
    assert len(vector_index.search(empty, vectors[0], 5)[1]) == 0


def test_auto_kind_switches_at_the_limit():
    assert vector_index.choose_kind("auto", 10, 100) == "flat"
    assert vector_index.choose_kind("auto", 101, 100) == "ivf"
    assert vector_index.choose_kind("hnsw", 10, 100) == "hnsw"
    with pytest.raises(ValueError, match="unknown index type"):
        vector_index.build_index("annoy", *_data(n=10), 32)
