"""transformers (+PEFT) backend: runs anywhere torch runs; batched greedy or sampled chat.

Two ways in:

- ``generate`` (batch API): sorts and batches a list of requests itself.
- ``astream`` (serving API): each call enqueues one request for a background worker thread
  that owns the model. The worker gathers every waiting request with the same sampling
  settings (up to ``batch_size``) into one ``model.generate`` call — dynamic micro-batching —
  and streams each row's text back to its coroutine as tokens are produced.

One lock guards the model, so a ``generate`` call (e.g. a RAFT job in a thread) and the
streaming worker take turns batch by batch and never run the model at the same time.

transformers is imported lazily so that importing this module (and ``StreamText``, which
the other streaming backends share) stays cheap.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from docent.engine.base import (
    ChatRequest,
    Completion,
    Engine,
    EngineUnavailableError,
    Progress,
    StreamDelta,
)
from docent.engine.quote_guard import HFQuoteProcessor, QuoteGuard, TokenTexts
from docent.hardware import cpu_has_bf16
from docent.prompts import chat_prompt

log = logging.getLogger(__name__)
REPLACEMENT = "\ufffd"  # what decode() shows for the first bytes of a multi-byte character


class StreamText:
    """Turns a growing raw output into stream deltas whose concatenation is exactly the final
    completion text, ``cut_at_stop(raw).strip()``.

    Call ``update`` with the whole raw text so far; it returns only text that can no longer
    change: it holds back leading and trailing whitespace (``strip`` may remove it), a
    trailing incomplete UTF-8 character (``"\\ufffd"``) and a trailing piece that could be the
    start of a stop string (a later token may complete the stop and cut it). ``finish``
    returns whatever the final text adds to what was already sent.
    """

    def __init__(self, stops: Sequence[str] = ()) -> None:
        self.stops = [s for s in stops if s]
        self.sent = ""

    def update(self, raw: str) -> str:
        text = _cut_at_stop(raw, self.stops)
        text = text[: len(text) - _partial_stop(text, self.stops)].lstrip()
        end = len(text)
        while end and (text[end - 1].isspace() or text[end - 1] == REPLACEMENT):
            end -= 1
        return self._advance(text[:end])

    def finish(self, final: str) -> str:
        if not final.startswith(self.sent):
            # Only possible if decoding a longer token list rewrote earlier text; the stream
            # cannot take text back, so the final Completion is the authority.
            log.warning("streamed text %r is not a prefix of the final %r", self.sent, final)
            return ""
        return self._advance(final)

    def _advance(self, safe: str) -> str:
        if len(safe) <= len(self.sent) or not safe.startswith(self.sent):
            return ""
        delta, self.sent = safe[len(self.sent) :], safe
        return delta


@dataclass(eq=False)
class _Job:
    """One astream call waiting for, or inside, a worker batch."""

    request: ChatRequest
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[StreamDelta | BaseException] = field(default_factory=asyncio.Queue)
    # Set by the consumer (it stopped listening) or by close(); read by the worker thread.
    # A plain bool assignment is atomic, so no lock is needed.
    cancelled: bool = False

    def send(self, item: StreamDelta | BaseException) -> None:
        """Hand an item to the awaiting coroutine from the worker thread."""
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
            self.cancelled = True


class HFEngine(Engine):
    kind = "hf"

    def __init__(
        self,
        model_path: str,
        batch_size: int = 16,
        device: str = "cpu",
        dtype: str = "auto",
        model_name: str | None = None,
        batch_wait_s: float = 0.01,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.model = model_name or model_path
        self.device = device
        self.batch_size = batch_size
        # How long the idle worker waits after the first request so that requests arriving
        # together (one burst of clients) share a batch; small next to one decoding step.
        self.batch_wait_s = batch_wait_s
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.tokenizer.padding_side = "left"  # decoder-only: pad on the left to batch
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        torch_dtype = _dtype(torch, dtype, device)
        loaded: Any = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype)
        self.net: Any = loaded.to(device).eval()
        self.adapters: dict[str, str] = {}
        self._vocab: TokenTexts | None = None  # for quote guards, built on first use
        # Tokens after which a row produces nothing more (generate pads finished rows).
        eos = loaded.generation_config.eos_token_id
        eos_ids = eos if isinstance(eos, list) else [eos]
        self._end_ids = frozenset(
            int(t)
            for t in [*eos_ids, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id]
            if t is not None
        )

        # The model, and the tokenizer's encode/decode (its Rust side fails when two threads
        # use it at once), serve one thread at a time: a generate() caller or the worker.
        self._model_lock = threading.Lock()
        # Streaming: requests wait in _pending; the worker takes batches from it.
        self._cond = threading.Condition()
        self._pending: deque[_Job] = deque()
        self._active: list[_Job] = []
        self._worker: threading.Thread | None = None
        self._closed = False
        self.batches_run = 0  # worker micro-batches so far (for tests and logs)

    # Adapters ----------------------------------------------------------------------------
    def add_adapter(self, name: str, path: str) -> None:
        from peft import PeftModel

        with self._model_lock:  # it rewraps self.net: never while a batch runs
            if name in self.adapters:
                return
            if not self.adapters:
                self.net = PeftModel.from_pretrained(self.net, path, adapter_name=name)
            else:
                self.net.load_adapter(path, adapter_name=name)
            self.net.eval()
            self.adapters[name] = path

    # Batch API ---------------------------------------------------------------------------
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
            # Lock per batch, not per call: a long RAFT build lets streaming batches in
            # between its own.
            with self._model_lock:
                completions = self._run([requests[i] for i in batch], [prompts[i] for i in batch])
            for i, completion in zip(batch, completions, strict=True):
                results[i] = completion
            start += len(batch)
            done += len(batch)
            if progress:
                progress(done, len(requests))
        return [r for r in results if r is not None]

    # Serving API -------------------------------------------------------------------------
    async def astream(self, request: ChatRequest) -> AsyncIterator[StreamDelta]:
        job = _Job(request, asyncio.get_running_loop())
        self._submit(job)
        try:
            while True:
                item = await job.out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.completion is not None:
                    return
        finally:
            # Finished, failed, or the consumer went away (client disconnected): in the
            # last case a waiting job is dropped and a running row stops at its next step.
            self._abandon(job)

    def queue_depth(self) -> int:
        with self._cond:
            return len(self._pending) + len(self._active)

    def health(self) -> str | None:
        with self._cond:
            if self._closed:
                return "the hf engine was closed"
            if self._worker is not None and not self._worker.is_alive():
                return "the hf engine's worker thread died: restart `docent serve`"
        return None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            waiting, self._pending = list(self._pending), deque()
            for job in self._active:
                job.cancelled = True  # the running batch stops at its next step
            self._cond.notify_all()
            worker = self._worker
        for job in waiting:
            job.send(EngineUnavailableError("the hf engine was closed"))
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout=60)

    def _submit(self, job: _Job) -> None:
        with self._cond:
            if self._closed:
                raise EngineUnavailableError("the hf engine was closed")
            if self._worker is None:  # started lazily: batch-only users never pay for it
                self._worker = threading.Thread(
                    target=self._work, name="docent-hf-engine", daemon=True
                )
                self._worker.start()
            self._pending.append(job)
            self._cond.notify()

    def _abandon(self, job: _Job) -> None:
        job.cancelled = True
        with self._cond, contextlib.suppress(ValueError):
            self._pending.remove(job)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                burst = len(self._pending) < self.batch_size
            if burst and self.batch_wait_s > 0:
                time.sleep(self.batch_wait_s)
            with self._cond:
                batch = self._take_batch()
                self._active = batch
            replies: list[tuple[_Job, StreamDelta | Exception]] = []
            try:
                replies = self._run_jobs(batch) if batch else []
            except Exception as exc:  # the worker must outlive any one batch
                log.exception("hf engine worker: a batch failed")
                replies = [(job, exc) for job in batch]
            # Out of the queue before the replies go: a consumer that has its final delta
            # must see queue_depth() without its request.
            with self._cond:
                self._active = []
                closed = self._closed
            for job, reply in replies:
                if closed:
                    job.send(EngineUnavailableError("the hf engine was closed"))
                elif not job.cancelled:
                    job.send(reply)

    def _take_batch(self) -> list[_Job]:
        """The oldest waiting request and every later one that can share its batch; the rest
        keep their order. Called with ``_cond`` held."""
        batch: list[_Job] = []
        rest: deque[_Job] = deque()
        key: tuple[object, ...] | None = None
        for job in self._pending:
            if job.cancelled:
                continue
            if key is None:
                key = job.request.sampling_key()
            if len(batch) < self.batch_size and job.request.sampling_key() == key:
                batch.append(job)
            else:
                rest.append(job)
        self._pending = rest
        return batch

    def _run_jobs(self, jobs: list[_Job]) -> list[tuple[_Job, StreamDelta | Exception]]:
        """One batched generate for ``jobs``; streams deltas as it goes and returns each
        job's last reply: its final delta, or the error that ended the batch."""
        states = [StreamText(job.request.stop) for job in jobs]
        streamer_cls, cancel_cls = _streaming_classes()
        try:
            with self._model_lock:
                prompts = [self._prompt(job.request) for job in jobs]
                streamer = streamer_cls(self.tokenizer, jobs, states, self._end_ids)
                completions = self._run(
                    [job.request for job in jobs],
                    prompts,
                    streamer=streamer,
                    stopping=[cancel_cls(jobs)],
                )
        except Exception as exc:
            # E.g. an unknown adapter: every job in the batch asked for the same one.
            return [(job, exc) for job in jobs]
        finally:
            with self._cond:
                self.batches_run += 1
        return [
            (job, StreamDelta(state.finish(completion.text), completion))
            for job, state, completion in zip(jobs, states, completions, strict=True)
        ]

    # The model ---------------------------------------------------------------------------
    def _prompt(self, request: ChatRequest) -> str:
        return chat_prompt(self.tokenizer, request.messages)

    def _run(
        self,
        requests: list[ChatRequest],
        prompts: list[str],
        streamer: Any = None,
        stopping: list[Any] | None = None,
    ) -> list[Completion]:
        """One batched ``model.generate`` of requests that share their sampling settings;
        the caller holds ``_model_lock``."""
        torch = self.torch
        request = requests[0]
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
        if streamer is not None:
            kwargs["streamer"] = streamer
        if stopping:
            from transformers import StoppingCriteriaList

            kwargs["stopping_criteria"] = StoppingCriteriaList(stopping)
        if any(r.quote_sources for r in requests):
            from transformers import LogitsProcessorList

            vocab = self._token_texts()
            guards = [
                QuoteGuard(vocab, r.quote_sources) if r.quote_sources else None for r in requests
            ]
            kwargs["logits_processor"] = LogitsProcessorList(
                [HFQuoteProcessor(guards, inputs["input_ids"].shape[1])]
            )
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

    def _token_texts(self) -> TokenTexts:
        if self._vocab is None:
            self._vocab = TokenTexts(self.tokenizer)
        return self._vocab

    def _adapter(self, name: str | None) -> contextlib.AbstractContextManager[Any]:
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


