"""vLLM in-process for serving: ``AsyncLLM`` schedules every concurrent request continuously
(a request joins the running batch at the next step; there is no waiting for a batch to end)
and streams each one's text as it is decoded.

Event loops. ``AsyncLLM`` talks to its engine-core process over asyncio sockets and runs an
output task, all tied to ONE event loop: the engine's *home loop*.

- Built inside a running loop (``build_engine(settings, serving=True)`` in a FastAPI
  lifespan, before the server accepts requests), the home loop is that loop.
- Built with no running loop (a plain script), the home loop is chosen lazily: the first
  ``astream`` call's loop, or, if ``generate`` comes first, a private loop that the engine
  runs in a daemon thread of its own (stopped by ``close``).

``astream``/``agenerate`` called on the home loop run directly; called on another loop they
are relayed through the home loop. ``generate`` (the blocking batch API, e.g. a RAFT job in a
worker thread while the server runs) submits every request to the home loop with
``asyncio.run_coroutine_threadsafe`` and waits for the results in the calling thread. It
refuses to run ON the home loop's thread, where waiting would deadlock the loop.

vLLM starts worker processes with ``spawn``: a script that builds this engine must do so
under ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from docent.engine.base import (
    ChatRequest,
    Completion,
    Engine,
    EngineUnavailableError,
    Progress,
    StreamDelta,
)
from docent.engine.hf import StreamText
from docent.engine.vllm_engine import engine_options, sampling_extra_args
from docent.prompts import prompt_ids

log = logging.getLogger(__name__)


class AsyncVLLMEngine(Engine):
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
        """Load the model (tens of seconds). Binds to the running event loop if there is one;
        see the module docstring for the other cases."""
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
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            raise EngineUnavailableError(
                "vLLM is not installed: run `make setup`, or use --engine hf"
            ) from exc
        self.model = model_name or model_path
        self.max_model_len = max_model_len
        # Serving exports its own metrics: vLLM's periodic stats logging is off.
        args = AsyncEngineArgs(**options, disable_log_stats=True)
        self.llm: Any = AsyncLLM.from_engine_args(args)
        self.tokenizer: Any = self.llm.get_tokenizer()
        self.adapters: dict[str, tuple[int, str]] = {}
        self._inflight: set[str] = set()  # vLLM request ids between submit and finish
        self._bind_lock = threading.Lock()
        self._private: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        with contextlib.suppress(RuntimeError):  # no running loop: bind lazily
            self._loop = asyncio.get_running_loop()

    # Adapters ----------------------------------------------------------------------------
    def add_adapter(self, name: str, path: str) -> None:
        # vLLM loads an adapter's weights with the first request that names it; checking the
        # folder here turns a typo into an error at registration instead.
        if not (Path(path) / "adapter_config.json").exists():
            raise EngineUnavailableError(f"adapter {name!r}: {path} has no adapter_config.json")
        if name not in self.adapters:
            self.adapters[name] = (len(self.adapters) + 1, path)  # LoRA ids start at 1

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

    # Serving API -------------------------------------------------------------------------
    async def astream(self, request: ChatRequest) -> AsyncIterator[StreamDelta]:
        here = asyncio.get_running_loop()
        home = self._home_for(here)
        stream = self._stream(request) if home is here else self._relay(request, home, here)
        # aclosing: when our consumer stops early, the inner generator is closed right away
        # (its finally aborts the vLLM request) rather than whenever it is collected.
        async with contextlib.aclosing(stream) as deltas:
            async for delta in deltas:
                yield delta

    def queue_depth(self) -> int:
        return len(self._inflight)

    def health(self) -> str | None:
        if self.llm is None:
            return "the vllm engine was closed"
        if self.llm.errored:  # the EngineCore process died: only a restart brings it back
            return "the vllm engine process died: restart `docent serve`"
        return None

    async def _stream(self, request: ChatRequest) -> AsyncGenerator[StreamDelta, None]:
        """Runs on the home loop."""
        from vllm.exceptions import VLLMError
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        llm = self.llm
        if llm is None:
            raise EngineUnavailableError("the vllm engine was closed")
        lora = self._lora(request.adapter)
        ids = prompt_ids(self.tokenizer, request.messages)
        params = SamplingParams(
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            stop=request.stop or None,
            seed=request.seed,
            extra_args=sampling_extra_args(request),
            # Each output carries only the new text and tokens. vLLM holds back text that
            # may be the start of a stop string, so the deltas never need taking back.
            output_kind=RequestOutputKind.DELTA,
        )
        request_id = f"docent-{uuid.uuid4().hex}"
        strip = StreamText()  # the Completion's text is stripped; so must the deltas be
        raw, n_tokens, finish, finished = "", 0, None, False
        self._inflight.add(request_id)
        try:
            # Token ids from our own chat template, as HFEngine tokenizes them: both engines
            # see the same prompt, token for token. render_cmpl_async is vLLM's non-deprecated
            # way in for a prompt (it wraps the ids as an engine input).
            (engine_input,) = await llm.renderer.render_cmpl_async(
                [TokensPrompt(prompt_token_ids=ids)]
            )
            outputs = llm.generate(engine_input, params, request_id, lora_request=lora)
            async with contextlib.aclosing(outputs) as results:
                async for out in results:
                    choice = out.outputs[0]
                    raw += choice.text
                    n_tokens += len(choice.token_ids)
                    finish = choice.finish_reason or finish
                    finished = out.finished
                    delta = strip.update(raw)
                    if delta:
                        yield StreamDelta(delta)
        except VLLMError as exc:
            raise EngineUnavailableError(f"vLLM could not run the request: {exc}") from exc
        finally:
            self._inflight.discard(request_id)
            if not finished:
                # The consumer went away (client disconnected, task cancelled) or vLLM
                # failed: free the request's KV cache and its slot in the batch.
                with contextlib.suppress(Exception):
                    await llm.abort(request_id)
        completion = Completion(
            text=raw.strip(),
            prompt_tokens=len(ids),
            completion_tokens=n_tokens,
            finish_reason=finish or "stop",
            model=self.model,
            adapter=request.adapter,
        )
        yield StreamDelta(strip.finish(completion.text), completion)

    async def _relay(
        self,
        request: ChatRequest,
        home: asyncio.AbstractEventLoop,
        here: asyncio.AbstractEventLoop,
    ) -> AsyncGenerator[StreamDelta, None]:
        """Stream from a loop other than the home loop: run ``_stream`` on the home loop and
        pass its items over to this one."""
        queue: asyncio.Queue[StreamDelta | Exception | None] = asyncio.Queue()

        def put(item: StreamDelta | Exception | None) -> None:
            with contextlib.suppress(RuntimeError):  # this loop closed: nobody listens
                here.call_soon_threadsafe(queue.put_nowait, item)

        async def pump() -> None:
            try:
                async with contextlib.aclosing(self._stream(request)) as deltas:
                    async for delta in deltas:
                        put(delta)
            except Exception as exc:
                put(exc)
            else:
                put(None)

        future = asyncio.run_coroutine_threadsafe(pump(), home)
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            future.cancel()  # cancels the pump task on the home loop, which aborts in vLLM

    # Batch API ---------------------------------------------------------------------------
    def generate(
        self, requests: Sequence[ChatRequest], progress: Progress | None = None
    ) -> list[Completion]:
        if not requests:
            return []
        loop = self._home_for_blocking_call()
        # All at once: vLLM schedules them continuously, far better than fixed batches.
        futures = [asyncio.run_coroutine_threadsafe(self.agenerate(r), loop) for r in requests]
        try:
            if progress:  # called in this thread, not on the loop
                for n, _ in enumerate(concurrent.futures.as_completed(futures), start=1):
                    progress(n, len(requests))
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:  # one failed or we were interrupted: abort the rest
                f.cancel()
            raise

    # Event loops -------------------------------------------------------------------------
    def _home_for(self, here: asyncio.AbstractEventLoop) -> asyncio.AbstractEventLoop:
        with self._bind_lock:
            if self._loop is None:
                self._loop = here
            home = self._loop
        if home is not here and (home.is_closed() or not home.is_running()):
            raise EngineUnavailableError(_LOOP_GONE)
        return home

    def _home_for_blocking_call(self) -> asyncio.AbstractEventLoop:
        with self._bind_lock:
            if self._loop is None:
                self._loop = self._start_private_loop()
            home = self._loop
        try:
            here: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if here is home:
            raise EngineUnavailableError(
                "AsyncVLLMEngine.generate() was called on the event loop the engine runs on, "
                "where waiting would deadlock it: await agenerate()/astream() instead, or call "
                "generate() from a thread (asyncio.to_thread)"
            )
        if home.is_closed() or not home.is_running():
            raise EngineUnavailableError(_LOOP_GONE)
        return home

    def _start_private_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.new_event_loop()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(started.set)
            loop.run_forever()

        self._private = threading.Thread(target=run, name="docent-vllm-loop", daemon=True)
        self._private.start()
        started.wait()
        return loop

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        private, self._private = self._private, None
        loop = self._loop
        if private is not None and loop is not None:
            # Our own loop: cancel its tasks (vLLM's output handler among them) before the
            # engine core goes, so the handler neither reports the dead core as a failure
            # nor is destroyed while pending.
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(_cancel_all_tasks(), loop).result(timeout=10)
        if llm is not None:
            llm.shutdown()  # stops the engine-core process; safe from any thread
        if private is not None and loop is not None:
            loop.call_soon_threadsafe(loop.stop)
            private.join(timeout=10)
            if not private.is_alive():
                loop.close()


async def _cancel_all_tasks() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


_LOOP_GONE = (
    "the event loop this vLLM engine was bound to has stopped (its sockets and tasks died "
    "with it): build a new engine inside the loop that will use it"
)
