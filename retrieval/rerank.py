"""Optional second stage: a cross-encoder scores (question, chunk) pairs jointly."""

from __future__ import annotations

from docent.models import _explicit_model


class CrossEncoderReranker:
    def __init__(self, name: str, device: str = "cpu") -> None:
        from sentence_transformers import CrossEncoder

        self.name = name
        self.model = CrossEncoder(_explicit_model(name, "reranker"), device=device)

    def scores(self, query: str, texts: list[str]) -> list[float]:
        if not texts:
            return []
        raw = self.model.predict([(query, t) for t in texts], show_progress_bar=False)
        return [float(s) for s in raw]
