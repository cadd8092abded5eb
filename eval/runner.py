"""``docent eval``: the RAFT paper's comparison on the user's own questions.

Four systems answer the same questions with the same retrieval and the same greedy decoding:

- ``base``: the base model, closed book (the trained template with no documents);
- ``base+rag``: the base model with the top-k retrieved chunks;
- ``raft``: the RAFT-tuned adapter, closed book;
- ``raft+rag``: the adapter with the same chunks: what ``docent serve`` answers with.

RAG systems decline without asking the model when retrieval finds nothing relevant, exactly
as serving does. A distractor sweep gives each RAG system the oracle chunk plus N of the
question's top non-oracle hits, and a forgetting probe asks general-knowledge questions of
base and tuned model without documents.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from docent.engine import ChatRequest, Engine, build_engine
from docent.errors import ConfigError
from docent.progress import Progress, no_progress
from docent.prompts import build_messages, parse_answer
from docent.settings import DocentSettings
from docent.workspace import Workspace
from eval import metrics as m
from ingest.docstore import StoredChunk
from ingest.embedder import Embedder
from raft.adapters import AdapterRegistry
from raft.build import locate_evidence
from retrieval import Hit, Retriever
from serving.rag import cite, is_relevant

SYSTEMS = ("base", "base+rag", "raft", "raft+rag")
PROBES = Path(__file__).parent / "probes" / "general.jsonl"
SWEEP = (0, 1, 2, 4, 8)


@dataclass
class Question:
    id: str
    question: str
    golds: list[str]
    source: str | None
    evidence: str | None
    answerable: bool


@dataclass
class Prediction:
    """One system's answer to one question, with its scores."""

    qid: str
    system: str
    raw: str
    answer: str
    declined: bool
    em: float = 0.0
    f1: float = 0.0
    contained: float = 0.0
    quotes: int = 0
    quotes_found: int = 0
    cited_source: str | None = None
    completion_tokens: int = 0
    skipped_generation: bool = False


