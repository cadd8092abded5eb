"""BM25 index (bm25s, sparse matrices) over the same chunk texts the embedder sees."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import bm25s
import numpy as np

LANGUAGE = "english"


@functools.lru_cache(maxsize=1)
def _stemmer() -> object:
    import Stemmer  # PyStemmer: "refunds" and "refund" match

    return Stemmer.Stemmer(LANGUAGE)


def tokenize(texts: list[str]) -> bm25s.tokenization.Tokenized:
    return bm25s.tokenize(texts, stopwords="en", stemmer=_stemmer(), show_progress=False)


def lexical_text(text: str, metadata: dict[str, object]) -> str:
    """What BM25 indexes for a chunk: its title and section, then its text."""
    heading = " ".join(str(metadata.get(k) or "") for k in ("title", "section"))
    return f"{heading}\n{text}"


def query_tokens(query: str) -> list[str]:
    """A question's tokens as bm25s sees them (stemmed, no stopwords)."""
    return token_lists([query])[0]


def token_lists(texts: list[str]) -> list[list[str]]:
    """The stemmed, stopword-free tokens bm25s indexes, as strings (the Postgres store keeps
    them so its full-text ranking matches this index's)."""
    if not texts:
        return []
    tokens = bm25s.tokenize(
        texts, stopwords="en", stemmer=_stemmer(), return_ids=False, show_progress=False
    )
    return [list(t) for t in tokens]


def tokenize_query(query: str, vocab: dict[str, int]) -> list[list[str]]:
    tokens = bm25s.tokenize(
        [query], stopwords="en", stemmer=_stemmer(), return_ids=False, show_progress=False
    )
    return [[t for t in tokens[0] if t in vocab]]


class LexicalIndex:
    """A bm25s index plus the FAISS/docstore vector id of each of its rows."""

    def __init__(self, bm25: bm25s.BM25 | None, ids: np.ndarray) -> None:
        self.bm25 = bm25
        self.ids = ids  # row -> vector_id

    @classmethod
    def build(cls, texts: list[str], ids: np.ndarray) -> LexicalIndex:
        if not texts:
            return cls(None, np.zeros(0, dtype=np.int64))
        bm25 = bm25s.BM25()
        bm25.index(tokenize(texts), show_progress=False)
        return cls(bm25, ids.astype(np.int64))

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "ids.npy", self.ids)
        if self.bm25 is not None:
            self.bm25.save(str(folder))
        (folder / "lexical.json").write_text(json.dumps({"empty": self.bm25 is None}))

    @classmethod
    def load(cls, folder: Path) -> LexicalIndex:
        ids = np.load(folder / "ids.npy")
        empty = json.loads((folder / "lexical.json").read_text())["empty"]
        return cls(None if empty else bm25s.BM25.load(str(folder)), ids)

    def mask_for(self, allowed_ids: np.ndarray) -> np.ndarray:
        """bm25s weight mask (1 = may be returned) for a set of vector ids."""
        return np.isin(self.ids, allowed_ids).astype(np.float32)

    def search(
        self,
        query: str,
        k: int,
        allowed_ids: np.ndarray | None = None,
        mask: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """BM25 scores and vector ids of the best ``k`` rows with a positive score."""
        if self.bm25 is None or k <= 0:
            return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.int64)
        query_tokens = tokenize_query(query, self.bm25.vocab_dict)
        if not query_tokens[0]:
            return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.int64)
        if mask is None and allowed_ids is not None:
            mask = self.mask_for(allowed_ids)
        k = min(k, len(self.ids))
        rows, scores = self.bm25.retrieve(
            query_tokens, k=k, show_progress=False, weight_mask=mask, n_threads=1
        )
        rows, scores = rows[0], scores[0]
        keep = scores > 0
        return scores[keep].astype(np.float32), self.ids[rows[keep]]
