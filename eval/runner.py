"""``docent eval``: the RAFT paper's comparison on the user's own questions.

Four systems answer the same questions with the same retrieval and the same greedy decoding:

- ``base``: the base model, closed book (the trained template with no documents);
- ``base+rag``: the base model with the top-k retrieved chunks;
- ``raft``: the RAFT-tuned adapter, closed book;
- ``raft+rag``: the adapter with the same chunks: what ``docent serve`` answers with.

RAG systems decline without asking the model when retrieval finds nothing relevant, and tie
answers to their evidence (quotes, or the retrieved sentence that states the answer), exactly
as serving does: an answer no retrieved chunk supports is flagged ungrounded, and declined under
the ``decline_ungrounded`` rule plain ``/v1/ask`` follows (by default, "tuned": the adapter's
ungrounded answers are declined, the base model's only flagged). Accuracy, EM and F1
score the final answer only (``metrics.final_answer``); gold anywhere in the output is kept as
a secondary figure. A distractor sweep gives each RAG system the oracle chunk plus N of the
question's top non-oracle hits, and a forgetting probe asks general-knowledge questions of
base and tuned model without documents.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from docent.engine import ChatRequest, Completion, Engine
from docent.engine.base import EngineUnavailableError
from docent.engine.factory import merges_adapters, resolve_engine_kind
from docent.errors import ConfigError, DocentError
from docent.hardware import auto_dtype, describe
from docent.progress import Progress, no_progress
from docent.prompts import DECLINE_ANSWER, build_messages, parse_answer
from docent.settings import DocentSettings
from docent.workspace import Workspace
from eval import metrics as m
from eval.answer_cache import AnswerCache
from ingest.docstore import StoredChunk
from ingest.embedder import Embedder
from raft.adapters import AdapterInfo
from raft.build import locate_evidence
from raft.merge import engine_for_adapter
from raft.registry_store import open_registry
from retrieval import Hit, Retriever
from serving.rag import declines_ungrounded, ground, is_relevant

SYSTEMS = ("base", "base+rag", "raft", "raft+rag")
PROBES = Path(__file__).parent / "probes" / "general.jsonl"
SWEEP = (0, 1, 2, 4, 8)
BATCH = 16  # answers per engine call; each finished batch is kept before the next starts


class EvalInterruptedError(DocentError):
    """The engine died mid-eval; the answers finished before are kept for the re-run."""


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
    em: float = 0.0  # EM, F1 and contained score the final answer (metrics.final_answer)
    f1: float = 0.0
    contained: float = 0.0
    contained_whole: float = 0.0  # a gold anywhere in the raw output (the old figure)
    quotes: int = 0
    quotes_found: int = 0
    cited_source: str | None = None  # the first citation's, quoted or attributed
    ungrounded: bool = False  # RAG systems: no retrieved chunk supports the answer
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


@dataclass
class _Variant:
    """One set of weights and the systems answered with it: the base model, or the adapter."""

    label: str  # "base" or "raft"
    systems: list[str]
    adapter: AdapterInfo | None = None

    @property
    def identity(self) -> str | None:
        """What the answer cache keys on: a retrained adapter of the same name is another."""
        if self.adapter is None:
            return None
        return f"{self.adapter.name}@{self.adapter.metadata.get('created', '')}"


class _Answerer:
    """Asks the engine for the answers the cache does not hold yet, in batches, and keeps
    each batch as it finishes. Turns an engine death into one line that says what is kept."""

    def __init__(self, engine: Engine, adapter: str | None, variant: _Variant,
                 cache: AnswerCache, fresh: bool) -> None:
        self.engine, self.adapter, self.variant = engine, adapter, variant
        self.cache, self.fresh = cache, fresh

    def request(self, messages: list[dict[str, str]], max_tokens: int,
                quote_sources: Sequence[str] = ()) -> ChatRequest:
        return ChatRequest(messages, max_tokens=max_tokens, adapter=self.adapter,
                           quote_sources=list(quote_sources))

    def __call__(self, system: str, items: Sequence[tuple[str, ChatRequest]]) -> list[Completion]:
        try:
            return self.cache.answers(self.engine.generate, items, self.variant.identity,
                                      system, batch=BATCH, fresh=self.fresh)
        except (EngineUnavailableError, RuntimeError, TimeoutError) as exc:
            raise EvalInterruptedError(
                f"{_one_line(exc)} — {self.cache.stored} answers of this run are kept in "
                f"{self.cache.path}: run the same `docent eval` again to resume"
            ) from exc


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


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
    fresh: bool = False,
    progress: Progress = no_progress,
) -> EvalResult:
    """Answers every question with every system and scores them. Finished answers are kept
    in ``<workspace>/eval/answers.sqlite`` as they come, so a re-run after a crash asks the
    model only for what is missing (``fresh=True`` asks again). With ``engine`` given, every
    system uses it; otherwise each set of weights gets the engine ``settings`` choose, the
    adapter through merged weights where that engine's LoRA path is slow (vLLM on CPUs)."""
    started = time.perf_counter()
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        raise ConfigError(f"unknown system(s) {unknown}: choose from {', '.join(SYSTEMS)}")
    k = k or settings.top_k
    questions = load_questions(qa_file, split, limit)
    info = _adapter(settings, adapter, systems)
    variants = [
        v for v in (
            _Variant("base", [s for s in systems if not s.startswith("raft")]),
            _Variant("raft", [s for s in systems if s.startswith("raft")], info),
        ) if v.systems
    ]
    embedder = embedder or Embedder.from_settings(settings)
    retriever = Retriever(settings, embedder=embedder)
    kind, dtype, cache = _answer_cache(settings, engine)
    try:
        hits = {q.id: retriever.search(q.question, k=max(k, 10)) for q in questions}
        progress("retrieve", len(questions), len(questions))
        retrieval = _retrieval_scores(questions, hits)
        located = _located(questions, retriever) if sweep else []
        predictions: list[Prediction] = []
        sweep_scores: dict[str, dict[str, float]] = {}
        per_probe: dict[str, list[float]] = {}
        forgot: dict[str, float] = {}
        answered = 0
        for variant in variants:
            with _engine(settings, variant, engine) as (live, request_adapter):
                ask = _Answerer(live, request_adapter, variant, cache, fresh)
                for system in variant.systems:
                    predictions += _answer(ask, questions, system, system.endswith("+rag"),
                                           hits, k, settings, max_tokens)
                    answered += 1
                    progress("answer", answered, len(systems))
                if sweep:
                    sweep_scores.update(_sweep(ask, located, hits, variant.systems, settings,
                                               max_tokens, progress))
                if forgetting:
                    per_probe[variant.label] = _forgetting(ask, max_tokens)
        forgot = _forgetting_scores(per_probe)
    finally:
        retriever.close()
        cache.close()
    scores = {s: _system_scores([p for p in predictions if p.system == s], questions)
              for s in systems}
    result = EvalResult(
        settings={"k": k, "split": split, "limit": limit, "max_tokens": max_tokens,
                  "generator": settings.generator, "engine": kind, "dtype": dtype,
                  # A given engine gets the adapter as LoRA; one built here may run it merged.
                  "adapter_weights": "merged" if engine is None and merges_adapters(kind)
                  else "lora",
                  "qa_file": str(qa_file), "hardware": describe(),
                  "answers_reused": cache.hits, "answers_generated": cache.stored},
        adapter=info.name if info else None,
        questions=len(questions),
        answerable=sum(q.answerable for q in questions),
        unanswerable=sum(not q.answerable for q in questions),
        retrieval=retrieval,
        systems=scores,
        sweep=sweep_scores,
        forgetting=forgot,
        predictions=[asdict(p) for p in predictions],
    )
    result.seconds = round(time.perf_counter() - started, 1)
    return result


