"""One engine in front of two: the fast one answers with the weights it was built on (the
promoted adapter merged into the base), a second one answers everything else.

vLLM on a CPU has no fast LoRA path (see ``factory.merges_adapters``), so ``docent serve``
runs it over the promoted adapter's merged weights, where nearly every request goes. A
request that names the base model or another adapter goes to a transformers engine with
PEFT, built on first use so that a server nobody asks that of never pays for it. A newly
promoted adapter is answered there too, correctly but slower, until the server restarts
and vLLM loads its merged weights.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace

from docent.engine.base import ChatRequest, Completion, Engine, Progress, StreamDelta

log = logging.getLogger(__name__)


class RoutedEngine(Engine):
    def __init__(
        self, primary: Engine, primary_adapter: str | None, make_fallback: Callable[[], Engine]
    ) -> None:
        """``primary`` answers requests whose adapter is ``primary_adapter`` (None: the base
        model), handing them on with no adapter, since its weights already are that one."""
        self.primary = primary
        self.primary_adapter = primary_adapter
        self.kind = primary.kind
        self.model = primary.model
        self._make_fallback = make_fallback
        self._fallback: Engine | None = None
        self._pending: dict[str, str] = {}  # adapters to load when the fallback is built
        self._lock = threading.Lock()

    def fallback(self) -> Engine:
        with self._lock:
            if self._fallback is None:
                log.info("building the second engine for the base model and other adapters")
                self._fallback = self._make_fallback()
                for name, path in self._pending.items():
                    self._fallback.add_adapter(name, path)
            return self._fallback

    def route(self, request: ChatRequest) -> tuple[Engine, ChatRequest]:
        if request.adapter == self.primary_adapter:
            if request.adapter is None:
                return self.primary, request
            return self.primary, replace(request, adapter=None)
        return self.fallback(), request

    def add_adapter(self, name: str, path: str) -> None:
        if name == self.primary_adapter:
            return
        with self._lock:
            self._pending[name] = path
            fallback = self._fallback
        if fallback is not None:
            fallback.add_adapter(name, path)

    def generate(
        self, requests: Sequence[ChatRequest], progress: Progress | None = None
    ) -> list[Completion]:
        routes: dict[int, list[int]] = {}
        engines: dict[int, tuple[Engine, list[ChatRequest]]] = {}
        for i, request in enumerate(requests):
            engine, one = self.route(request)
            routes.setdefault(id(engine), []).append(i)
            engines.setdefault(id(engine), (engine, []))[1].append(one)
        results: list[Completion | None] = [None] * len(requests)
        for key, (engine, batch) in engines.items():
            for i, completion in zip(routes[key], engine.generate(batch), strict=True):
                completion.adapter = requests[i].adapter
                results[i] = completion
        return [r for r in results if r is not None]

    async def astream(self, request: ChatRequest) -> AsyncIterator[StreamDelta]:
        engine, routed = self.route(request)
        async for delta in engine.astream(routed):
            if delta.completion is not None:
                delta.completion.adapter = request.adapter
            yield delta

    def queue_depth(self) -> int:
        fallback = self._fallback
        return self.primary.queue_depth() + (fallback.queue_depth() if fallback else 0)

    def health(self) -> str | None:
        fallback = self._fallback
        return self.primary.health() or (fallback.health() if fallback else None)

    def close(self) -> None:
        self.primary.close()
        if self._fallback is not None:
            self._fallback.close()
