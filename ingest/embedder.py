"""The sentence-transformers embedder shared by ingest (chunks) and retrieval (queries)."""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from docent.models import embedder_id, embedder_path
from docent.settings import DocentSettings
from ingest.embed_precision import Precision, parse_precision, resolve_precision

log = logging.getLogger(__name__)


class Embedder:
    """Normalised float32 embeddings, so inner product is cosine similarity.

    ``precision`` is what the model computes in (``ingest.embed_precision``): an index records
    it, and its queries must be embedded the same way; ``at_precision`` gives the sibling
    embedder for another precision, loaded once and shared by every caller of this one.
    """

    def __init__(
        self,
        name: str = "default",
        device: str = "cpu",
        precision: str = "fp32",
        cache_dir: Path | None = None,
        *,
        _family: dict[str, Embedder] | None = None,
    ) -> None:
        from sentence_transformers import SentenceTransformer

        self.name, self.device = name, device
        self.precision: Precision = parse_precision(precision)
        self.cache_dir = (cache_dir or Path("~/.cache/docent")).expanduser()
        self.model_id = embedder_id(name)
        path = embedder_path(name)
        self.model = SentenceTransformer(path, device=device)
        if self.precision == "int8":
            self._use_onnx_int8(path)
        elif self.precision == "bf16":
            self._use_bf16_linears()
        dim_of = (
            getattr(self.model, "get_embedding_dimension", None)
            or self.model.get_sentence_embedding_dimension
        )
        self.dim: int = dim_of() or 0
        self.max_tokens: int = self.model.max_seq_length or 512
        self.tokenizer = self.model.tokenizer
        self._family = _family if _family is not None else {}
        self._family.setdefault(self.precision, self)
        self._family_lock = threading.Lock()
        self._question: Any = None
        self._question_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: DocentSettings) -> Embedder:
        precision = resolve_precision(
            settings.embed_precision, settings.embedder, settings.device, settings.cache_dir
        )
        return cls(settings.embedder, settings.device, precision, settings.cache_dir)

    def at_precision(self, precision: str) -> Embedder:
        """This embedder at ``precision`` (itself when it already is)."""
        precision = parse_precision(precision)
        with self._family_lock:
            sibling = self._family.get(precision)
            if sibling is None:
                sibling = Embedder(
                    self.name, self.device, precision, self.cache_dir, _family=self._family
                )
                sibling._family_lock = self._family_lock
        return sibling

    def _use_onnx_int8(self, path: str) -> None:
        from ingest.onnx_embedder import onnx_model_file, run_on_onnx

        run_on_onnx(self.model, onnx_model_file(path, self.cache_dir, "int8"))

    def _question_model(self) -> Any:
        """What embeds one question: at fp32 on a CPU, the same model with its transformer
        run by ONNX Runtime (built on first use; the same vectors, 7.0 -> 4.4 ms a question
        against torch's path on 2 Xeon cores); otherwise the model itself (bf16 has no
        faster path there, and int8 already runs on ONNX Runtime)."""
        if self.precision != "fp32" or self.device != "cpu":
            return self.model
        with self._question_lock:
            if self._question is None:
                self._question = self._onnx_fp32_copy()
        return self._question

    def _onnx_fp32_copy(self) -> Any:
        from sentence_transformers import SentenceTransformer

        from ingest.onnx_embedder import onnx_model_file, run_on_onnx

        path = embedder_path(self.name)
        try:
            copy = SentenceTransformer(path, device="cpu")
            run_on_onnx(copy, onnx_model_file(path, self.cache_dir, "fp32"))
        except Exception as exc:  # noqa: BLE001  # a slower question beats a failed one
            log.warning("questions embed with torch: no ONNX Runtime fp32 path (%s)", exc)
            return self.model
        return copy

    def warm_questions(self) -> None:
        """Build the question path now (serving calls it at start) rather than on the first
        question: the first build on a machine exports the model, ~5 s."""
        self._question_model()

    def _use_bf16_linears(self) -> None:
        import torch

        # The matmul weights are stored in bf16 once (autocast would cast them again on every
        # call: +1.5 ms a question); embeddings and layer norms keep fp32 parameters. Casting
        # the whole model instead was faster still but lost more: recall@10 against the fp32
        # index 0.9945 against 0.998 (ingest/embed_precision.py).
        for module in self.model.modules():
            if isinstance(module, torch.nn.Linear):
                module.to(torch.bfloat16)

    def _compute(self) -> contextlib.AbstractContextManager[Any]:
        if self.precision != "bf16":
            return contextlib.nullcontext()
        import torch

        # Autocast runs the matmuls in bf16 and layer norms, softmax and pooling in fp32.
        return torch.autocast(device_type=self.model.device.type, dtype=torch.bfloat16)

    def count_tokens(self, text: str) -> list[Any]:
        """Token ids without special tokens: the unit chunk sizes are measured in."""
        # verbose=False: whole sections are longer than the model window, and that is fine here.
        return list(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def encode(self, texts: list[str], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._compute():
            vectors = self.model.encode(
                texts,
                batch_size=batch_size,
                show_progress_bar=progress,
                convert_to_numpy=True,
                normalize_embeddings=self.precision == "fp32",
            )
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if self.precision != "fp32":
            # normalized in fp32 here: a bf16 norm leaves lengths up to ~1e-3 off 1
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors

    def encode_query(self, query: str) -> np.ndarray:
        """One question, the same vector as ``encode([query])[0]`` (within 2e-6), sooner: the
        modules run directly, without ``encode``'s batching and sorting (5.6 -> 4.8 ms bf16
        on 2 Xeon cores), and at fp32 on a CPU through ONNX Runtime (7.0 -> 4.4 ms;
        bench/ingest.py)."""
        import torch

        model = self._question_model()
        prepare = getattr(model, "preprocess", None) or model.tokenize
        features = {
            key: value.to(model.device) if isinstance(value, torch.Tensor) else value
            for key, value in prepare([query]).items()
        }
        with torch.inference_mode(), self._compute():
            vector = model(features)["sentence_embedding"][0].float().cpu().numpy()
        vector = np.ascontiguousarray(vector, dtype=np.float32)
        return vector / max(float(np.linalg.norm(vector)), 1e-12)
