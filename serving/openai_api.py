"""OpenAI-compatible chat: ``POST /v1/chat/completions`` and ``GET /v1/models``, retrieval-
augmented, so an existing chat integration (or the official ``openai`` client) works as is.

Model names: ``docent`` is the served default (the promoted adapter), ``docent:base`` the base
model, ``docent:NAME`` an adapter. The conversation is in the request, as OpenAI clients
expect; nothing is stored but the answer (for feedback). The message content is the final
answer plus a "Sources:" line (or a line saying no document supports it); Docent's own fields
(answer id, citations, reasoning, ``ungrounded``) ride in a ``docent`` object that OpenAI
clients keep as an extra field.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import StreamingResponse

from docent.errors import DocentError
from docent.prompts import ANSWER_PREFIX, DECLINE_ANSWER, format_answer
from serving.auth import Principal, require_user
from serving.rag import UNSUPPORTED, Answer, declines_ungrounded
from serving.routes_answer import check_limits, filters_of, remember, state_of
from serving.schemas import ChatCompletionBody, DocentOptions, OAIMessage

router = APIRouter(prefix="/v1", dependencies=[Depends(require_user)], tags=["openai"])
MODEL = "docent"


def adapter_for(model: str) -> str | None:
    """``docent`` -> served default (None), ``docent:base`` -> base, ``docent:x`` -> x."""
    name, _, variant = model.partition(":")
    if name != MODEL:
        raise HTTPException(
            404, f"model {model!r} does not exist: GET /v1/models lists 'docent' and variants"
        )
    return variant or None


@router.get("/models")
async def models(request: Request) -> dict[str, Any]:
    state = state_of(request)
    now = int(time.time())
    ids = [MODEL, f"{MODEL}:base"] + [f"{MODEL}:{a.name}" for a in state.adapters.compatible()]
    return {
        "object": "list",
        "data": [{"id": i, "object": "model", "created": now, "owned_by": "docent"} for i in ids],
    }


def text_of(message: OAIMessage) -> str:
    if isinstance(message.content, str):
        return message.content
    if not message.content:
        return ""
    # Content parts: keep the text ones (Docent answers from documents, not images).
    return "\n".join(str(p.get("text", "")) for p in message.content if p.get("type") == "text")


def split_conversation(
    messages: list[OAIMessage],
) -> tuple[str, list[dict[str, str]], str | None]:
    """(last user message, earlier turns, the integration's system instructions)."""
    if messages[-1].role != "user":
        raise HTTPException(422, "the last message must come from the user")
    system = "\n".join(text_of(m) for m in messages if m.role in ("system", "developer"))
    history = [
        {"role": m.role, "content": text_of(m)}
        for m in messages[:-1]
        if m.role in ("user", "assistant") and text_of(m).strip()
    ]
    return text_of(messages[-1]), history, system or None


UNGROUNDED_LINE = "\n\nSources: none of the retrieved documents supports this answer."


def content_for(answer: Answer, options: DocentOptions) -> str:
    return final_text(answer, options.include_reasoning) + sources_line(answer, options)


def final_text(answer: Answer, raw: bool) -> str:
    """The answer, or with ``raw`` the whole RAFT output; a withheld ungrounded answer's raw
    output ends with the model's answer, so Docent's decline follows it."""
    if not raw:
        return answer.answer
    if answer.declined and answer.ungrounded:
        return f"{answer.raw}\n\n{format_answer(UNSUPPORTED, DECLINE_ANSWER)}"
    return answer.raw


def sources_line(answer: Answer, options: DocentOptions) -> str:
    if not options.sources_in_content:
        return ""
    if answer.ungrounded and not answer.declined:
        return UNGROUNDED_LINE  # never let an unsupported answer look sourced
    if not answer.citations:
        return ""
    seen: list[str] = []
    for c in answer.citations:
        label = f"{c.source} ({c.section})" if c.section else c.source
        if label not in seen:
            seen.append(label)
    return "\n\nSources: " + "; ".join(seen)


def docent_extra(answer: Answer) -> dict[str, Any]:
    return {
        "answer_id": answer.id,
        "answer": answer.answer,
        "reasoning": answer.reasoning,
        "declined": answer.declined,
        "grounded": answer.grounded,
        "ungrounded": answer.ungrounded,
        "citations": [c.as_dict() for c in answer.citations],
        "adapter": answer.adapter,
    }


@router.post("/chat/completions")
async def chat_completions(
    body: ChatCompletionBody, request: Request, principal: Principal = Depends(require_user)
) -> Any:
    state = state_of(request)
    options = body.docent or DocentOptions()
    question, history, system = split_conversation(body.messages)
    check_limits(state.settings, question, options.k, "the last user message")
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is not None and max_tokens > state.settings.answer_max_tokens:
        max_tokens = state.settings.answer_max_tokens  # OpenAI clients send big defaults
    events = state.rag.stream(
        question,
        k=options.k,
        filters=filters_of(options.filters, principal),
        adapter=adapter_for(body.model),
        history=history[-state.settings.chat_history_turns :]
        if state.settings.chat_history_turns
        else [],
        mode=options.mode,
        extra_instructions=system,
        max_tokens=max_tokens,
        temperature=body.temperature or 0.0,
        top_p=body.top_p or 1.0,
        seed=body.seed,
    )
    completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())

    def finish(answer: Answer) -> Answer:
        remember(state, answer, "openai", None, principal.key_id)
        return answer

    if not body.stream:
        answer = None
        async for event in events:
            answer = event.answer or answer
        assert answer is not None
        finish(answer)
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": body.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content_for(answer, options)},
                    "finish_reason": _finish(answer),
                }
            ],
            "usage": _usage(answer),
            "docent": docent_extra(answer),
        }

    first = await anext(events)  # retrieval errors become HTTP errors, not broken streams
    assert first.kind == "retrieved"
    include_usage = bool((body.stream_options or {}).get("include_usage"))

    def chunk(delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> str:
        payload = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": body.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
            **extra,
        }
        return f"data: {json.dumps(payload)}\n\n"

    async def stream() -> AsyncIterator[str]:
        yield chunk({"role": "assistant", "content": ""})
        # Where an ungrounded answer would be declined, the answer line is held back until
        # the evidence is checked: a client must never be streamed the answer it then loses.
        hold = declines_ungrounded(
            state.settings.decline_ungrounded, options.mode, first.adapter is not None
        )
        shaper = AnswerStreamer(raw=options.include_reasoning, hold=hold)
        try:
            async for event in events:
                if event.kind == "delta":
                    piece = shaper.feed(event.text)
                    if piece:
                        yield chunk({"content": piece})
                elif event.answer is not None:
                    answer = finish(event.answer)
                    rest = shaper.finish(answer) + sources_line(answer, options)
                    if rest:
                        yield chunk({"content": rest})
                    yield chunk({}, _finish(answer), docent=docent_extra(answer))
                    if include_usage:
                        usage = {
                            "id": completion_id,
                            "object": "chat.completion.chunk",
                            "created": created,
                            "model": body.model,
                            "choices": [],
                            "usage": _usage(answer),
                        }
                        yield f"data: {json.dumps(usage)}\n\n"
        except DocentError as exc:
            yield f"data: {json.dumps({'error': {'message': str(exc), 'type': 'docent'}})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


