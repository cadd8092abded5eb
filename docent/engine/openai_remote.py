"""A remote OpenAI-compatible server (e.g. ``vllm serve --enable-lora``): the way to use a
larger teacher or to scale serving out to GPUs and replicas.

``generate`` (batch API) posts requests from a thread pool with a blocking client.
``astream`` streams one chat completion over server-sent events (``"stream": true``) with an
``httpx.AsyncClient``; ``agenerate`` makes one non-streaming call. The server batches
concurrent requests itself, so the async paths send them as they come.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from docent.engine.base import (
    ChatRequest,
    Completion,
    Engine,
    EngineUnavailableError,
    Progress,
    StreamDelta,
)
from docent.engine.hf import StreamText

log = logging.getLogger(__name__)
RETRIES = 2


class _Retryable(Exception):
    """A 5xx or 429 answer: worth another try after a pause."""


class OpenAIEngine(Engine):
    kind = "openai"

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        api_key: str | None = None,
        concurrency: int = 8,
        timeout_s: float = 120.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout_s = timeout_s
        self.client = httpx.Client(base_url=self.base_url, headers=self.headers, timeout=timeout_s)
        # httpx's async connections belong to the event loop that opened them: one client per
        # loop (normally just the server's), dropped with its loop.
        self._aclients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient]
        self._aclients = weakref.WeakKeyDictionary()
        self._closing: set[asyncio.Task[None]] = set()
        self._inflight = 0
        self._count_lock = threading.Lock()  # generate's pool threads count too
        self.concurrency = concurrency
        self.model = model or self._first_model()

    # Blocking calls (batch API) ----------------------------------------------------------
    def _first_model(self) -> str:
        data = self._call("GET", "/models")
        models = [m["id"] for m in data.get("data", [])]
        if not models:
            raise EngineUnavailableError(f"{self.base_url}/models lists no model: pass one")
        return str(models[0])

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        last: Exception | None = None
        for attempt in range(RETRIES + 1):
            try:
                response = self.client.request(method, path, json=body)
                return self._json(response, path)
            except (httpx.TransportError, _Retryable) as exc:
                last = exc
                time.sleep(0.5 * 2**attempt)
        raise self._unreachable(last)

    def _one(self, request: ChatRequest) -> Completion:
        with self._counted():
            data = self._call("POST", "/chat/completions", self._body(request))
        return self._completion(data, request)

    def generate(
        self, requests: Sequence[ChatRequest], progress: Progress | None = None
    ) -> list[Completion]:
        results: list[Completion] = []
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            for n, completion in enumerate(pool.map(self._one, requests), start=1):
                results.append(completion)
                if progress:
                    progress(n, len(requests))
        return results

    # Async calls (serving API) -----------------------------------------------------------
    async def agenerate(self, request: ChatRequest) -> Completion:
        # One plain call: nobody watches the text arrive, so SSE would only add overhead.
        with self._counted():
            data = await self._acall("POST", "/chat/completions", self._body(request))
        return self._completion(data, request)

    async def astream(self, request: ChatRequest) -> AsyncIterator[StreamDelta]:
        body = {**self._body(request), "stream": True, "stream_options": {"include_usage": True}}
        strip = StreamText()  # Completion.text is stripped; the deltas must add up to it
        raw, finish, model, chunks_with_text = "", None, body["model"], 0
        usage: dict[str, Any] = {}
        with self._counted():
            for attempt in range(RETRIES + 1):
                # Nothing has been sent yet when a try starts over: begin from scratch.
                raw, usage, finish, model, chunks_with_text = "", {}, None, body["model"], 0
                try:
                    async with contextlib.aclosing(self._chunks(body)) as chunks:
                        async for chunk in chunks:
                            usage = chunk.get("usage") or usage
                            model = chunk.get("model") or model
                            for choice in chunk.get("choices") or []:
                                piece = (choice.get("delta") or {}).get("content") or ""
                                raw += piece
                                chunks_with_text += bool(piece)
                                finish = choice.get("finish_reason") or finish
                            delta = strip.update(raw)
                            if delta:
                                yield StreamDelta(delta)
                    break
                except (httpx.TransportError, _Retryable) as exc:
                    if strip.sent:  # text is already out: a retry could not take it back
                        raise EngineUnavailableError(
                            f"the stream from {self.base_url} broke off ({exc!r}); check that "
                            "the LLM server is up and healthy, then ask again"
                        ) from exc
                    if attempt == RETRIES:
                        raise self._unreachable(exc) from exc
                    await asyncio.sleep(0.5 * 2**attempt)
        completion = Completion(
            text=raw.strip(),
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            # Without usage (a server that ignores stream_options), count the chunks that
            # carried text: servers send about one token per chunk.
            completion_tokens=int(usage.get("completion_tokens", chunks_with_text)),
            finish_reason=str(finish or "stop"),
            model=str(model),
            adapter=request.adapter,
        )
        yield StreamDelta(strip.finish(completion.text), completion)

    async def _chunks(self, body: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        """The JSON objects of one SSE response, up to ``data: [DONE]``."""
        path = "/chat/completions"
        async with self._aclient().stream("POST", path, json=body) as response:
            if response.status_code >= 400:
                await response.aread()
                self._json(response, path)  # raises the right error for the status
            async for line in response.aiter_lines():
                # Only data lines matter: skip blank separators, ": keep-alive" comments and
                # event:/id: fields. OpenAI-style servers put each event on one data line.
                if not line.startswith("data:"):
                    continue
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    return
                try:
                    chunk = json.loads(data)
                except json.JSONDecodeError as exc:
                    raise EngineUnavailableError(
                        f"{self.base_url}{path} sent a malformed stream event: {data[:300]}"
                    ) from exc
                if not isinstance(chunk, dict):
                    raise EngineUnavailableError(
                        f"{self.base_url}{path} sent a malformed stream event: {data[:300]}"
                    )
                if chunk.get("error"):
                    raise EngineUnavailableError(
                        f"the LLM server at {self.base_url} failed mid-stream: "
                        f"{str(chunk['error'])[:300]}"
                    )
                yield chunk

    async def _acall(self, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        last: Exception | None = None
        for attempt in range(RETRIES + 1):
            try:
                response = await self._aclient().request(method, path, json=body)
                return self._json(response, path)
            except (httpx.TransportError, _Retryable) as exc:
                last = exc
                await asyncio.sleep(0.5 * 2**attempt)
        raise self._unreachable(last)

    def _aclient(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        client = self._aclients.get(loop)
        if client is None or client.is_closed:
            client = httpx.AsyncClient(
                base_url=self.base_url, headers=self.headers, timeout=self.timeout_s
            )
            self._aclients[loop] = client
        return client

    def queue_depth(self) -> int:
        return self._inflight

    @contextlib.contextmanager
    def _counted(self) -> Iterator[None]:
        with self._count_lock:
            self._inflight += 1
        try:
            yield
        finally:
            with self._count_lock:
                self._inflight -= 1

    # Shared ------------------------------------------------------------------------------
    def _body(self, request: ChatRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": request.adapter or self.model,  # vLLM serves LoRA adapters as models
            "messages": request.messages,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
        }
        if request.stop:
            body["stop"] = request.stop
        if request.seed is not None:
            body["seed"] = request.seed
        return body

    def _json(self, response: httpx.Response, path: str) -> dict[str, Any]:
        """The body of a finished response, or the error its status calls for."""
        status = response.status_code
        if status >= 500 or status == 429:
            raise _Retryable(f"{status}: {response.text[:300]}")
        if status >= 400:
            raise EngineUnavailableError(
                f"{self.base_url}{path} refused the request ({status}): "
                f"{response.text[:300]}{_hint(status)}"
            )
        try:
            return dict(response.json())
        except (ValueError, TypeError) as exc:
            raise EngineUnavailableError(
                f"{self.base_url}{path} did not answer with a JSON object: {response.text[:300]}"
            ) from exc

    def _completion(self, data: dict[str, Any], request: ChatRequest) -> Completion:
        try:
            choice = data["choices"][0]
            usage = data.get("usage") or {}
            return Completion(
                text=str(choice["message"]["content"] or "").strip(),
                prompt_tokens=int(usage.get("prompt_tokens", 0)),
                completion_tokens=int(usage.get("completion_tokens", 0)),
                finish_reason=str(choice.get("finish_reason") or "stop"),
                model=str(data.get("model", request.adapter or self.model)),
                adapter=request.adapter,
            )
        except (KeyError, IndexError, TypeError) as exc:
            raise EngineUnavailableError(
                f"{self.base_url} returned a malformed chat completion: {str(data)[:300]}"
            ) from exc

    def _unreachable(self, cause: Exception | None) -> EngineUnavailableError:
        return EngineUnavailableError(
            f"the LLM server at {self.base_url} is unreachable or failing ({cause}); check "
            "--llm-url / DOCENT_LLM_URL and that the server is up"
        )

    def close(self) -> None:
        self.client.close()
        # Async clients close on their own loop; one that is gone took its sockets with it.
        try:
            here: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        for loop, client in list(self._aclients.items()):
            if loop.is_closed() or client.is_closed:
                continue
            if loop is here:
                task = loop.create_task(client.aclose())
                self._closing.add(task)  # asyncio keeps only weak references to tasks
                task.add_done_callback(self._closing.discard)
            elif loop.is_running():
                with contextlib.suppress(Exception):
                    asyncio.run_coroutine_threadsafe(client.aclose(), loop).result(timeout=5)
        self._aclients.clear()


def _hint(status: int) -> str:
    if status in (401, 403):
        return "; check --llm-api-key / DOCENT_LLM_API_KEY"
    if status == 404:
        return "; check the model or adapter name (GET /models lists what the server serves)"
    return ""
