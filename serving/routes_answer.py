"""Question answering for people and chat integrations: ``/v1/ask``, ``/v1/chat``,
``/v1/feedback``."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import StreamingResponse

from docent.errors import DocentError
from docent.settings import DocentSettings
from retrieval import Filters
from serving.auth import Principal, require_full_admin, require_user
from serving.rag import Answer, StreamEvent
from serving.schemas import AnswerOut, AskBody, ChatBody, FeedbackBody, FilterBody
from serving.state import ServingState
from serving.store import ServingStore

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", dependencies=[Depends(require_user)])


def state_of(request: Request) -> ServingState:
    return request.app.state.docent  # type: ignore[no-any-return]


def check_limits(settings: DocentSettings, text: str, k: int | None, what: str) -> None:
    """The configured limits, as 422s that name the setting to change."""
    if not text.strip():
        raise HTTPException(422, f"{what} is empty")
    if len(text) > settings.max_question_chars:
        raise HTTPException(
            422,
            f"{what} is {len(text):,} characters; the limit is {settings.max_question_chars:,} "
            "(DOCENT_MAX_QUESTION_CHARS)",
        )
    if k is not None and k > settings.max_k:
        raise HTTPException(422, f"k={k} is over the limit of {settings.max_k} (DOCENT_MAX_K)")


def filters_of(body: FilterBody | None, principal: Principal) -> Filters | None:
    """The request's filters, with the collections narrowed to what its key may read."""
    collections = principal.readable(body.collection if body else None)
    if body is None and collections is None:
        return None
    return Filters.of(body.source if body else None, body.section if body else None, collections)


def answer_out(answer: Answer, session_id: str | None = None) -> AnswerOut:
    return AnswerOut(
        id=answer.id,
        question=answer.question,
        answer=answer.answer,
        reasoning=answer.reasoning,
        declined=answer.declined,
        grounded=answer.grounded,
        ungrounded=answer.ungrounded,
        citations=[c.as_dict() for c in answer.citations],  # type: ignore[misc]
        unsupported_quotes=answer.unsupported_quotes,
        chunks=[chunk_out(h) for h in answer.hits],  # type: ignore[misc]
        model=answer.model,
        adapter=answer.adapter,
        finish_reason=answer.finish_reason,
        usage={
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens,
        },
        timings=answer.timings,
        session_id=session_id,
    )


def chunk_out(hit: Any) -> dict[str, Any]:
    return {
        "chunk_id": hit.chunk_id,
        "source": hit.source,
        "section": hit.section,
        "page": hit.page,
        "collection": hit.collection,
        "score": hit.score,
        "scores": hit.scores,
        "text": hit.text,
    }


def remember(
    state: ServingState, answer: Answer, kind: str, session_id: str | None, owner: str
) -> None:
    answer.id = state.store.save_answer(
        kind=kind,
        question=answer.question,
        answer=answer.answer,
        reasoning=answer.reasoning,
        declined=answer.declined,
        citations=[c.as_dict() for c in answer.citations],
        chunks=[chunk_out(h) for h in answer.hits],
        model=answer.model,
        adapter=answer.adapter,
        session_id=session_id,
        owner=owner,
    )


def sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


async def run_answer(
    events: AsyncIterator[StreamEvent],
    stream: bool,
    finish: Callable[[Answer], AnswerOut],
) -> Any:
    """One JSON answer, or server-sent events: ``retrieval`` (the chunks), ``delta`` (model
    text as it comes), then ``answer`` (the parsed answer with citations) or ``error``."""
    if not stream:
        answer = None
        async for event in events:
            answer = event.answer or answer
        assert answer is not None
        return finish(answer)

    # Retrieval errors (no index, bad filter) become proper HTTP errors before streaming.
    first = await anext(events)

    async def body() -> AsyncIterator[str]:
        try:
            if first.retrieved is not None:
                yield sse("retrieval", {"chunks": [chunk_out(h) for h in first.retrieved.hits]})
            async for event in events:
                if event.kind == "delta":
                    yield sse("delta", {"text": event.text})
                elif event.answer is not None:
                    yield sse("answer", finish(event.answer).model_dump())
        except DocentError as exc:
            from serving.app import status_for

            yield sse("error", {"detail": str(exc), "status": status_for(exc)})
        except Exception:  # the stream has started: report in-band, never hang the client
            log.exception("streamed answer failed")
            yield sse("error", {"detail": "internal error: see the server log", "status": 500})

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.post("/ask", response_model=AnswerOut, tags=["answers"])
async def ask(body: AskBody, request: Request, principal: Principal = Depends(require_user)) -> Any:
    """Answer one question from the knowledge base, with the reasoning and citations."""
    state = state_of(request)
    check_limits(state.settings, body.question, body.k, "question")
    events = state.rag.stream(
        body.question,
        k=body.k,
        filters=filters_of(body.filters, principal),
        adapter=body.adapter,
        max_tokens=_max_tokens(state, body.max_tokens),
    )

    def finish(answer: Answer) -> AnswerOut:
        remember(state, answer, "ask", None, principal.key_id)
        return answer_out(answer)

    return await run_answer(events, body.stream, finish)


