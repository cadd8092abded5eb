"""A remote OpenAI-compatible server (e.g. ``vllm serve --enable-lora``): the way to use a
larger teacher or to scale serving out to GPUs and replicas."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from docent.engine.base import ChatRequest, Completion, Engine, EngineUnavailableError, Progress

log = logging.getLogger(__name__)
RETRIES = 2


class OpenAIEngine(Engine):
    kind = "openai"

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        api_key: str | None = None,
        concurrency: int = 8,
        timeout_s: float = 120.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s)
        self.concurrency = concurrency
        self.model = model or self._first_model()

    def _first_model(self) -> str:
        data = self._call("GET", "/models")
        models = [m["id"] for m in data.get("data", [])]
        if not models:
            raise EngineUnavailableError(f"{self.base_url}/models lists no model: pass one")
        return str(models[0])

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        last: Exception | None = None
        for attempt in range(RETRIES + 1):
            try:
                response = self.client.request(method, path, json=body)
                if response.status_code >= 500 or response.status_code == 429:
                    raise httpx.HTTPStatusError(
                        "retryable", request=response.request, response=response
                    )
                if response.status_code >= 400:
                    raise EngineUnavailableError(
                        f"{self.base_url}{path} refused the request ({response.status_code}): "
                        f"{response.text[:300]}"
                    )
                return dict(response.json())
            except (httpx.TransportError, httpx.HTTPStatusError) as exc:
                last = exc
                time.sleep(0.5 * 2**attempt)
        raise EngineUnavailableError(
            f"the LLM server at {self.base_url} is unreachable or failing ({last}); check "
            "--llm-url / DOCENT_LLM_URL and that the server is up"
        )

    def _one(self, request: ChatRequest) -> Completion:
        model = request.adapter or self.model  # vLLM serves LoRA adapters as model names
        body: dict[str, Any] = {
            "model": model,
            "messages": request.messages,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
        }
        if request.stop:
            body["stop"] = request.stop
        if request.seed is not None:
            body["seed"] = request.seed
        data = self._call("POST", "/chat/completions", body)
        try:
            choice = data["choices"][0]
            usage = data.get("usage") or {}
            return Completion(
                text=str(choice["message"]["content"] or "").strip(),
                prompt_tokens=int(usage.get("prompt_tokens", 0)),
                completion_tokens=int(usage.get("completion_tokens", 0)),
                finish_reason=str(choice.get("finish_reason") or "stop"),
                model=str(data.get("model", model)),
                adapter=request.adapter,
            )
        except (KeyError, IndexError, TypeError) as exc:
            raise EngineUnavailableError(
                f"{self.base_url} returned a malformed chat completion: {str(data)[:300]}"
            ) from exc

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

    def close(self) -> None:
        self.client.close()
