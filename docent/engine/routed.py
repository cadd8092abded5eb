"""One engine in front of two: the fast one answers with the weights it was built on (the
promoted adapter merged into the base), a second one answers everything else.

vLLM on a CPU has no fast LoRA path (see ``factory.merges_adapters``), so ``docent serve``
runs it over the promoted adapter's merged weights, where nearly every request goes. A
request that names the base model or another adapter goes to a transformers engine with
PEFT, built on first use so that a server nobody asks that of never pays for it. When another
adapter is promoted, the server builds a vLLM engine over its merged weights and hands it to
``swap_primary`` (``serving.state.ServingState.follow_promoted``); until then that adapter is
answered by the second engine, correctly but slower.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, replace

from docent.engine.base import ChatRequest, Completion, Engine, Progress, StreamDelta

log = logging.getLogger(__name__)
DRAIN_S = 120.0  # how long a swapped-out primary may take to finish its requests


@dataclass(eq=False)
class _Primary:
    engine: Engine
    adapter: str | None  # what its weights hold (None: the base model)
    inflight: int = 0  # generate/astream calls that picked it and have not ended


class RoutedEngine(Engine):
    drain_s = DRAIN_S

    def __init__(
        self, primary: Engine, primary_adapter: str | None, make_fallback: Callable[[], Engine]
    ) -> None:
        """``primary`` answers requests whose adapter is ``primary_adapter`` (None: the base
        model), handing them on with no adapter, since its weights already are that one."""
        self._primary = _Primary(primary, primary_adapter)
        self._primary_changed = threading.Condition()  # guards _primary, inflight, _closed
        self._closed = False
        self.kind = primary.kind
        self.model = primary.model
        self._make_fallback = make_fallback
        self._fallback: Engine | None = None
        self._pending: dict[str, str] = {}  # adapters to load when the fallback is built
        self._lock = threading.Lock()

    @property
    def primary(self) -> Engine:
        return self._primary.engine

    @property
    def primary_adapter(self) -> str | None:
        return self._primary.adapter

    def swap_primary(self, engine: Engine, adapter: str | None) -> None:
        """Send new requests for ``adapter`` to ``engine`` from now on. Requests in flight on
        the old primary finish there; it is closed when they have, or after ``drain_s``. Blocks
        until then: call it from a worker thread, never from the event loop it streams on."""
        with self._primary_changed:
            closed = self._closed
            if not closed:
                old, self._primary = self._primary, _Primary(engine, adapter)
                self.model = engine.model
        if closed:  # the server stopped while the new engine was built
            engine.close()
            return
        with self._primary_changed:
            drained = self._primary_changed.wait_for(lambda: old.inflight == 0, self.drain_s)
            left = old.inflight
        if not drained:
            log.warning(
                "closing the old engine with %d requests unfinished after %.0f s",
                left,
                self.drain_s,
            )
        old.engine.close()
        log.info("the fast engine now answers for %s", adapter or "the base model")

    @contextlib.contextmanager
    def _lease(self) -> Iterator[_Primary]:
        """The primary now, counted as in use until the block ends (a swap waits for that)."""
        with self._primary_changed:
            primary = self._primary
            primary.inflight += 1
        try:
            yield primary
        finally:
            with self._primary_changed:
                primary.inflight -= 1
                self._primary_changed.notify_all()

    def fallback(self) -> Engine:
        with self._lock:
            if self._fallback is None:
                log.info("building the second engine for the base model and other adapters")
                self._fallback = self._make_fallback()
                for name, path in self._pending.items():
                    self._fallback.add_adapter(name, path)
            return self._fallback

    def _route(self, primary: _Primary, request: ChatRequest) -> tuple[Engine, ChatRequest]:
        if request.adapter == primary.adapter:
            if request.adapter is None:
                return primary.engine, request
            return primary.engine, replace(request, adapter=None)
        return self.fallback(), request

    def add_adapter(self, name: str, path: str) -> None:
        # Kept for the fallback even when the primary holds it: after a swap it answers there.
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
        results: list[Completion | None] = [None] * len(requests)
        with self._lease() as primary:
            for i, request in enumerate(requests):
                engine, one = self._route(primary, request)
                routes.setdefault(id(engine), []).append(i)
                engines.setdefault(id(engine), (engine, []))[1].append(one)
            for key, (engine, batch) in engines.items():
                for i, completion in zip(routes[key], engine.generate(batch), strict=True):
                    completion.adapter = requests[i].adapter
                    results[i] = completion
        return [r for r in results if r is not None]

    async def astream(self, request: ChatRequest) -> AsyncIterator[StreamDelta]:
        with self._lease() as primary:
            engine, routed = self._route(primary, request)
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
        with self._primary_changed:
            self._closed = True
        self.primary.close()
        if self._fallback is not None:
            self._fallback.close()