def run_probe(
    settings: DocentSettings,
    adapter: str | None,
    *,
    limit: int | None = None,
    max_tokens: int = 160,
    engine: Engine | None = None,
    progress: Progress = no_progress,
) -> list[float]:
    """The forgetting probe alone, for one set of weights (``adapter`` None: the base model):
    one score per probe question, the first ``limit`` of them. Answers are kept in the eval
    answer cache, so the base model's are asked once and a re-run after a crash resumes."""
    info = _adapter(settings, adapter, ("raft",)) if adapter else None
    variant = _Variant("raft" if info else "base", [], info)
    kind, dtype, cache = _answer_cache(settings, engine)
    try:
        with _engine(settings, variant, engine) as (live, request_adapter):
            scores = _forgetting(_Answerer(live, request_adapter, variant, cache, False),
                                 max_tokens, limit)
    finally:
        cache.close()
    progress(f"probe ({variant.label})", len(scores), len(scores))
    return scores


def _answer_cache(
    settings: DocentSettings, engine: Engine | None
) -> tuple[str, str, AnswerCache]:
    """The engine kind and dtype answers will come from, and the cache keyed by them."""
    kind = engine.kind if engine is not None else resolve_engine_kind(settings)
    dtype = auto_dtype() if settings.dtype == "auto" else settings.dtype
    cache = AnswerCache(
        Workspace(settings.workspace).eval_dir / "answers.sqlite",
        {"generator": settings.generator, "engine": kind, "dtype": dtype},
    )
    return kind, dtype, cache


