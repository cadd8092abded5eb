"""The engine interface and its request/response types."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from docent.errors import DocentError

Progress = Callable[[int, int], None]


class EngineUnavailableError(DocentError):
    """The model backend cannot be reached or cannot run here."""


@dataclass
class ChatRequest:
    messages: list[dict[str, str]]
    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy: the same request gives the same answer
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    adapter: str | None = None  # a LoRA adapter name known to the engine; None = base model
    seed: int | None = None
    # Texts a quote may copy: set, the engine holds text between the quote markers to spans
    # of them at decode time (docent.engine.quote_guard). Empty: quotes are unguarded.
    quote_sources: list[str] = field(default_factory=list)

    def sampling_key(self) -> tuple[object, ...]:
        """Requests with equal keys can share one batch."""
        return (
            self.max_tokens,
            self.temperature,
            self.top_p,
            tuple(self.stop),
            self.adapter,
            self.seed,
        )


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" or "length"
    model: str
    adapter: str | None = None


@dataclass
class StreamDelta:
    """A piece of a streamed completion: the text added since the previous delta. The last
    delta of a stream carries the finished ``Completion`` (its text is the whole output)."""

    text: str
    completion: Completion | None = None


@dataclass(frozen=True)
class ReplicaState:
    """One remote server behind an engine, as /metrics shows it."""

    url: str
    up: bool  # passed its last health check (or answered since it failed one)
    outstanding: int  # requests sent to it and not finished
    models: tuple[str, ...] = ()  # what its GET /models listed last


class Engine(ABC):
    """Batched chat generation.

    ``generate`` is the batch API (RAFT builds, eval): safe to call from one thread at a time.
    ``astream``/``agenerate`` are the serving API: many coroutines may await them at once on
    one event loop, and the engine batches or schedules them itself.
    """

    kind: str = ""
    model: str = ""

    @abstractmethod
    def generate(
        self, requests: Sequence[ChatRequest], progress: Progress | None = None
    ) -> list[Completion]:
        """One completion per request, in order. Batches internally."""

    async def agenerate(self, request: ChatRequest) -> Completion:
        completion: Completion | None = None
        async for delta in self.astream(request):
            completion = delta.completion or completion
        if completion is None:
            raise EngineUnavailableError(f"the {self.kind} engine ended a stream without a result")
        return completion

    async def astream(self, request: ChatRequest) -> AsyncIterator[StreamDelta]:
        """Stream one completion. This fallback yields it whole once it is done."""
        completion = (await asyncio.to_thread(self.generate, [request]))[0]
        yield StreamDelta(completion.text, completion)

    def queue_depth(self) -> int:
        """Requests waiting or running inside the engine (for /metrics); 0 if unknown."""
        return 0

    def health(self) -> str | None:
        """Why this engine can never answer again (it crashed or was closed), or None while
        it can. A remote engine that is down for now is not dead: it may come back."""
        return None

    def replicas(self) -> list[ReplicaState]:
        """The remote servers this engine spreads requests over (for /metrics); none for an
        engine that generates in-process."""
        return []

    def add_adapter(self, name: str, path: str) -> None:
        raise EngineUnavailableError(f"the {self.kind} engine cannot load LoRA adapters")

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
