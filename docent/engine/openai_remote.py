"""A remote OpenAI-compatible server (e.g. ``vllm serve --enable-lora``), or several replicas
of one: the way to use a larger teacher or to scale serving out to GPUs and replicas.

``generate`` (batch API) posts requests from a thread pool with a blocking client.
``astream`` streams one chat completion over server-sent events (``"stream": true``) with an
``httpx.AsyncClient``; ``agenerate`` makes one non-streaming call. The servers batch
concurrent requests themselves, so the async paths send them as they come.

Every call goes through a ``ReplicaPool`` (docent.engine.replicas), which picks the replica
and keeps them health-checked. A try that fails before any text reached the caller (no
connection, a reset, a timeout, a 5xx or 429 answer) is tried again on another replica; a
4xx says the request itself is wrong and is not. Once a stream has handed text to the
caller, a failure ends it with an error: another replica would write a different answer.
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
    ReplicaState,
    StreamDelta,
)
from docent.engine.hf import StreamText
from docent.engine.replicas import Attempt, ReplicaPool, ReplicaTiming
from docent.errors import ConfigError
from docent.settings import parse_llm_urls

log = logging.getLogger(__name__)
# A server that does not take a connection within this is tried elsewhere, instead of holding
# the request for the whole timeout.
CONNECT_TIMEOUT_S = 5.0


class _Retryable(Exception):
    """A 5xx or 429 answer: worth another try, on another replica where there is one."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"{status}: {text}")
        self.status = status


def _replica_fault(exc: Exception) -> bool:
    """Whether a failed try says the replica is unwell (mark it down), not just busy (429)."""
    return not (isinstance(exc, _Retryable) and exc.status == 429)