@contextlib.contextmanager
def _engine(
    settings: DocentSettings, variant: _Variant, given: Engine | None
) -> Iterator[tuple[Engine, str | None]]:
    """The engine for one variant and the adapter name its requests carry."""
    if given is not None:
        if variant.adapter is None:
            yield given, None
            return
        given.add_adapter(variant.adapter.name, str(variant.adapter.path))
        yield given, variant.adapter.name
        return
    live, request_adapter = engine_for_adapter(settings, variant.adapter)
    try:
        yield live, request_adapter
    finally:
        live.close()


def _adapter(
    settings: DocentSettings, name: str | None, systems: Sequence[str]
) -> AdapterInfo | None:
    if not any(s.startswith("raft") for s in systems):
        return None
    registry = open_registry(settings)
    info = registry.resolve(name)
    if info is None:
        raise ConfigError(
            "the raft systems need an adapter: train one (`docent train`), promote it, or pass "
            "--adapter NAME (or latest); or evaluate --systems base,base+rag"
        )
    registry.check_base(info, settings.generator)
    return info


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
    ask: _Answerer,
    questions: list[Question],
    system: str,
    rag: bool,
    hits: dict[str, list[Hit]],
    k: int,
    settings: DocentSettings,
    max_tokens: int,
    contexts: dict[str, list[Any]] | None = None,
) -> list[Prediction]:
    """Greedy answers of one system, batched; tied to their evidence as serving does (the
    decline rule of a plain question, chat mode None); scored against the golds."""
    items, todo, out = [], [], {}
    for q in questions:
        docs: list[Any] = []
        if contexts is not None:
            docs = contexts[q.id]
        elif rag:
            docs = hits[q.id][:k]
            if not is_relevant(docs, settings.min_relevance):
                out[q.id] = Prediction(q.id, system, "", "", True, skipped_generation=True)
                continue
        # Quotes held to the given chunks as serving holds them (quote_guard), every system alike.
        sources = [d.text for d in docs] if settings.quote_guard else []
        items.append((q.id, ask.request(build_messages(q.question, docs), max_tokens, sources)))
        todo.append((q, docs))
    completions = ask(system, items)
    # Answers are declined as serving would decline them to a plain question: by the adapter
    # answering (``raft`` systems) or the base model.
    decline = declines_ungrounded(settings.decline_ungrounded, None, system.startswith("raft"))
    for (q, docs), c in zip(todo, completions, strict=True):
        parsed = parse_answer(c.text)
        p = Prediction(q.id, system, c.text, m.final_answer(c.text),
                       parsed.declined or not parsed.answer, completion_tokens=c.completion_tokens)
        if docs:
            p.quotes = len(parsed.quotes)
            p.quotes_found = sum(m.quote_found(x, [d.text for d in docs]) for x in parsed.quotes)
            evidence = ground(q.question, p.answer, p.declined, parsed.quotes, docs)
            p.cited_source = evidence.citations[0].source if evidence.citations else None
            p.ungrounded = evidence.ungrounded
            if p.ungrounded and decline:
                p.answer, p.declined = DECLINE_ANSWER, True
        out[q.id] = p
    for q in questions:
        p = out[q.id]
        if q.answerable and not p.declined:
            p.em, p.f1, p.contained = m.final_answer_scores(p.raw, q.golds)
            p.contained_whole = m.gold_contained(p.raw, q.golds)
    return [out[q.id] for q in questions]


def _system_scores(preds: list[Prediction], questions: list[Question]) -> dict[str, float]:
    by_id = {q.id: q for q in questions}
    answerable = [p for p in preds if by_id[p.qid].answerable]
    unanswerable = [p for p in preds if not by_id[p.qid].answerable]
    answered = [p for p in answerable if not p.declined]
    quotes = sum(p.quotes for p in preds)
    cited = [p for p in answered if p.cited_source is not None]
    return {
        # Accuracy is over every answerable question: declining counts as wrong. It, EM and
        # F1 score the final answer; accuracy_whole_output counts a gold anywhere in the output.
        "accuracy": m.mean([p.contained for p in answerable]),
        "exact_match": m.mean([p.em for p in answerable]),
        "f1": m.mean([p.f1 for p in answerable]),
        "accuracy_whole_output": m.mean([p.contained_whole for p in answerable]),
        "answer_rate": len(answered) / len(answerable) if answerable else 0.0,
        "precision": m.mean([p.contained for p in answered]),
        "declined_unanswerable": m.mean([float(p.declined) for p in unanswerable]),
        "quotes_grounded": sum(p.quotes_found for p in preds) / quotes if quotes else 0.0,
        "cited_gold_source": m.mean(
            [float(p.cited_source == by_id[p.qid].source) for p in cited]
        ),
        "answers_with_citation": len(cited) / len(answered) if answered else 0.0,
        "ungrounded_answers": m.mean([float(p.ungrounded) for p in answered]),
        "completion_tokens": m.mean([float(p.completion_tokens) for p in preds]),
    }


