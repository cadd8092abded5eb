"""Streaming engines on real models and a real HTTP server: deltas add up to the completion,
concurrent streams batch without changing greedy answers, failures reach the caller."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from docent.engine import ChatRequest, Completion, Engine, EngineUnavailableError, StreamDelta
from docent.engine.hf import HFEngine, StreamText
from docent.engine.openai_remote import OpenAIEngine
from docent.models import generator_path
from docent.settings import DocentSettings

from conftest import run_script

QUESTIONS = [
    "What is the capital of France?",
    "Name a colour of the sky on a clear day.",
    "What is two plus two? Answer with a number.",
    "Who wrote Hamlet?",
    "List three fruits.",
    "Write a haiku about rain.",
]


def _ask(
    question: str, max_tokens: int = 16, stop: list[str] | None = None, adapter: str | None = None
) -> ChatRequest:
    messages = [{"role": "user", "content": question}]
    return ChatRequest(messages, max_tokens=max_tokens, stop=stop or [], adapter=adapter)


async def _collect(engine: Engine, request: ChatRequest) -> tuple[list[str], Completion]:
    """Every delta's text, and the completion the last delta carries."""
    deltas: list[StreamDelta] = []
    async for delta in engine.astream(request):
        assert deltas == [] or deltas[-1].completion is None  # the completion comes last
        deltas.append(delta)
    completion = deltas[-1].completion
    assert completion is not None
    return [d.text for d in deltas], completion


# Shared text bookkeeping ----------------------------------------------------------------------
def test_stream_text_holds_back_what_the_final_text_may_drop():
    s = StreamText(stops=["\nUser:"])
    assert s.update("  Hello") == "Hello"  # leading whitespace is stripped
    assert s.update("  Hello ") == ""  # a trailing space may be the end
    assert s.update("  Hello w\ufffd") == " w"  # half a UTF-8 character waits
    assert s.update("  Hello wé\n") == "é"
    assert s.update("  Hello wé\nUs") == ""  # could be the stop string
    assert s.update("  Hello wé\nUser: more") == ""  # it was: cut there
    assert s.finish("Hello wé") == ""
    assert s.sent == "Hello wé"
    t = StreamText(stops=["\nUser:"])
    assert t.update("Hi\nUs") == "Hi"
    assert t.update("Hi\nUsing") == "\nUsing"  # not a stop after all
    assert t.finish("Hi\nUsing it") == " it"


# HFEngine: streaming with dynamic micro-batching ----------------------------------------------
@pytest.fixture(scope="module")
def hf() -> Iterator[HFEngine]:
    engine = HFEngine(generator_path("default", DocentSettings().cache_dir), batch_size=8)
    yield engine
    engine.close()


def test_hf_stream_adds_up_to_the_greedy_completion(hf):
    request = _ask(QUESTIONS[0])
    deltas, completion = asyncio.run(_collect(hf, request))
    assert "".join(deltas) == completion.text
    assert len([d for d in deltas if d]) >= 3  # it streamed, not one piece at the end
    assert "Paris" in completion.text
    assert completion == hf.generate([request])[0]  # text, token counts, finish reason
    assert hf.queue_depth() == 0


def test_hf_concurrent_streams_share_batches_and_keep_greedy_answers(hf):
    requests = [_ask(q) for q in QUESTIONS]
    alone = [hf.generate([r])[0] for r in requests]
    batches_before = hf.batches_run
    depths: list[int] = []

    async def main() -> list[tuple[list[str], Completion]]:
        async def watch() -> None:
            while True:
                depths.append(hf.queue_depth())
                await asyncio.sleep(0.01)

        watcher = asyncio.create_task(watch())
        try:
            return await asyncio.gather(*(_collect(hf, r) for r in requests))
        finally:
            watcher.cancel()

    results = asyncio.run(main())
    batches = hf.batches_run - batches_before
    assert 1 <= batches < len(requests), f"{batches} batches for {len(requests)} requests"
    assert max(depths) >= 2
    for (deltas, completion), single in zip(results, alone, strict=True):
        assert "".join(deltas) == completion.text
        assert completion == single
    assert hf.queue_depth() == 0


