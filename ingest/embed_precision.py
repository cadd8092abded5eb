"""Which numeric precision the embedder runs at: fp32, bf16 or int8, and ``auto``'s choice.

Embedding is nearly the whole cost of ingest, and fp32 MiniLM already runs near a CPU's fp32
peak, so only lower precision goes faster. Measured by bench/ingest.py on a 2-core Xeon with
AVX512-BF16 + AMX (recall@10 = overlap of each query's top 10 with the fp32 index's, over 200
queries on 1,437 chunks of Python documentation, both sides embedded at their own precision):

- **bf16** (torch autocast over bf16 matmul weights; embeddings and layer norms keep fp32
  parameters): ingest 2.2x the plain fp32 ``encode``, cosine to fp32 >= 0.9999, recall@10
  0.995, handbook hit@5 unchanged. Casting the whole model to bf16 was faster (3.2-3.4x raw)
  but lost more (recall@10 0.9945 against 0.998 in a raw-encode comparison: bf16 layer-norm
  weights and embedding table). Without bf16 instructions the matmuls are emulated: 6x
  *slower* than fp32 (measured with oneDNN held to AVX2).
- **int8** (ONNX Runtime: the graph fused by its BERT optimizer, then dynamic quantization with
  per-channel int8 weights and per-tensor activations): ingest ~1.5x the plain fp32
  ``encode``, handbook hit@5 unchanged, but recall@10 0.898. The loss is int8's, not ONNX
  Runtime's: bench/int8_floor.py rounds every linear layer to 8 bits in fp32 arithmetic and no
  scheme that quantizes activations (per tensor, per token, with SmoothQuant) reaches 0.99.
  ``auto`` never picks int8; it is there for whoever accepts the loss for the speed.

``auto`` therefore chooses between fp32 and bf16 only, and only by measurement: on a CPU with
bf16 instructions it times both on the same texts once, checks bf16 stays within the quality
bound (cosine to fp32), and remembers the answer per CPU and library versions in the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Literal

from filelock import FileLock

from docent.hardware import cpu_flags, cpu_has_bf16

log = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16", "int8"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16", "int8")
# An index built before precisions existed was embedded in fp32.
LEGACY_PRECISION: Precision = "fp32"
# bf16 must keep every calibration text's embedding this close to fp32's (the bench's recall
# bound, 0.99 at top 10, needs far less than this; a broken kernel would fail it).
MIN_COSINE = 0.999
# Bumped when the calibration changes, so remembered choices are measured again.
CALIBRATION_VERSION = "2"
CALIBRATION_TEXTS = [
    (
        f"Section {i}. The service keeps {i * 7} records per tenant; when a refresh fails the "
        "previous index stays live and operators retry after freeing disk space. Questions "
        "about quotas, retention and exports go to the support desk, which answers within "
        f"{i % 5 + 1} working days and quotes the handbook paragraph it relied on."
    )
    for i in range(48)
]


def parse_precision(value: str) -> Precision:
    if value not in PRECISIONS:
        raise ValueError(f"embedding precision {value!r} must be one of {', '.join(PRECISIONS)}")
    return value  # type: ignore[return-value]


def resolve_precision(setting: str, embedder_name: str, device: str, cache_dir: Path) -> Precision:
    """The concrete precision for a setting: itself, or for ``auto`` the measured choice."""
    if setting != "auto":
        return parse_precision(setting)
    if device != "cpu":
        return "fp32"  # GPUs: measured nowhere here; fp32 keeps indexes identical
    if not cpu_has_bf16():
        return "fp32"  # bf16 without the instructions is emulated, several times slower
    return _calibrated_choice(embedder_name, cache_dir)


def _calibration_file(embedder_name: str, cache_dir: Path) -> Path:
    import sentence_transformers
    import torch

    model, flags = cpu_flags()
    key = json.dumps(
        [
            CALIBRATION_VERSION,
            embedder_name,
            model,
            sorted(f for f in flags if f.startswith(("avx", "amx"))),
            torch.__version__,
            sentence_transformers.__version__,
        ]
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir.expanduser() / "embed-precision" / f"{digest}.json"


def _calibrated_choice(embedder_name: str, cache_dir: Path) -> Precision:
    path = _calibration_file(embedder_name, cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.exists():
            try:
                return parse_precision(json.loads(path.read_text())["choice"])
            except (ValueError, KeyError, json.JSONDecodeError):
                log.warning("ignoring an unreadable calibration file %s", path)
        result = calibrate(embedder_name)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(path)
    log.info("embedding precision for this CPU: %s (%s)", result["choice"], path)
    return parse_precision(str(result["choice"]))


def calibrate(embedder_name: str) -> dict[str, object]:
    """Time fp32 and bf16 on the same texts and check bf16's cosine to fp32. The runs
    alternate and the best of each counts, so a busy spell of the machine hits both."""
    import numpy as np

    from ingest.embedder import Embedder

    fp32 = Embedder(embedder_name, "cpu", "fp32")
    runs = {"fp32": fp32, "bf16": fp32.at_precision("bf16")}
    best = dict.fromkeys(runs, float("inf"))
    vectors: dict[str, np.ndarray] = {}
    for emb in runs.values():
        emb.encode(CALIBRATION_TEXTS[:8])  # warm-up: first calls pick kernels
    for _ in range(4):
        for name, emb in runs.items():
            start = time.perf_counter()
            vectors[name] = emb.encode(CALIBRATION_TEXTS)
            best[name] = min(best[name], time.perf_counter() - start)
    rates = {name: len(CALIBRATION_TEXTS) / seconds for name, seconds in best.items()}
    cosine = float((vectors["fp32"] * vectors["bf16"]).sum(axis=1).min())
    faster = rates["bf16"] > rates["fp32"] * 1.1  # a clear win, not noise
    choice = "bf16" if faster and cosine >= MIN_COSINE else "fp32"
    return {
        "choice": choice,
        "texts_per_s": {k: round(v, 1) for k, v in rates.items()},
        "min_cosine_bf16": round(cosine, 6),
        "measured": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def slow_here(precision: str, device: str) -> str | None:
    """Why an index kept at ``precision`` embeds slowly on this machine (None: it doesn't).

    An index built at bf16 on a CPU with bf16 instructions keeps its precision when it moves:
    its queries, and with ``auto`` its refreshes, must be embedded the way its chunks were.
    On a CPU without those instructions every matmul is emulated, several times slower.
    """
    if precision != "bf16" or device != "cpu" or cpu_has_bf16():
        return None
    return (
        "the index was embedded at bf16, and this CPU has no bf16 instructions: every question "
        "(and every refreshed chunk) is embedded ~6x slower than at fp32 here. Re-embed it at "
        "fp32 with `DOCENT_EMBED_PRECISION=fp32 docent ingest --rebuild PATH...` (the current "
        "index stays live until the rebuild finishes)"
    )