class AnswerStreamer:
    """Turns the model's RAFT output (reasoning, quotes, then ``<ANSWER>: ...``) into a stream
    of the final answer only: text is held back until the answer marker appears, then passed
    through up to the end of the answer's line. With ``hold`` the answer comes whole at the end
    (it may yet be replaced by a decline); the raw output streams either way, since a decline
    is appended to it. The streamed pieces always join to exactly the non-streamed content."""

    def __init__(self, raw: bool = False, hold: bool = False) -> None:
        self.raw = raw
        self.hold = hold
        self.buffer = ""
        self.sent = ""

    def feed(self, text: str) -> str:
        self.buffer += text
        if self.hold and not self.raw:
            return ""
        if self.raw:
            # Hold back surrounding whitespace: the final text is stripped.
            shown = self.buffer.strip()
        else:
            _, sep, tail = self.buffer.partition(ANSWER_PREFIX)
            if not sep:
                return ""
            shown = tail.lstrip()
            if "\n" in shown:
                shown = shown[: shown.index("\n")]
            shown = shown.rstrip()
        return self._send(shown[len(self.sent) :]) if shown.startswith(self.sent) else ""

    def finish(self, answer: Answer) -> str:
        final = final_text(answer, self.raw)
        if final.startswith(self.sent):
            return self._send(final[len(self.sent) :])
        return ""  # cannot happen with a consistent engine; never send text twice

    def _send(self, piece: str) -> str:
        self.sent += piece
        return piece


def _finish(answer: Answer) -> str:
    return "length" if answer.finish_reason == "length" else "stop"


def _usage(answer: Answer) -> dict[str, int]:
    return {
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "total_tokens": answer.prompt_tokens + answer.completion_tokens,
    }