def test_hf_generate_and_streams_take_turns_on_the_model(hf):
    """A blocking generate (a RAFT job's thread) while streams run: same answers."""
    requests = [_ask(q, max_tokens=12) for q in QUESTIONS[:3]]
    alone = [hf.generate([r])[0] for r in requests]

    async def main() -> tuple[list[Completion], list[tuple[list[str], Completion]]]:
        blocking = asyncio.to_thread(hf.generate, requests)
        streams = asyncio.gather(*(_collect(hf, r) for r in requests))
        return await asyncio.gather(blocking, streams)

    generated, streamed = asyncio.run(main())
    assert generated == alone
    assert [c for _, c in streamed] == alone


def test_hf_stream_cuts_at_stop_strings_like_generate(hf):
    request = _ask("Count from 1 to 50, separated by commas.", max_tokens=24, stop=["5"])
    deltas, completion = asyncio.run(_collect(hf, request))
    assert "".join(deltas) == completion.text
    assert "5" not in completion.text and completion.text
    assert completion == hf.generate([request])[0]


def test_hf_unknown_adapter_fails_through_astream_and_the_engine_carries_on(hf):
    async def main() -> None:
        with pytest.raises(EngineUnavailableError, match="unknown adapter 'nope'"):
            await _collect(hf, _ask(QUESTIONS[0], adapter="nope"))
        # The failure is per batch: the worker lives on and serves the next request.
        _, completion = await _collect(hf, _ask(QUESTIONS[0], max_tokens=8))
        assert "Paris" in completion.text

    asyncio.run(main())
    assert hf._worker is not None and hf._worker.is_alive()
    assert hf.queue_depth() == 0


def test_hf_abandoned_stream_leaves_the_engine_free(hf):
    async def main() -> Completion:
        stream = hf.astream(_ask("Count from 1 to 100.", max_tokens=24))
        async for delta in stream:
            assert delta.text
            break
        await stream.aclose()  # the client went away after one delta
        for _ in range(500):  # the row stops at its next decoding step
            if hf.queue_depth() == 0:
                break
            await asyncio.sleep(0.01)
        assert hf.queue_depth() == 0
        return (await _collect(hf, _ask(QUESTIONS[0], max_tokens=8)))[1]

    assert "Paris" in asyncio.run(main()).text


# OpenAIEngine: streaming over real HTTP from a tiny local server ---------------------------------
ANSWER = ["", " Paris", " is", " the", " capital", " of", " France", ".", "\n"]


