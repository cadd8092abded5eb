"""Retrieval-augmented answering: retrieve, prompt with the trained template, generate, parse
the RAFT answer and tie it to its evidence: each quote to the chunk it came from, and an answer
the model did not quote to the retrieved sentence that states it (``serving.attribution``).
An answer that nothing retrieved supports is flagged ``ungrounded``, and declined where the
``decline_ungrounded`` setting says so.

Every endpoint (``/v1/ask``, ``/v1/chat``, ``/v1/chat/completions``) goes through
``RagService.stream``, so they retrieve, prompt and cite the same way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from docent.engine import ChatRequest, Completion, Engine
from docent.errors import EmptyIndexError
from docent.prompts import (
    DECLINE_ANSWER,
    build_messages,
    format_answer,
    normalise,
    parse_answer,
    squash,
)
from docent.settings import DocentSettings
from retrieval import Filters, Hit, Retriever
from retrieval.fusion import reciprocal_rank_fusion
from serving.adapters import AdapterCatalog
from serving.admission import Admission
from serving.attribution import attribute, evidences, final_answer
from serving.metrics import Metrics

log = logging.getLogger(__name__)
NOTHING_RELEVANT = "No document in the knowledge base is relevant to this question."
UNSUPPORTED = (
    "No retrieved document supports the answer the model gave, so Docent does not pass it on."
)


@dataclass
class Citation:
    document: int  # the 1-based DOCUMENT id in the prompt
    chunk_id: str
    source: str
    section: str | None
    page: int | None
    quote: str  # the model's quote, or for "attributed" the chunk's sentence that states it
    score: float
    # "quote": the model quoted it verbatim; "attributed": the model did not quote (or its
    # quotes do not state the answer) and Docent found the sentence that does.
    kind: Literal["quote", "attributed"] = "quote"

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


@dataclass
class Answer:
    question: str
    answer: str
    reasoning: str
    declined: bool
    citations: list[Citation]
    unsupported_quotes: list[str]  # quotes found in no retrieved chunk
    hits: list[Hit]
    model: str
    adapter: str | None
    raw: str
    finish_reason: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    timings: dict[str, float] = field(default_factory=dict)  # milliseconds
    id: str = ""
    # No retrieved chunk supports the model's answer. With ``declined`` Docent withheld it
    # (``decline_ungrounded``); ``raw`` still holds what the model said.
    ungrounded: bool = False

    @property
    def grounded(self) -> bool:
        """The answer is supported by a citation and every quote is in a retrieved chunk."""
        return bool(self.citations) and not self.unsupported_quotes and not self.ungrounded


@dataclass
class Retrieved:
    hits: list[Hit]
    relevance: float | None  # best dense cosine among the hits; None in bm25-only mode
    ms: float


@dataclass
class StreamEvent:
    """``retrieved`` (hits known), ``delta`` (new model text), ``answer`` (all done)."""

    kind: str
    retrieved: Retrieved | None = None
    text: str = ""
    answer: Answer | None = None
    # The adapter answering (None: the base model), known from the ``retrieved`` event on, so
    # a stream can decide before the first token whether an ungrounded answer will be declined.
    adapter: str | None = None


class RagService:
    def __init__(
        self,
        settings: DocentSettings,
        retriever: Retriever | None,
        engine: Engine,
        adapters: AdapterCatalog,
        metrics: Metrics,
        admission: Admission | None = None,
    ) -> None:
        self.settings = settings
        self.retriever = retriever
        self.engine = engine
        self.adapters = adapters
        self.metrics = metrics
        self.admission = admission or Admission(
            default_max_active(settings, engine),
            settings.max_queued_answers,
            settings.queue_timeout_s,
            metrics,
        )

    # Retrieval -----------------------------------------------------------------------------
    def _retriever(self) -> Retriever:
        if self.retriever is None:
            raise EmptyIndexError(
                "there is no index yet: POST /v1/index/refresh (or run `docent ingest PATH`)"
            )
        return self.retriever

    def retrieve(
        self,
        question: str,
        k: int,
        filters: Filters | None = None,
        earlier_questions: Sequence[str] = (),
    ) -> Retrieved:
        """The chunks for a question. In a conversation a follow-up ("and how much does it
        cost?") often names nothing itself, so the earlier user turns are searched together
        with it and both rankings are fused; the last message alone still ranks first on ties.
        """
        retriever = self._retriever()
        started = time.perf_counter()
        hits = retriever.search(question, k=k, filters=filters)
        if earlier_questions:
            context = " ".join([*earlier_questions[-2:], question])
            context_hits = retriever.search(context, k=k, filters=filters)
            by_id = {h.vector_id: h for h in [*context_hits, *hits]}
            fused = reciprocal_rank_fusion(
                [[h.vector_id for h in hits], [h.vector_id for h in context_hits]],
                self.settings.rrf_k,
            )
            hits = [by_id[vid] for vid, _ in fused[:k]]
        dense = [h.scores["dense"] for h in hits if "dense" in h.scores]
        ms = 1000 * (time.perf_counter() - started)
        self.metrics.retrieval.observe(ms / 1000)
        return Retrieved(hits, max(dense) if dense else None, ms)

    def relevant(self, retrieved: Retrieved) -> bool:
        return is_relevant(retrieved.hits, self.settings.min_relevance)

    # Generation ----------------------------------------------------------------------------
    async def stream(
        self,
        question: str,
        *,
        k: int | None = None,
        filters: Filters | None = None,
        adapter: str | None = None,
        history: Sequence[dict[str, str]] = (),
        mode: str | None = None,
        extra_instructions: str | None = None,
        max_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> AsyncIterator[StreamEvent]:
        # Admission comes first, so a refused request costs no retrieval and a streamed one
        # is refused with a status code, before its response starts.
        async with self.admission.slot():
            started = time.perf_counter()
            adapter_name = self.adapters.resolve(adapter)
            earlier = [m["content"] for m in history if m["role"] == "user"]
            retrieved = await asyncio.to_thread(
                self.retrieve, question, k or self.settings.top_k, filters, earlier
            )
            yield StreamEvent("retrieved", retrieved=retrieved, adapter=adapter_name)
            if not self.relevant(retrieved):
                # Nothing to ground an answer in: say so rather than let the model invent one.
                raw = format_answer(NOTHING_RELEVANT, DECLINE_ANSWER)
                self.metrics.answers.labels("no_context").inc()
                yield StreamEvent("delta", text=raw)
                canned = Completion(raw, 0, 0, "stop", self.engine.model, adapter_name)
                answer = self._answer(question, retrieved, canned, started, 0.0, None, mode,
                                      tuned=adapter_name is not None)
                yield StreamEvent("answer", answer=answer)
                return
            request = ChatRequest(
                messages=build_messages(
                    question, retrieved.hits, history, mode, extra_instructions
                ),
                max_tokens=max_tokens or self.settings.answer_max_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                adapter=adapter_name,
                quote_sources=(
                    [h.text for h in retrieved.hits] if self.settings.quote_guard else []
                ),
            )
            gen_started = time.perf_counter()
            first: float | None = None
            completion: Completion | None = None
            async for delta in self.engine.astream(request):
                if delta.text:
                    if first is None:
                        first = time.perf_counter() - gen_started
                        self.metrics.first_token.observe(first)
                    yield StreamEvent("delta", text=delta.text)
                completion = delta.completion or completion
            assert completion is not None, "engines end every stream with a completion"
            gen_s = time.perf_counter() - gen_started
            self.metrics.generation.observe(gen_s)
            self.metrics.tokens.labels("prompt").inc(completion.prompt_tokens)
            self.metrics.tokens.labels("completion").inc(completion.completion_tokens)
            answer = self._answer(
                question, retrieved, completion, started, gen_s * 1000, first, mode, earlier,
                tuned=adapter_name is not None,
            )
            self.metrics.answers.labels(_outcome(answer)).inc()
            yield StreamEvent("answer", answer=answer)

    async def answer(self, question: str, **kwargs: Any) -> Answer:
        result: Answer | None = None
        async for event in self.stream(question, **kwargs):
            result = event.answer or result
        assert result is not None
        return result

    def _answer(
        self,
        question: str,
        retrieved: Retrieved,
        completion: Completion,
        started: float,
        generation_ms: float,
        first_token_s: float | None,
        mode: str | None,
        earlier_questions: Sequence[str] = (),
        tuned: bool = False,
    ) -> Answer:
        parsed = parse_answer(completion.text)
        declined = parsed.declined or not parsed.answer
        # A follow-up ("how long does it stay valid?") names little itself: judge what a
        # sentence is about against the conversation, as retrieval does.
        asked = " ".join([*earlier_questions[-2:], question])
        evidence = ground(
            asked, final_answer(completion.text), declined, parsed.quotes, retrieved.hits
        )
        text, reasoning = parsed.answer or DECLINE_ANSWER, parsed.reasoning
        if evidence.ungrounded and declines_ungrounded(
            self.settings.decline_ungrounded, mode, tuned
        ):
            log.info("declined an answer no retrieved chunk supports: %r", parsed.answer[:200])
            text, reasoning, declined = DECLINE_ANSWER, UNSUPPORTED, True
        timings = {
            "retrieval_ms": round(retrieved.ms, 1),
            "generation_ms": round(generation_ms, 1),
            "total_ms": round(1000 * (time.perf_counter() - started), 1),
        }
        if first_token_s is not None:
            timings["first_token_ms"] = round(1000 * first_token_s, 1)
        return Answer(
            question=question,
            answer=text,
            reasoning=reasoning,
            declined=declined,
            citations=evidence.citations,
            unsupported_quotes=evidence.unsupported_quotes,
            hits=retrieved.hits,
            model=completion.model,
            adapter=completion.adapter,
            raw=completion.text,
            finish_reason=completion.finish_reason,
            prompt_tokens=completion.prompt_tokens,
            completion_tokens=completion.completion_tokens,
            timings=timings,
            ungrounded=evidence.ungrounded,
        )


def _outcome(answer: Answer) -> str:
    """The ``docent_answers`` label: ungrounded answers are counted apart, given or withheld."""
    if answer.ungrounded:
        return "withheld_ungrounded" if answer.declined else "ungrounded"
    return "declined" if answer.declined else "answered"


def declines_ungrounded(setting: str, mode: str | None, tuned: bool = False) -> bool:
    """Whether an ungrounded answer to a request in chat ``mode`` (None: a plain question),
    from a RAFT adapter (``tuned``) or the base model, is replaced by a decline under the
    ``decline_ungrounded`` setting.

    ``tuned`` (the default) declines every ungrounded answer of an adapter but only flags the
    base model's outside support chats. Measured on the handbook (README, runs 5-7): an adapter
    quotes or states its answer in one sentence, so when no retrieved sentence supports it the
    answer is wrong; declining those took 80% of unanswerable questions to a decline at no cost
    in accuracy. The base model answers in loose prose that the rule often cannot tie to a
    sentence even when right: declining them halved its accuracy (47.5% -> 25%)."""
    if setting not in ("never", "support", "tuned", "always"):
        raise ValueError(f"decline_ungrounded={setting!r}: use never, support, tuned or always")
    if setting == "always" or (setting == "tuned" and tuned):
        return True
    return setting in ("support", "tuned") and mode == "support"


def default_max_active(settings: DocentSettings, engine: Engine) -> int:
    """Answers generated at once when ``max_active_answers`` is unset: what the engine can
    batch. Beyond it requests only wait inside the engine, where nothing can shed them."""
    if settings.max_active_answers is not None:
        return settings.max_active_answers
    return {"hf": settings.gen_batch_size, "openai": settings.llm_concurrency}.get(engine.kind, 64)


def is_relevant(hits: Sequence[Hit], min_relevance: float) -> bool:
    """Whether retrieval found anything worth answering from: the best dense cosine among the
    hits reaches ``min_relevance`` (hits without a dense score, bm25-only mode, always do)."""
    if not hits:
        return False
    dense = [h.scores["dense"] for h in hits if "dense" in h.scores]
    return not dense or max(dense) >= min_relevance


def cite(quotes: Sequence[str], hits: Sequence[Hit]) -> tuple[list[Citation], list[str]]:
    """Each quote tied to the first retrieved chunk that holds it (whitespace- and
    case-insensitively; punctuation-insensitively as a fallback). Quotes found nowhere are
    returned apart: the answer is then not fully grounded."""
    citations: list[Citation] = []
    unsupported: list[str] = []
    flat = [squash(h.text).lower() for h in hits]
    loose = [normalise(h.text) for h in hits]
    for q in quotes:
        needle, loose_needle = squash(q).lower(), normalise(q)
        if not loose_needle:
            continue
        at = next((i for i, t in enumerate(flat) if needle in t), None)
        if at is None:
            at = next((i for i, t in enumerate(loose) if loose_needle in t), None)
        if at is None:
            unsupported.append(q)
            continue
        h = hits[at]
        citations.append(Citation(at + 1, h.chunk_id, h.source, h.section, h.page, q, h.score))
    return citations, unsupported


@dataclass
class Evidence:
    citations: list[Citation]
    unsupported_quotes: list[str]
    ungrounded: bool  # an answer (not a decline) that no citation supports


def ground(
    question: str, answer: str, declined: bool, quotes: Sequence[str], hits: Sequence[Hit]
) -> Evidence:
    """The evidence for an answer: its quotes tied to chunks (``cite``), and, when no quote
    states the answer, the retrieved sentence that does, as an "attributed" citation. An
    answer neither supports is ungrounded; a decline never is (it claims nothing). ``answer``
    is what the output commits to (``final_answer``), the same text eval scores."""
    citations, unsupported = cite(quotes, hits)
    if declined or any(evidences(c.quote, answer, question) for c in citations):
        return Evidence(citations, unsupported, False)
    found = attribute(answer, hits, question)
    if found is None:
        return Evidence(citations, unsupported, True)
    h = hits[found.document]
    citations.append(
        Citation(found.document + 1, h.chunk_id, h.source, h.section, h.page, found.sentence,
                 h.score, kind="attributed")
    )
    return Evidence(citations, unsupported, False)
