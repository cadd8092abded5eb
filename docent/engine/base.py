"""The engine interface and its request/response types."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
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


class Engine(ABC):
    """Batched chat generation. Implementations must be safe to call from one thread at a
    time; serving wraps them with its own queue."""

    kind: str = ""
    model: str = ""

    @abstractmethod
    def generate(
        self, requests: Sequence[ChatRequest], progress: Progress | None = None
    ) -> list[Completion]:
        """One completion per request, in order. Batches internally."""

    async def agenerate(self, request: ChatRequest) -> Completion:
        return (await asyncio.to_thread(self.generate, [request]))[0]

    def add_adapter(self, name: str, path: str) -> None:
        raise EngineUnavailableError(f"the {self.kind} engine cannot load LoRA adapters")

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