def _openai_app(seen: list[dict]):
    """A minimal OpenAI-compatible server. The model name picks a behaviour: "missing" gets a
    404, "flaky" a 503 on its first call, "broken" an error event mid-stream."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    calls: dict[str, int] = {}

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": "tiny", "object": "model"}]})

    async def chat(request: Request) -> JSONResponse | StreamingResponse:
        body = await request.json()
        seen.append(body)
        model = body["model"]
        calls[model] = calls.get(model, 0) + 1
        if model == "missing":
            return JSONResponse({"error": {"message": "model 'missing' not found"}}, 404)
        if model == "flaky" and calls[model] == 1:
            return JSONResponse({"error": {"message": "warming up"}}, 503)
        text = "".join(ANSWER)
        usage = {"prompt_tokens": 11, "completion_tokens": len(ANSWER), "total_tokens": 20}
        if not body.get("stream"):
            return JSONResponse(
                {
                    "id": "c1",
                    "object": "chat.completion",
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": usage,
                }
            )

        async def events():
            def event(delta: dict, finish: str | None = None) -> str:
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
                chunk = {"id": "c1", "object": "chat.completion.chunk", "model": model}
                return f"data: {json.dumps({**chunk, 'choices': [choice]})}\n\n"

            yield ": keep-alive\n\n"
            yield event({"role": "assistant", "content": ""})
            for n, piece in enumerate(ANSWER):
                if model == "broken" and n == 3:
                    yield f"data: {json.dumps({'error': {'message': 'out of memory'}})}\n\n"
                    return
                yield event({"content": piece})
                await asyncio.sleep(0.02)
            yield event({}, finish="stop")
            if body.get("stream_options", {}).get("include_usage"):
                yield f"data: {json.dumps({'id': 'c1', 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(
        routes=[
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/chat/completions", chat, methods=["POST"]),
        ]
    )


@pytest.fixture(scope="module")
def openai_server() -> Iterator[tuple[str, list[dict]]]:
    import uvicorn

    seen: list[dict] = []
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(_openai_app(seen), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}/v1", seen
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


def test_openai_stream_adds_up_and_reports_usage(openai_server):
    url, seen = openai_server
    engine = OpenAIEngine(url)
    assert engine.model == "tiny"
    depths: list[int] = []

    async def main() -> tuple[list[str], Completion, Completion]:
        deltas: list[str] = []
        completion = None
        async for delta in engine.astream(_ask("Capital of France?", max_tokens=20)):
            depths.append(engine.queue_depth())
            deltas.append(delta.text)
            completion = delta.completion
        assert completion is not None
        return deltas, completion, await engine.agenerate(_ask("Capital of France?"))

    try:
        deltas, completion, plain = asyncio.run(main())
        streamed_body, plain_body = seen[-2], seen[-1]
        batch = engine.generate([_ask("Capital of France?")] * 3)
    finally:
        engine.close()
    assert "".join(deltas) == completion.text == "Paris is the capital of France."
    assert len([d for d in deltas if d]) >= 5  # piece by piece, as the server sent them
    assert completion.prompt_tokens == 11 and completion.completion_tokens == len(ANSWER)
    assert completion.finish_reason == "stop" and completion.model == "tiny"
    # In flight while text arrives; done by the time the completion is handed over.
    assert set(depths[:-1]) == {1} and depths[-1] == 0 == engine.queue_depth()
    assert streamed_body["stream"] is True
    assert streamed_body["stream_options"] == {"include_usage": True}
    assert streamed_body["max_tokens"] == 20 and streamed_body["model"] == "tiny"
    assert "stream" not in plain_body  # agenerate makes one plain call
    assert plain.text == completion.text and plain.completion_tokens == len(ANSWER)
    assert [c.text for c in batch] == [completion.text] * 3


def test_openai_concurrent_streams_on_one_loop(openai_server):
    url, _ = openai_server
    engine = OpenAIEngine(url, model="tiny")
    depths: list[int] = []

    async def main() -> list[tuple[list[str], Completion]]:
        async def watch() -> None:
            while True:
                depths.append(engine.queue_depth())
                await asyncio.sleep(0.01)

        watcher = asyncio.create_task(watch())
        try:
            return await asyncio.gather(*(_collect(engine, _ask(q)) for q in QUESTIONS[:4]))
        finally:
            watcher.cancel()

    try:
        results = asyncio.run(main())
    finally:
        engine.close()
    assert max(depths) == 4  # all four in flight at once
    for deltas, completion in results:
        assert "".join(deltas) == completion.text == "Paris is the capital of France."


def test_openai_stream_failures_say_what_to_do(openai_server):
    url, _ = openai_server
    engine = OpenAIEngine(url, model="tiny")

    async def main() -> Completion:
        with pytest.raises(EngineUnavailableError, match=r"refused the request \(404\).*GET /"):
            await _collect(engine, _ask("hi", adapter="missing"))
        with pytest.raises(EngineUnavailableError, match="failed mid-stream.*out of memory"):
            await _collect(engine, _ask("hi", adapter="broken"))
        return (await _collect(engine, _ask("hi", adapter="flaky")))[1]  # 503, then fine

    try:
        flaky = asyncio.run(main())
    finally:
        engine.close()
    assert flaky.text == "Paris is the capital of France." and flaky.adapter == "flaky"
    assert engine.queue_depth() == 0

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    gone = OpenAIEngine(f"http://127.0.0.1:{closed}/v1", model="tiny")
    with pytest.raises(EngineUnavailableError, match="unreachable.*DOCENT_LLM_URL"):
        asyncio.run(_collect(gone, _ask("hi")))
    gone.close()


# AsyncVLLMEngine: in a subprocess, since vLLM spawns workers ------------------------------------
VLLM_ASYNC_SCRIPT = """
import asyncio, json, sys
from docent.engine import ChatRequest, EngineUnavailableError, build_engine
from docent.settings import DocentSettings


