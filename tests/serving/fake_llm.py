"""A stand-in for a remote OpenAI-compatible LLM server (the one thing in these fault tests we
do not own): it answers every chat in the RAFT format, streamed a word at a time with a
delay, so a test can kill it mid-stream. Run: ``python fake_llm.py PORT [DELAY_S]``."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

REPLY = (
    "The document says: ##begin_quote##Acme refunds any order within 30 days of delivery."
    "##end_quote## So refunds are possible for 30 days. <ANSWER>: within 30 days"
)
DELAY_S = float(sys.argv[2]) if len(sys.argv) > 2 else 0.05
app = FastAPI()


@app.get("/v1/models")
async def models() -> dict:
    return {"object": "list", "data": [{"id": "fake", "object": "model"}]}


@app.post("/v1/chat/completions")
async def chat(request: Request) -> object:
    body = await request.json()
    words = REPLY.split(" ")
    usage = {"prompt_tokens": 100, "completion_tokens": len(words), "total_tokens": 100}
    if not body.get("stream"):
        await asyncio.sleep(DELAY_S * len(words))
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
        for n, word in enumerate(words):
            piece = word if n == 0 else " " + word
            chunk = {"model": "fake", "choices": [{"index": 0, "delta": {"content": piece}}]}
            yield f"data: {json.dumps(chunk)}\n\n"
            await asyncio.sleep(DELAY_S)
        end = {"model": "fake", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        yield f"data: {json.dumps(end)}\n\n"
        yield f"data: {json.dumps({'model': 'fake', 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