@router.post("/chat", response_model=AnswerOut, tags=["answers"])
async def chat(
    body: ChatBody, request: Request, principal: Principal = Depends(require_user)
) -> Any:
    """One turn of a conversation. History is kept per session on the server; retrieval
    searches with the conversation, not only the last message. A session belongs to the API
    key that started it."""
    state = state_of(request)
    check_limits(state.settings, body.message, body.k, "message")
    session_id = body.session_id or state.store.new_session_id()
    state.store.check_owner(session_id, principal.owner_check())
    history = state.store.history(session_id, state.settings.chat_history_turns)
    events = state.rag.stream(
        body.message,
        k=body.k,
        filters=filters_of(body.filters, principal),
        adapter=body.adapter,
        history=history,
        mode=body.mode,
        max_tokens=_max_tokens(state, body.max_tokens),
    )

    def finish(answer: Answer) -> AnswerOut:
        remember(state, answer, f"chat:{body.mode}", session_id, principal.key_id)
        state.store.append_turn(
            session_id, body.mode, body.message, answer.answer, answer.id, principal.key_id
        )
        return answer_out(answer, session_id)

    return await run_answer(events, body.stream, finish)


def owned_session(request: Request, session_id: str, principal: Principal) -> ServingStore:
    """The store, once the session is known to be the caller's (404 otherwise)."""
    store = state_of(request).store
    store.check_owner(session_id, principal.owner_check())
    return store


@router.get("/chat/{session_id}", tags=["answers"])
async def chat_history(
    session_id: str, request: Request, principal: Principal = Depends(require_user)
) -> dict[str, Any]:
    messages = owned_session(request, session_id, principal).messages(session_id)
    return {"session_id": session_id, "messages": messages}


@router.delete("/chat/{session_id}", tags=["answers"])
async def chat_forget(
    session_id: str, request: Request, principal: Principal = Depends(require_user)
) -> dict[str, Any]:
    deleted = owned_session(request, session_id, principal).delete_session(session_id)
    return {"session_id": session_id, "deleted": deleted}


@router.post("/feedback", tags=["feedback"])
async def feedback(
    body: FeedbackBody, request: Request, principal: Principal = Depends(require_user)
) -> dict[str, Any]:
    """Rate an answer; a correction becomes a training question in the next RAFT set."""
    state = state_of(request)
    feedback_id = state.store.add_feedback(
        body.answer_id, body.rating, body.correction, body.comment, principal.owner_check()
    )
    return {"id": feedback_id, "answer_id": body.answer_id, "stored": True}


@router.get("/feedback", tags=["feedback"], dependencies=[Depends(require_full_admin)])
async def feedback_list(request: Request) -> dict[str, Any]:
    return {"feedback": state_of(request).store.feedback()}


@router.get("/feedback/export", tags=["feedback"], dependencies=[Depends(require_full_admin)])
async def feedback_export(request: Request) -> StreamingResponse:
    """Corrections as JSONL in the ``--qa-file`` format: ``docent raft build --feedback F``."""
    rows = state_of(request).store.corrections_as_qa()
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    return StreamingResponse(
        iter([lines]),
        media_type="application/x-ndjson",
        headers={"Content-Disposition": 'attachment; filename="corrections.jsonl"'},
    )


def _max_tokens(state: ServingState, asked: int | None) -> int:
    limit = state.settings.answer_max_tokens
    if asked is not None and asked > limit:
        raise HTTPException(
            422, f"max_tokens={asked} is over the limit of {limit} (DOCENT_ANSWER_MAX_TOKENS)"
        )
    return asked or limit