def ask(q, **kw):
    return ChatRequest([{"role": "user", "content": q}], max_tokens=16, **kw)


async def main(questions):
    # As the server's lifespan does: built inside the running loop, which it binds to.
    settings = DocentSettings(engine="vllm", vllm_kv_cache_gib=1, max_model_len=2048)
    engine = build_engine(settings, serving=True)
    depths = []

    async def stream(q):
        deltas, final = [], None
        async for d in engine.astream(ask(q)):
            depths.append(engine.queue_depth())
            deltas.append(d.text)
            final = d.completion or final
        return deltas, [final.text, final.completion_tokens, final.prompt_tokens,
                        final.finish_reason]

    streamed = await asyncio.gather(*(stream(q) for q in questions))
    # The blocking batch API from a worker thread while this loop keeps serving.
    blocking = await asyncio.to_thread(engine.generate, [ask(q) for q in questions])
    try:
        async for _ in engine.astream(ask("hi", adapter="x")):
            pass
        unknown = ""
    except EngineUnavailableError as exc:
        unknown = str(exc)
    # A client that disconnects after one delta: the request is aborted inside vLLM.
    gen = engine.astream(ChatRequest([{"role": "user", "content": "Count to 100."}],
                                     max_tokens=200))
    async for _ in gen:
        break
    await gen.aclose()
    await asyncio.sleep(0.5)
    left = [engine.queue_depth(), engine.llm.get_num_unfinished_requests()]
    try:
        engine.generate([ask("hi")])
        on_loop = ""
    except EngineUnavailableError as exc:
        on_loop = str(exc)
    engine.close()
    print("RESULT " + json.dumps({
        "kind": type(engine).__name__, "streamed": streamed, "max_depth": max(depths),
        "blocking": [c.text for c in blocking], "unknown": unknown, "left": left,
        "on_loop": on_loop,
    }))


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
"""


@pytest.mark.slow
def test_async_vllm_streams_concurrently_like_transformers(hf, tmp_path):
    questions = QUESTIONS[:3]
    out = run_script(tmp_path, VLLM_ASYNC_SCRIPT, json.dumps(questions))
    hf_out = hf.generate([_ask(q) for q in questions])
    assert out["kind"] == "AsyncVLLMEngine"
    assert out["max_depth"] >= 2  # the three streams were in flight together
    for (deltas, (text, n_new, n_prompt, finish)), h in zip(out["streamed"], hf_out, strict=True):
        assert "".join(deltas) == text and len([d for d in deltas if d]) >= 3
        assert 0 < n_new <= 16 and finish in ("stop", "length")
        assert n_prompt == h.prompt_tokens  # the same chat template, token for token
    texts = [s[1][0] for s in out["streamed"]]
    assert "Paris" in texts[0]
    # Greedy decoding agrees up to numerics (vLLM runs bf16 kernels): same first words.
    print("vllm:", texts, "hf:", [h.text for h in hf_out])
    agree = sum(t.split()[:3] == h.text.split()[:3] for t, h in zip(texts, hf_out, strict=True))
    assert agree >= 2
    assert [b.split()[:3] for b in out["blocking"]] == [t.split()[:3] for t in texts]
    assert "unknown adapter 'x'" in out["unknown"]
    assert out["left"] == [0, 0]
    assert "deadlock" in out["on_loop"]
