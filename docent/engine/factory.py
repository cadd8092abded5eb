"""Choose and build the engine the settings ask for."""

from __future__ import annotations

import importlib.util

from docent.engine.base import Engine, EngineUnavailableError
from docent.hardware import vllm_runs_fast
from docent.models import generator_name, generator_path
from docent.settings import DocentSettings


def resolve_engine_kind(settings: DocentSettings) -> str:
    if settings.engine != "auto":
        return settings.engine
    if settings.llm_url:
        return "openai"
    if importlib.util.find_spec("vllm") is None:
        return "hf"
    return "vllm" if vllm_runs_fast() else "hf"


def build_engine(
    settings: DocentSettings, kind: str | None = None, serving: bool = False
) -> Engine:
    """The engine ``settings`` ask for. ``serving=True`` picks the variant made for many
    concurrent streaming requests where the kinds differ: vLLM's ``AsyncLLM`` (continuous
    batching; build it inside the server's running event loop) instead of the batch ``LLM``.
    The hf and openai engines serve and batch alike."""
    kind = kind or resolve_engine_kind(settings)
    if kind == "openai":
        if not settings.llm_url:
            raise EngineUnavailableError("the openai engine needs --llm-url / DOCENT_LLM_URL")
        from docent.engine.openai_remote import OpenAIEngine

        key = settings.llm_api_key.get_secret_value() if settings.llm_api_key else None
        return OpenAIEngine(settings.llm_url, settings.llm_model, key, settings.llm_concurrency)
    path = generator_path(settings.generator, settings.cache_dir)
    name = generator_name(settings.generator)
    if kind == "vllm":
        from docent.engine.vllm_async import AsyncVLLMEngine
        from docent.engine.vllm_engine import VLLMEngine

        vllm_cls = AsyncVLLMEngine if serving else VLLMEngine
        return vllm_cls(
            path,
            max_model_len=settings.max_model_len,
            kv_cache_gib=settings.vllm_kv_cache_gib,
            model_name=name,
            dtype=settings.dtype,
        )
    if kind == "hf":
        from docent.engine.hf import HFEngine

        return HFEngine(
            path,
            batch_size=settings.gen_batch_size,
            device=settings.device,
            model_name=name,
            dtype=settings.dtype,
        )
    raise EngineUnavailableError(f"unknown engine {kind!r}: use auto, vllm, hf or openai")
