"""One generation interface, three backends: vLLM in-process, transformers(+PEFT), and any
OpenAI-compatible server. The RAFT teacher, serving and eval all generate through it."""

from docent.engine.base import (
    ChatRequest,
    Completion,
    Engine,
    EngineUnavailableError,
    StreamDelta,
)
from docent.engine.factory import build_engine, resolve_engine_kind

__all__ = [
    "ChatRequest",
    "Completion",
    "Engine",
    "EngineUnavailableError",
    "StreamDelta",
    "build_engine",
    "resolve_engine_kind",
]
