"""transformers (+PEFT) backend: runs anywhere torch runs; batched greedy or sampled chat."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from docent.engine.base import ChatRequest, Completion, Engine, EngineUnavailableError, Progress

log = logging.getLogger(__name__)


class HFEngine(Engine):
    kind = "hf"

    def __init__(
        self,
        model_path: str,
        batch_size: int = 16,
        device: str = "cpu",
        dtype: str = "auto",
        model_name: str | None = None,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.model = model_name or model_path
        self.device = device
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.tokenizer.padding_side = "left"  # decoder-only: pad on the left to batch
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        torch_dtype = _dtype(torch, dtype, device)
        loaded: Any = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype)
        self.net: Any = loaded.to(device).eval()
        self.adapters: dict[str, str] = {}

    def add_adapter(self, name: str, path: str) -> None:
        from peft import PeftModel

        if name in self.adapters:
            return
        if not self.adapters:
            self.net = PeftModel.from_pretrained(self.net, path, adapter_name=name)
        else:
            self.net.load_adapter(path, adapter_name=name)
        self.net.eval()
        self.adapters[name] = path

    def generate(
        self, requests: Sequence[ChatRequest], progress: Progress | None = None
    ) -> list[Completion]:
        results: list[Completion | None] = [None] * len(requests)
        prompts = [self._prompt(r) for r in requests]
        # Group by sampling settings and sort by length so each batch pads little.
        order = sorted(
            range(len(requests)), key=lambda i: (str(requests[i].sampling_key()), len(prompts[i]))
        )
        done = 0
        start = 0
        while start < len(order):
            key = requests[order[start]].sampling_key()
            batch = [order[start]]
            while (
                start + len(batch) < len(order)
                and len(batch) < self.batch_size
                and requests[order[start + len(batch)]].sampling_key() == key
            ):
                batch.append(order[start + len(batch)])
            for i, completion in zip(
                batch, self._run(requests[batch[0]], [prompts[i] for i in batch]), strict=True
            ):
                results[i] = completion
            start += len(batch)
            done += len(batch)
            if progress:
                progress(done, len(requests))
        return [r for r in results if r is not None]

    def _prompt(self, request: ChatRequest) -> str:
        return str(
            self.tokenizer.apply_chat_template(
                request.messages, tokenize=False, add_generation_prompt=True
            )
        )

    def _run(self, request: ChatRequest, prompts: list[str]) -> list[Completion]:
        torch = self.torch
        inputs = self.tokenizer(
            prompts, return_tensors="pt", padding=True, add_special_tokens=False
        ).to(self.device)
        kwargs: dict[str, Any] = {
            "max_new_tokens": request.max_tokens,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if request.temperature > 0:
            kwargs.update(do_sample=True, temperature=request.temperature, top_p=request.top_p)
            if request.seed is not None:
                torch.manual_seed(request.seed)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if request.stop:
            kwargs.update(stop_strings=request.stop, tokenizer=self.tokenizer)
        with torch.inference_mode(), self._adapter(request.adapter):
            output = self.net.generate(**inputs, **kwargs)
        prompt_len = inputs["input_ids"].shape[1]
        completions = []
        eos = self.tokenizer.eos_token_id
        for row, mask in zip(output, inputs["attention_mask"], strict=True):
            new = row[prompt_len:]
            n_new = (
                int((new != self.tokenizer.pad_token_id).sum())
                if eos != self.tokenizer.pad_token_id
                else _until_eos(new.tolist(), eos)
            )
            text = str(self.tokenizer.decode(new, skip_special_tokens=True))
            finish = "length" if n_new >= request.max_tokens else "stop"
            text = _cut_at_stop(text, request.stop)
            completions.append(
                Completion(
                    text=text.strip(),
                    prompt_tokens=int(mask.sum()),
                    completion_tokens=n_new,
                    finish_reason=finish,
                    model=self.model,
                    adapter=request.adapter,
                )
            )
        return completions

    def _adapter(self, name: str | None):  # type: ignore[no-untyped-def]
        import contextlib

        if not self.adapters:
            if name:
                raise EngineUnavailableError(f"unknown adapter {name!r}: none is loaded")
            return contextlib.nullcontext()
        if name is None:
            return self.net.disable_adapter()
        if name not in self.adapters:
            raise EngineUnavailableError(
                f"unknown adapter {name!r}; loaded: {', '.join(self.adapters)}"
            )
        self.net.set_adapter(name)
        return contextlib.nullcontext()


def _until_eos(ids: list[int], eos: int) -> int:
    return ids.index(eos) + 1 if eos in ids else len(ids)


def _cut_at_stop(text: str, stops: list[str]) -> str:
    for stop in stops:
        if stop in text:
            text = text[: text.index(stop)]
    return text


def _dtype(torch: Any, dtype: str, device: str) -> Any:
    if dtype == "auto":
        # bf16 on GPUs; fp32 on CPUs, where bf16 matmuls are slow without AMX.
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)
