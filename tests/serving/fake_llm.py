"""A stand-in for a remote OpenAI-compatible LLM server (the one thing in these fault tests we
do not own): it answers every chat in the RAFT format, streamed a word at a time with a
delay, so a test can kill it mid-stream. Run: ``python fake_llm.py PORT [DELAY_S] [MODELS]``.

MODELS (comma-separated, default ``fake``) is what ``GET /v1/models`` lists; a chat naming
another model gets a 404, as from vLLM. ``GET /stats`` tells a test what this replica was
asked: chats per model, and the streamed and plain chats in flight now."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

REPLY = (
    "The document says: ##begin_quote##Acme refunds any order within 30 days of delivery."
    "##end_quote## So refunds are possible for 30 days. <ANSWER>: within 30 days"
)
DELAY_S = float(sys.argv[2]) if len(sys.argv) > 2 else 0.05
MODELS = sys.argv[3].split(",") if len(sys.argv) > 3 else ["fake"]
CHATS: Counter[str] = Counter()  # chats asked, per model
ACTIVE: Counter[str] = Counter()  # chats in flight, "stream" or "plain"
app = FastAPI()


@app.get("/v1/models")
async def models() -> dict:
    return {"object": "list", "data": [{"id": m, "object": "model"} for m in MODELS]}


@app.get("/stats")
async def stats() -> dict:
    return {"chats": dict(CHATS), "active": dict(ACTIVE)}


@app.post("/v1/chat/completions")
async def chat(request: Request) -> object:
    body = await request.json()
    if body.get("model") not in MODELS:
        message = f"The model `{body.get('model')}` does not exist."
        return JSONResponse({"error": {"message": message, "code": 404}}, status_code=404)
    CHATS[body["model"]] += 1
    words = REPLY.split(" ")
    usage = {"prompt_tokens": 100, "completion_tokens": len(words), "total_tokens": 100}
    if not body.get("stream"):
        ACTIVE["plain"] += 1
        try:
            await asyncio.sleep(DELAY_S * len(words))
        finally:
            ACTIVE["plain"] -= 1
        return {
            "id": "fake",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": "fake",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": REPLY},
                    "finish_reason": "stop",
                }
            ],
            "usage": usage,
        }

    async def events() -> AsyncIterator[str]:
        ACTIVE["stream"] += 1
        try:
            for n, word in enumerate(words):
                piece = word if n == 0 else " " + word
                chunk = {"model": "fake", "choices": [{"index": 0, "delta": {"content": piece}}]}
                yield f"data: {json.dumps(chunk)}\n\n"
                await asyncio.sleep(DELAY_S)
        finally:
            ACTIVE["stream"] -= 1
        end = {"model": "fake", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        yield f"data: {json.dumps(end)}\n\n"
        yield f"data: {json.dumps({'model': 'fake', 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