@dataclass
class EvalResult:
    settings: dict[str, Any]
    adapter: str | None
    questions: int
    answerable: int
    unanswerable: int
    retrieval: dict[str, float]
    systems: dict[str, dict[str, float]]
    sweep: dict[str, dict[str, float]] = field(default_factory=dict)
    forgetting: dict[str, float] = field(default_factory=dict)
    predictions: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_questions(
    path: Path, split: str | None = "test", limit: int | None = None
) -> list[Question]:
    """Answerable questions of ``split`` (None: all), plus every unanswerable one (they are
    never trained on: RAFT sets take answerable train questions only). ``limit`` keeps the
    first N answerable ones and a quarter as many unanswerable ones, in file order, so a
    quick run still scores declining."""
    if not path.exists():
        raise ConfigError(f"--qa {path} does not exist")
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            answerable = bool(row.get("answerable", True))
            if answerable and split and row.get("split", "test") != split:
                continue
            golds = [str(row["answer"]), *[str(a) for a in row.get("aliases", [])]]
            out.append(
                Question(
                    id=str(row.get("id", number)),
                    question=str(row["question"]),
                    golds=golds if answerable else [],
                    source=row.get("source"),
                    evidence=row.get("evidence"),
                    answerable=answerable,
                )
            )
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"{path}:{number}: need JSON with 'question' and 'answer' ({exc})"
            ) from exc
    if not out:
        raise ConfigError(f"{path} has no questions for split {split!r}")
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"--limit must be at least 1, not {limit}")
        kept = [q for q in out if q.answerable][:limit]
        kept += [q for q in out if not q.answerable][: max(1, limit // 4)]
        keep = {id(q) for q in kept}
        out = [q for q in out if id(q) in keep]
    return out


def run_eval(
    settings: DocentSettings,
    qa_file: Path,
    *,
    systems: Sequence[str] = SYSTEMS,
    adapter: str | None = None,
    k: int | None = None,
    split: str | None = "test",
    limit: int | None = None,
    sweep: bool = False,
    forgetting: bool = True,
    max_tokens: int = 160,
    engine: Engine | None = None,
    embedder: Embedder | None = None,
    progress: Progress = no_progress,
) -> EvalResult:
    started = time.perf_counter()
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        raise ConfigError(f"unknown system(s) {unknown}: choose from {', '.join(SYSTEMS)}")
    k = k or settings.top_k
    questions = load_questions(qa_file, split, limit)
    adapter_name, adapter_path = _adapter(settings, adapter, systems)
    embedder = embedder or Embedder.from_settings(settings)
    retriever = Retriever(settings, embedder=embedder)
    owned = engine is None
    engine = engine or build_engine(settings)
    try:
        if adapter_name and adapter_path:
            engine.add_adapter(adapter_name, adapter_path)
        hits = {q.id: retriever.search(q.question, k=max(k, 10)) for q in questions}
        progress("retrieve", len(questions), len(questions))
        retrieval = _retrieval_scores(questions, hits)
        predictions: list[Prediction] = []
        for n, system in enumerate(systems, start=1):
            use_adapter = adapter_name if system.startswith("raft") else None
            rag = system.endswith("+rag")
            predictions += _answer(
                engine, questions, system, use_adapter, rag, hits, k, settings, max_tokens
            )
            progress("answer", n, len(systems))
        scores = {s: _system_scores([p for p in predictions if p.system == s], questions)
                  for s in systems}
        result = EvalResult(
            settings={"k": k, "split": split, "limit": limit, "max_tokens": max_tokens,
                      "generator": settings.generator, "engine": engine.kind,
                      "qa_file": str(qa_file)},
            adapter=adapter_name,
            questions=len(questions),
            answerable=sum(q.answerable for q in questions),
            unanswerable=sum(not q.answerable for q in questions),
            retrieval=retrieval,
            systems=scores,
            predictions=[asdict(p) for p in predictions],
        )
        if sweep:
            result.sweep = _sweep(engine, questions, hits, systems, adapter_name, settings,
                                  retriever, max_tokens, progress)
        if forgetting:
            result.forgetting = _forgetting(engine, systems, adapter_name, max_tokens)
    finally:
        retriever.close()
        if owned:
            engine.close()
    result.seconds = round(time.perf_counter() - started, 1)
    return result


def _adapter(
    settings: DocentSettings, name: str | None, systems: Sequence[str]
) -> tuple[str | None, str | None]:
    if not any(s.startswith("raft") for s in systems):
        return None, None
    registry = AdapterRegistry(Workspace(settings.workspace).adapters_dir)
    info = registry.get(name) if name else registry.promoted()
    if info is None:
        raise ConfigError(
            "the raft systems need an adapter: train one (`docent train`), promote it, or pass "
            "--adapter NAME; or evaluate --systems base,base+rag"
        )
    registry.check_base(info, settings.generator)
    return info.name, str(info.path)


def _retrieval_scores(questions: list[Question], hits: dict[str, list[Hit]]) -> dict[str, float]:
    ranked = [([h.source for h in hits[q.id]], q.source) for q in questions if q.source]
    if not ranked:
        return {}
    return {
        "recall@1": m.mean([m.recall_at(r, s, 1) for r, s in ranked if s]),
        "recall@5": m.mean([m.recall_at(r, s, 5) for r, s in ranked if s]),
        "recall@10": m.mean([m.recall_at(r, s, 10) for r, s in ranked if s]),
        "mrr": m.mean([m.reciprocal_rank(r, s) for r, s in ranked if s]),
        "ndcg@10": m.mean([m.ndcg_at(r, s, 10) for r, s in ranked if s]),
        "questions": float(len(ranked)),
    }


def _answer(
    engine: Engine,
    questions: list[Question],
    system: str,
    adapter: str | None,
    rag: bool,
    hits: dict[str, list[Hit]],
    k: int,
    settings: DocentSettings,
    max_tokens: int,
    contexts: dict[str, list[Any]] | None = None,
) -> list[Prediction]:
    """Greedy answers of one system, batched; scored against the golds."""
    requests, todo, out = [], [], {}
    for q in questions:
        docs: list[Any] = []
        if contexts is not None:
            docs = contexts[q.id]
        elif rag:
            docs = hits[q.id][:k]
            if not is_relevant(docs, settings.min_relevance):
                out[q.id] = Prediction(q.id, system, "", "", True, skipped_generation=True)
                continue
        requests.append(
            ChatRequest(build_messages(q.question, docs), max_tokens=max_tokens, adapter=adapter)
        )
        todo.append((q, docs))
    completions = engine.generate(requests)
    for (q, docs), c in zip(todo, completions, strict=True):
        parsed = parse_answer(c.text)
        p = Prediction(q.id, system, c.text, parsed.answer, parsed.declined,
                       completion_tokens=c.completion_tokens)
        if docs:
            p.quotes = len(parsed.quotes)
            p.quotes_found = sum(m.quote_found(x, [d.text for d in docs]) for x in parsed.quotes)
            citations, _ = cite(parsed.quotes, docs)
            p.cited_source = citations[0].source if citations else None
        out[q.id] = p
    for q in questions:
        p = out[q.id]
        if q.answerable and not p.declined:
            p.em, p.f1 = m.exact_match(p.answer, q.golds), m.token_f1(p.answer, q.golds)
            p.contained = m.gold_contained(p.answer, q.golds)
    return [out[q.id] for q in questions]


def _system_scores(preds: list[Prediction], questions: list[Question]) -> dict[str, float]:
    by_id = {q.id: q for q in questions}
    answerable = [p for p in preds if by_id[p.qid].answerable]
    unanswerable = [p for p in preds if not by_id[p.qid].answerable]
    answered = [p for p in answerable if not p.declined]
    quotes = sum(p.quotes for p in preds)
    cited = [p for p in answered if p.cited_source is not None]
    return {
        # Accuracy is over every answerable question: declining counts as wrong.
        "accuracy": m.mean([p.contained for p in answerable]),
        "exact_match": m.mean([p.em for p in answerable]),
        "f1": m.mean([p.f1 for p in answerable]),
        "answer_rate": len(answered) / len(answerable) if answerable else 0.0,
        "precision": m.mean([p.contained for p in answered]),
        "declined_unanswerable": m.mean([float(p.declined) for p in unanswerable]),
        "quotes_grounded": sum(p.quotes_found for p in preds) / quotes if quotes else 0.0,
        "cited_gold_source": m.mean(
            [float(p.cited_source == by_id[p.qid].source) for p in cited]
        ),
        "answers_with_citation": len(cited) / len(answered) if answered else 0.0,
        "completion_tokens": m.mean([float(p.completion_tokens) for p in preds]),
    }


def _sweep(
    engine: Engine,
    questions: list[Question],
    hits: dict[str, list[Hit]],
    systems: Sequence[str],
    adapter: str | None,
    settings: DocentSettings,
    retriever: Retriever,
    max_tokens: int,
    progress: Progress,
) -> dict[str, dict[str, float]]:
    """Accuracy with the oracle chunk plus N distractors (the question's best non-oracle
    hits), shuffled with the seed: how well each system ignores irrelevant documents."""
    store = retriever.store
    chunks_by_source: dict[str, list[StoredChunk]] = {}
    for chunk in store.docstore.iter_chunks():
        chunks_by_source.setdefault(chunk.source, []).append(chunk)
    located = []
    for q in questions:
        if not q.answerable or not q.source:
            continue
        row = {"evidence": q.evidence, "answer": q.golds[0]}
        oracle, _ = locate_evidence(row, chunks_by_source.get(q.source, []))
        if oracle is not None:
            located.append((q, oracle))
    rag_systems = [s for s in systems if s.endswith("+rag")]
    out: dict[str, dict[str, float]] = {s: {} for s in rag_systems}
    rng = random.Random(settings.seed)
    for step, n in enumerate(SWEEP, start=1):
        contexts: dict[str, list[Any]] = {}
        for q, oracle in located:
            distractors = [h for h in hits[q.id] if h.chunk_id != oracle.chunk_id][:n]
            docs: list[Any] = [oracle, *distractors]
            rng.shuffle(docs)
            contexts[q.id] = docs
        qs = [q for q, _ in located]
        for system in rag_systems:
            use = adapter if system.startswith("raft") else None
            preds = _answer(engine, qs, system, use, True, hits, 0, settings, max_tokens,
                            contexts=contexts)
            out[system][str(n)] = m.mean([p.contained for p in preds])
        progress("sweep", step, len(SWEEP))
    return out


def _forgetting(
    engine: Engine, systems: Sequence[str], adapter: str | None, max_tokens: int
) -> dict[str, float]:
    """General-knowledge accuracy without documents, for the base model and the adapter."""
    rows = [json.loads(line) for line in PROBES.read_text().splitlines() if line.strip()]
    variants: dict[str, str | None] = {"base": None}
    if adapter and any(s.startswith("raft") for s in systems):
        variants["raft"] = adapter
    out = {}
    for label, name in variants.items():
        requests = [
            ChatRequest([{"role": "user", "content": f"Answer briefly. {r['question']}"}],
                        max_tokens=min(max_tokens, 48), adapter=name)
            for r in rows
        ]
        completions = engine.generate(requests)
        out[label] = m.mean([
            m.gold_contained(c.text, [r["answer"], *r.get("aliases", [])])
            for r, c in zip(rows, completions, strict=True)
        ])
    out["probes"] = float(len(rows))
    return out
