"""Score a set of weights by its answers on a RAFT set's validation split.

Loss says how well a model copies the training answers; users see its answers. So adapters
are compared on the validation questions asked as a user would ask them: retrieval, then the
model (``base+rag``, or ``raft+rag`` for an adapter), scored by ``eval.runner.run_eval``,
whose answer cache keeps every answer, so ``base+rag`` is generated once per question.

A score is recorded in the adapter's metadata under ``validation_scores``, keyed by what the
figure depends on (RAFT set and its hash, generator, question cap and seed, k, answer length,
index version): while the key holds, a promoted adapter need not be scored again.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from docent.engine import Engine
from docent.errors import ConfigError
from docent.models import generator_id
from docent.progress import Progress, no_progress
from docent.settings import DocentSettings
from docent.workspace import Workspace
from eval.runner import run_eval
from ingest.embedder import Embedder
from ingest.stores import live_version
from raft import show
from raft.adapters import AdapterInfo, AdapterRegistry

VALIDATION_MAX_TOKENS = 160  # what `docent eval` gives each answer
SCORES = "validation_scores"  # the adapter metadata field
ANSWERABLE_KINDS = ("oracle", "no_oracle")  # refusal rows reuse a question with unrelated chunks
# Cloze-form rule questions ("... the EU region is hosted in what?") are a second wording for
# training (Lewis et al. 2019); users do not ask that way, and on run 8's validation split the
# adapter declined most of them, so the gate asks them only when too few others exist.
TRAINING_ONLY_ORIGINS = ("rules:cloze",)
MIN_ASKED = 10
SELECTION = "2"  # bump when the choice of questions changes: recorded scores are keyed by it


@dataclass(frozen=True)
class ValidationSet:
    """The questions written for ``run_eval`` and the key their scores are valid under."""

    dataset: str
    qa_file: Path
    questions: int
    max_tokens: int
    key: dict[str, Any]

    @property
    def digest(self) -> str:
        return _digest(self.key)


def _digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def validation_questions(folder: Path, cap: int, seed: int) -> list[dict[str, Any]]:
    """The answerable questions of a RAFT set's validation split, once each, as rows of the
    qa format ``run_eval`` reads; at most ``cap`` of them, the same ones for the same seed.
    Questions in a training-only form come last: they fill the set only below ``MIN_ASKED``."""
    if cap < 1:
        raise ConfigError(f"the validation question cap must be at least 1, not {cap}")
    found: dict[str, dict[str, Any]] = {}
    for row in show.load_validation_questions(folder):
        meta = row.get("meta") or {}
        question = " ".join(str(meta.get("question") or "").split())
        answer = str(meta.get("answer") or "").strip()
        if meta.get("kind") not in ANSWERABLE_KINDS or not question or not answer:
            continue
        # One question may appear as oracle and no-oracle examples: ask it once.
        found.setdefault(
            question.casefold(),
            {
                "id": "val-" + hashlib.sha256(question.encode()).hexdigest()[:12],
                "question": question,
                "answer": answer,
                "source": meta.get("source"),
                "split": "validation",
                "answerable": True,
                "origin": meta.get("origin"),
            },
        )
    rows = sorted(found.values(), key=lambda r: str(r["question"]))
    random.Random(f"validation-{seed}").shuffle(rows)
    asked = [r for r in rows if r["origin"] not in TRAINING_ONLY_ORIGINS]
    if len(asked) < MIN_ASKED:
        asked += [r for r in rows if r["origin"] in TRAINING_ONLY_ORIGINS][:MIN_ASKED - len(asked)]
    return asked[:cap]


def prepare_validation(
    settings: DocentSettings, dataset: str | None, max_tokens: int | None = None
) -> ValidationSet:
    """Write the validation questions of RAFT set ``dataset`` (None: the latest) for
    ``run_eval``, under ``<workspace>/eval/validation/``; each answer may take ``max_tokens``
    (None: ``settings.validation_max_tokens``)."""
    max_tokens = max_tokens or settings.validation_max_tokens
    ws = Workspace(settings.workspace)
    folder = show.resolve(ws.raft_dir, dataset)
    rows = validation_questions(folder, settings.tune_val_questions, settings.seed)
    if not rows:
        raise ConfigError(
            f"RAFT set {folder.name} has no answerable validation questions, so adapters "
            "cannot be compared by their answers: rebuild it from more documents or with a "
            "larger validation share (DOCENT_RAFT_SPLIT), or promote an adapter yourself "
            "with `docent adapters promote NAME`"
        )
    index = live_version(settings)
    key = {
        "dataset": folder.name,
        "dataset_hash": show.load_manifest(folder).get("dataset_hash"),
        "generator": generator_id(settings.generator),
        "questions_cap": settings.tune_val_questions,
        "seed": settings.seed,
        "k": settings.top_k,
        "max_tokens": max_tokens,
        "index_version": index,
        "selection": SELECTION,
    }
    path = ws.eval_dir / "validation" / f"{folder.name}-{_digest(key)}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return ValidationSet(folder.name, path, len(rows), max_tokens, key)


def score_validation(
    settings: DocentSettings,
    vset: ValidationSet,
    *,
    adapter: str | None = None,
    systems: Sequence[str] = ("base+rag", "raft+rag"),
    engine: Engine | None = None,
    embedder: Embedder | None = None,
    progress: Progress = no_progress,
) -> dict[str, dict[str, float]]:
    """``run_eval``'s scores per system on the validation questions (forgetting probe off)."""
    result = run_eval(
        settings,
        vset.qa_file,
        systems=systems,
        adapter=adapter,
        split="validation",
        forgetting=False,
        max_tokens=vset.max_tokens,
        engine=engine,
        embedder=embedder,
        progress=progress,
    )
    return result.systems


def recorded_score(info: AdapterInfo, vset: ValidationSet) -> dict[str, Any] | None:
    """The adapter's recorded validation score, if it was taken on this very validation set."""
    record = (info.metadata.get(SCORES) or {}).get(vset.digest)
    return record if record and record.get("key") == vset.key else None


def known_base_rag(registry: AdapterRegistry, vset: ValidationSet) -> float | None:
    """base+RAG's accuracy on this validation set, if any adapter's record holds it."""
    for info in registry.list():
        record = recorded_score(info, vset)
        if record and record.get("base_rag_accuracy") is not None:
            return float(record["base_rag_accuracy"])
    return None


def record_score(
    registry: AdapterRegistry,
    name: str,
    vset: ValidationSet,
    scores: dict[str, float],
    base_rag: float | None,
) -> dict[str, Any]:
    """Keep an adapter's ``raft+rag`` scores (and base+RAG's beside them) in its metadata."""
    record = {
        "key": vset.key,
        "questions": vset.questions,
        "accuracy": scores["accuracy"],
        "base_rag_accuracy": base_rag,
        "scores": scores,
        "scored": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    records = dict(registry.get(name).metadata.get(SCORES) or {})
    records[vset.digest] = record
    registry.update_metadata(name, **{SCORES: records})
    return record
