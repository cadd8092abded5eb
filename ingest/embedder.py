"""The sentence-transformers embedder shared by ingest (chunks) and retrieval (queries)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from docent.models import embedder_id, embedder_path
from docent.settings import DocentSettings

log = logging.getLogger(__name__)


class Embedder:
    """Normalised float32 embeddings, so inner product is cosine similarity."""

    def __init__(self, name: str = "default", device: str = "cpu") -> None:
        from sentence_transformers import SentenceTransformer

        self.model_id = embedder_id(name)
        self.model = SentenceTransformer(embedder_path(name), device=device)
        dim_of = (
            getattr(self.model, "get_embedding_dimension", None)
            or self.model.get_sentence_embedding_dimension
        )
        self.dim: int = dim_of() or 0
        self.max_tokens: int = self.model.max_seq_length or 512
        self.tokenizer = self.model.tokenizer

    @classmethod
    def from_settings(cls, settings: DocentSettings) -> Embedder:
        return cls(settings.embedder, settings.device)

    def count_tokens(self, text: str) -> list[Any]:
        """Token ids without special tokens: the unit chunk sizes are measured in."""
        # verbose=False: whole sections are longer than the model window, and that is fine here.
        return list(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def encode(self, texts: list[str], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(
            texts,
            batch_size=batch_size,
            show_progress_bar=progress,
            convert_to_numpy=True,
            normalize_embeddings=True,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def encode_query(self, query: str) -> np.ndarray:
        return self.encode([query])[0]