class OpenAIEngine(Engine):
    kind = "openai"

    def __init__(
        self,
        base_url: str | Sequence[str],
        model: str | None = None,
        api_key: str | None = None,
        concurrency: int = 8,
        timeout_s: float = 120.0,
        timing: ReplicaTiming | None = None,
    ) -> None:
        """``base_url``: one server, several comma-separated, or a list (replicas of one model).
        ``concurrency`` bounds ``generate``'s requests in flight over all of them."""
        try:
            urls = parse_llm_urls(base_url)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        self.base_url = ",".join(urls)
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, CONNECT_TIMEOUT_S))
        # No base_url: one client reaches every replica (httpx pools connections per host).
        self.client = httpx.Client(headers=self.headers, timeout=self.timeout)
        # httpx's async connections belong to the event loop that opened them: one client per
        # loop (normally just the server's), dropped with its loop.
        self._aclients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient]
        self._aclients = weakref.WeakKeyDictionary()
        self._closing: set[asyncio.Task[None]] = set()
        self._inflight = 0
        self._count_lock = threading.Lock()  # generate's pool threads count too
        self.concurrency = concurrency
        self.pool = ReplicaPool(urls, self.headers, timing)
        try:
            self.pool.start()
            self.model = model or self.pool.first_model() or self._first_model()
        except BaseException:
            self.close()
            raise
        if not self.pool.fitting(self.model):
            log.warning("%s", self.pool.not_served_error(self.model))

    # Blocking calls (batch API) ----------------------------------------------------------
    def _first_model(self) -> str:
        """Asked with retries when no replica answered its first health check."""
        data = self._call("GET", "/models")
        models = [m["id"] for m in data.get("data", [])]
        if not models:
            raise EngineUnavailableError(f"{self.base_url}/models lists no model: pass one")
        return str(models[0])

    def _attempt(self, model: str | None) -> Attempt:
        if self.pool.wants_listing(model):
            self.pool.relist()
        return self.pool.attempt(model)

    def _call(
        self, method: str, path: str, body: dict[str, Any] | None = None, model: str | None = None
    ) -> dict[str, Any]:
        attempt = self._attempt(model)
        while True:
            time.sleep(attempt.pause_s())
            with attempt.next() as lease:
                try:
                    response = self.client.request(method, lease.url + path, json=body)
                    data = self._json(response)
                except (httpx.TransportError, _Retryable) as exc:
                    lease.failed(exc, down=_replica_fault(exc))
                    continue
                lease.succeeded()
                return data

    def _one(self, request: ChatRequest) -> Completion:
        body = self._body(request)
        with self._counted():
            data = self._call("POST", "/chat/completions", body, body["model"])
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
        body = self._body(request)
        with self._counted():
            data = await self._acall("POST", "/chat/completions", body, body["model"])
        return self._completion(data, request)

    async def astream(self, request: ChatRequest) -> AsyncIterator[StreamDelta]:
        body = {**self._body(request), "stream": True, "stream_options": {"include_usage": True}}
        strip = StreamText()  # Completion.text is stripped; the deltas must add up to it
        raw, finish, model, chunks_with_text = "", None, body["model"], 0
        usage: dict[str, Any] = {}
        with self._counted():
            attempt = await self._aattempt(body["model"])
            while True:
                await asyncio.sleep(attempt.pause_s())
                # Nothing has been sent yet when a try starts over: begin from scratch.
                raw, usage, finish, model, chunks_with_text = "", {}, None, body["model"], 0
                with attempt.next() as lease:
                    try:
                        async with contextlib.aclosing(self._chunks(lease.url, body)) as chunks:
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
                    except (httpx.TransportError, _Retryable) as exc:
                        lease.failed(exc, down=_replica_fault(exc))
                        if strip.sent:  # text is already out: a retry could not take it back
                            raise EngineUnavailableError(
                                f"the stream from {lease.url} broke off ({exc!r}); check that "
                                "the LLM server is up and healthy, then ask again"
                            ) from exc
                        continue
                    lease.succeeded()
                    break
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

    async def _chunks(
        self, base_url: str, body: dict[str, Any]
    ) -> AsyncGenerator[dict[str, Any], None]:
        """The JSON objects of one SSE response from ``base_url``, up to ``data: [DONE]``."""
        url = f"{base_url}/chat/completions"
        async with self._aclient().stream("POST", url, json=body) as response:
            if response.status_code >= 400:
                await response.aread()
                self._json(response)  # raises the right error for the status
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
                        f"{url} sent a malformed stream event: {data[:300]}"
                    ) from exc
                if not isinstance(chunk, dict):
                    raise EngineUnavailableError(
                        f"{url} sent a malformed stream event: {data[:300]}"
                    )
                if chunk.get("error"):
                    raise EngineUnavailableError(
                        f"the LLM server at {base_url} failed mid-stream: "
                        f"{str(chunk['error'])[:300]}"
                    )
                yield chunk

    async def _aattempt(self, model: str | None) -> Attempt:
        if self.pool.wants_listing(model):
            await asyncio.to_thread(self.pool.relist)
        return self.pool.attempt(model)

    async def _acall(
        self, method: str, path: str, body: dict[str, Any], model: str | None
    ) -> dict[str, Any]:
        attempt = await self._aattempt(model)
        while True:
            await asyncio.sleep(attempt.pause_s())
            with attempt.next() as lease:
                try:
                    response = await self._aclient().request(method, lease.url + path, json=body)
                    data = self._json(response)
                except (httpx.TransportError, _Retryable) as exc:
                    lease.failed(exc, down=_replica_fault(exc))
                    continue
                lease.succeeded()
                return data

    def _aclient(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        client = self._aclients.get(loop)
        if client is None or client.is_closed:
            client = httpx.AsyncClient(headers=self.headers, timeout=self.timeout)
            self._aclients[loop] = client
        return client

    def queue_depth(self) -> int:
        return self._inflight

    def replicas(self) -> list[ReplicaState]:
        return self.pool.states()

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

    def _json(self, response: httpx.Response) -> dict[str, Any]:
        """The body of a finished response, or the error its status calls for."""
        status, url = response.status_code, response.request.url
        if status >= 500 or status == 429:
            raise _Retryable(status, response.text[:300])
        if status >= 400:
            raise EngineUnavailableError(
                f"{url} refused the request ({status}): {response.text[:300]}{_hint(status)}"
            )
        try:
            return dict(response.json())
        except (ValueError, TypeError) as exc:
            raise EngineUnavailableError(
                f"{url} did not answer with a JSON object: {response.text[:300]}"
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

    def close(self) -> None:
        self.pool.close()
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