@functools.cache
def _streaming_classes() -> tuple[type[Any], type[Any]]:
    """The transformers hooks the worker passes to ``generate``, defined on first use so
    importing this module does not import transformers."""
    from transformers import StoppingCriteria
    from transformers.generation.streamers import BaseStreamer

    class BatchStreamer(BaseStreamer):
        """Receives each decoding step's token column for the whole batch and sends every
        row's new text to its job."""

        def __init__(
            self,
            tokenizer: Any,
            jobs: list[_Job],
            states: list[StreamText],
            end_ids: frozenset[int],
        ) -> None:
            self.tokenizer = tokenizer
            self.jobs = jobs
            self.states = states
            self.end_ids = end_ids
            self.tokens: list[list[int]] = [[] for _ in jobs]
            self.ended = [False] * len(jobs)
            self.seen_prompt = False

        def put(self, value: Any) -> None:
            if not self.seen_prompt:  # generate() first hands over the prompt ids
                self.seen_prompt = True
                return
            for i, token in enumerate(value.reshape(-1).tolist()):
                if self.ended[i]:
                    continue
                if token in self.end_ids:  # EOS, or padding after a stop string
                    self.ended[i] = True
                    continue
                self.tokens[i].append(token)
                job = self.jobs[i]
                if job.cancelled:
                    continue
                # Decode the whole row: token-by-token decoding splits multi-byte
                # characters and drops the spaces some tokenizers add between tokens.
                text = self.tokenizer.decode(self.tokens[i], skip_special_tokens=True)
                delta = self.states[i].update(str(text))
                if delta:
                    job.send(StreamDelta(delta))

        def end(self) -> None:
            pass  # the worker sends each row's final Completion once generate returns

    class CancelledRows(StoppingCriteria):
        """Finishes the rows whose consumer went away, so a batch of abandoned requests
        ends early instead of decoding to max_tokens."""

        def __init__(self, jobs: list[_Job]) -> None:
            self.jobs = jobs

        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            import torch

            return torch.tensor(
                [job.cancelled for job in self.jobs], dtype=torch.bool, device=input_ids.device
            )

    return BatchStreamer, CancelledRows


def _until_eos(ids: list[int], eos: int) -> int:
    return ids.index(eos) + 1 if eos in ids else len(ids)


def _cut_at_stop(text: str, stops: Sequence[str]) -> str:
    for stop in stops:
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text


def _partial_stop(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that is the start of a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


def _dtype(torch: Any, dtype: str, device: str) -> Any:
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16
        # On CPUs with bf16 instructions (AVX512-BF16, AMX) bf16 weights prefilled a
        # 700-token RAFT prompt 2.8x faster than fp32 here (0.48 vs 1.33 s); without them
        # bf16 matmuls are emulated and slow, so fp32.
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    return getattr(torch, dtype)