def _located(questions: list[Question], retriever: Retriever) -> list[tuple[Question, Hit]]:
    """Answerable questions whose oracle chunk (the one holding the evidence) is found."""
    chunks_by_source: dict[str, list[StoredChunk]] = {}
    for chunk in retriever.iter_chunks():
        chunks_by_source.setdefault(chunk.source, []).append(chunk)
    located = []
    for q in questions:
        if not q.answerable or not q.source:
            continue
        row = {"evidence": q.evidence, "answer": q.golds[0]}
        oracle, _ = locate_evidence(row, chunks_by_source.get(q.source, []))
        if oracle is not None:
            located.append((q, _oracle_hit(oracle)))
    return located


def _oracle_hit(chunk: StoredChunk) -> Hit:
    """A stored chunk in the shape of a retrieval hit, so a citation of it names its section
    and page like any other (a bare StoredChunk has neither)."""
    meta = chunk.metadata
    return Hit(
        chunk_id=chunk.chunk_id,
        vector_id=chunk.vector_id,
        score=1.0,
        text=chunk.text,
        source=chunk.source,
        title=meta.get("title"),
        section=meta.get("section"),
        page=meta.get("page"),
        collection=str(meta.get("collection", "default")),
        metadata=meta,
    )


def _sweep(
    ask: _Answerer,
    located: list[tuple[Question, Hit]],
    hits: dict[str, list[Hit]],
    systems: Sequence[str],
    settings: DocentSettings,
    max_tokens: int,
    progress: Progress,
) -> dict[str, dict[str, float]]:
    """Accuracy with the oracle chunk plus N distractors (the question's best non-oracle
    hits), shuffled with the seed: how well each system ignores irrelevant documents."""
    rag_systems = [s for s in systems if s.endswith("+rag")]
    out: dict[str, dict[str, float]] = {s: {} for s in rag_systems}
    for step, n in enumerate(SWEEP, start=1):
        rng = random.Random(f"{settings.seed}-{n}")  # the same contexts for every system
        contexts: dict[str, list[Any]] = {}
        for q, oracle in located:
            distractors = [h for h in hits[q.id] if h.chunk_id != oracle.chunk_id][:n]
            docs: list[Any] = [oracle, *distractors]
            rng.shuffle(docs)
            contexts[q.id] = docs
        qs = [q for q, _ in located]
        for system in rag_systems:
            preds = _answer(ask, qs, f"{system}@sweep{n}", True, hits, 0, settings, max_tokens,
                            contexts=contexts)
            out[system][str(n)] = m.mean([p.contained for p in preds])
        progress(f"sweep ({ask.variant.label})", step, len(SWEEP))
    return out


def _probes() -> list[dict[str, Any]]:
    return [json.loads(line) for line in PROBES.read_text().splitlines() if line.strip()]


def _forgetting_scores(per_probe: dict[str, list[float]]) -> dict[str, float]:
    """Each set of weights' probe accuracy, the probe count, and, with both, the probes the
    tuned model lost and gained against the base: a drop of a few points on a probe of this
    size can be one or two answers, so the paired counts say how much of it is churn."""
    out = {label: m.mean(v) for label, v in per_probe.items()}
    if per_probe:
        out["probes"] = float(len(next(iter(per_probe.values()))))
    base, raft = per_probe.get("base"), per_probe.get("raft")
    if base is not None and raft is not None:
        out["lost"] = float(sum(b > r for b, r in zip(base, raft, strict=True)))
        out["gained"] = float(sum(r > b for b, r in zip(base, raft, strict=True)))
    return out


def _forgetting(ask: _Answerer, max_tokens: int, limit: int | None = None) -> list[float]:
    """General-knowledge answers scored without documents, one per probe, for one set of
    weights. It counts a gold anywhere in the output, unlike the headline: the probe asks for a
    short free answer with no ``<ANSWER>:`` format, and a tuned and a base model are compared
    with the same rule."""
    rows = _probes()[:limit]
    items = [
        (str(n), ask.request([{"role": "user", "content": f"Answer briefly. {r['question']}"}],
                             min(max_tokens, 48)))
        for n, r in enumerate(rows)
    ]
    completions = ask(f"probe:{ask.variant.label}", items)
    return [
        m.gold_contained(c.text, [r["answer"], *r.get("aliases", [])])
        for r, c in zip(rows, completions, strict=True)
    ]
