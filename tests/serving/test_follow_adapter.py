"""A running server follows the promoted adapter without a restart: RoutedEngine swaps its
fast engine (unit tests over scripted engines, since real ones cost a vLLM start each), and
the API serves a newly promoted adapter and rolls back (the session's live server)."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from docent.engine.base import ChatRequest, Completion, Engine, Progress, StreamDelta
from docent.engine.routed import RoutedEngine

from conftest import ADAPTER, make_lora_adapter

INVITE = "How long is an invitation link to join a workspace valid?"


class ScriptedEngine(Engine):
    """Answers with its own name. Until ``gate`` is set, a request holds there after
    ``started`` is set (a stream after its first delta)."""

    kind = "scripted"

    def __init__(self, name: str, hold: bool = False) -> None:
        self.model = name
        self.gate = threading.Event()
        if not hold:
            self.gate.set()
        self.started = threading.Event()
        self.seen: list[ChatRequest] = []
        self.adapters: list[str] = []
        self.closed = False

    def generate(
        self, requests: Sequence[ChatRequest], progress: Progress | None = None
    ) -> list[Completion]:
        self.seen.extend(requests)
        self.started.set()
        assert self.gate.wait(10)
        return [Completion(self.model, 1, 1, "stop", self.model) for _ in requests]

    async def astream(self, request: ChatRequest) -> AsyncIterator[StreamDelta]:
        self.seen.append(request)
        yield StreamDelta(f"{self.model} ")
        self.started.set()
        assert await asyncio.to_thread(self.gate.wait, 10)
        yield StreamDelta("done", Completion(f"{self.model} done", 1, 2, "stop", self.model))

    def add_adapter(self, name: str, path: str) -> None:
        self.adapters.append(name)

    def close(self) -> None:
        self.closed = True


def ask(adapter: str | None) -> ChatRequest:
    return ChatRequest([{"role": "user", "content": "hi"}], adapter=adapter)


def routed_over(old: ScriptedEngine, fallback: ScriptedEngine) -> RoutedEngine:
    routed = RoutedEngine(old, "a", lambda: fallback)
    routed.add_adapter("a", "/adapters/a")
    routed.add_adapter("b", "/adapters/b")
    return routed


def wait_until(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_swap_sends_new_requests_to_the_new_primary_and_closes_the_old_one_when_drained():
    old, new = ScriptedEngine("old", hold=True), ScriptedEngine("new")
    fallback = ScriptedEngine("hf")
    routed = routed_over(old, fallback)
    with ThreadPoolExecutor(2) as pool:
        inflight = pool.submit(routed.generate, [ask("a")])
        assert old.started.wait(10)
        swap = pool.submit(routed.swap_primary, new, "b")
        wait_until(lambda: routed.primary is new)

        tuned, previous = routed.generate([ask("b"), ask("a")])
        assert (tuned.model, tuned.adapter) == ("new", "b")
        assert new.seen[-1].adapter is None  # its weights already are adapter b
        # The adapter the old primary held now goes to the fallback, which knows it.
        assert (previous.model, previous.adapter) == ("hf", "a") and "a" in fallback.adapters
        assert not old.closed and not swap.done()  # a request is still running there

        old.gate.set()
        assert inflight.result(10)[0].model == "old"  # it finished where it started
        swap.result(10)
    assert old.closed and not new.closed and routed.primary_adapter == "b"


def test_a_stream_in_flight_finishes_on_the_old_primary():
    old, new = ScriptedEngine("old", hold=True), ScriptedEngine("new")
    routed = routed_over(old, ScriptedEngine("hf"))

    async def main() -> None:
        stream = routed.astream(ask("a"))
        assert (await anext(stream)).text == "old "
        swap = asyncio.create_task(asyncio.to_thread(routed.swap_primary, new, "b"))
        while routed.primary is not new:
            await asyncio.sleep(0.01)
        assert (await routed.agenerate(ask("b"))).model == "new"
        assert not old.closed
        old.gate.set()
        rest = [delta async for delta in stream]
        assert rest[-1].completion is not None and rest[-1].completion.model == "old"
        assert rest[-1].completion.adapter == "a"
        await swap

    asyncio.run(main())
    assert old.closed and not new.closed


def test_the_old_primary_is_closed_after_a_bounded_wait_and_a_closed_engine_takes_no_new_one():
    old, new = ScriptedEngine("old", hold=True), ScriptedEngine("new")
    routed = routed_over(old, ScriptedEngine("hf"))
    routed.drain_s = 0.2
    stuck = threading.Thread(target=routed.generate, args=([ask("a")],))
    stuck.start()
    assert old.started.wait(10)
    started = time.monotonic()
    routed.swap_primary(new, "b")
    assert old.closed and time.monotonic() - started < 5
    old.gate.set()
    stuck.join(10)

    routed.close()
    late = ScriptedEngine("late")
    routed.swap_primary(late, "c")  # the server stopped while it was built
    assert late.closed and routed.primary is new


def test_the_server_swaps_its_fast_engine_and_keeps_the_old_one_when_a_rebuild_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """follow_promoted on a RoutedEngine, with the merge and the vLLM build scripted."""
    import serving.state as serving_state
    from docent.models import generator_id
    from docent.settings import DocentSettings
    from raft.adapters import AdapterError, AdapterInfo, AdapterRegistry
    from serving.adapters import AdapterCatalog

    folder = tmp_path / "adapters"
    for name in ("a", "b"):
        (folder / name).mkdir(parents=True)
        (folder / name / "metadata.json").write_text(
            json.dumps({"base_model": generator_id("default")})
        )
    registry = AdapterRegistry(folder)
    registry.promote("a", "default")
    built: list[str | None] = []

    def merge(info: AdapterInfo, settings: DocentSettings) -> Path:
        if info.name == "b":
            raise AdapterError("could not write merged weights for 'b': disk full")
        return info.path / "merged"

    def build(*args: Any, model_path: str | None = None, **kwargs: Any) -> Engine:
        built.append(model_path)
        return ScriptedEngine(f"vllm over {model_path}")

    monkeypatch.setattr(serving_state, "merged_weights", merge)
    monkeypatch.setattr(serving_state, "build_engine", build)
    monkeypatch.setattr(serving_state, "resolve_engine_kind", lambda settings: "vllm")
    settings = DocentSettings(workspace=tmp_path)
    old = ScriptedEngine("old")
    routed = RoutedEngine(old, "a", lambda: ScriptedEngine("hf"))
    unused: Any = None
    state = serving_state.ServingState(
        settings, routed, unused, unused, unused, unused, AdapterCatalog(settings, routed), unused
    )
    state.live = serving_state.LiveAdapter("a")

    registry.promote("b", "default")
    failed = state.follow_promoted(wait=True)
    assert failed.adapter == "a" and failed.error and "disk full" in failed.error
    assert routed.primary is old and not old.closed and built == []
    state.follow_promoted(retry_failed=False)  # the poll does not retry at once
    assert not state._switch or not state._switch.is_alive()

    registry.rollback()  # back to a: nothing to build, the error is cleared
    assert state.follow_promoted(wait=True) == replace(failed, error=None)
    registry.rollback()  # the base model
    assert state.follow_promoted(wait=True).adapter is None
    assert routed.primary_adapter is None and old.closed and built == [None]
    registry.promote("a", "default")
    assert state.follow_promoted(wait=True).adapter == "a"
    assert routed.primary_adapter == "a" and built[-1] == str(folder / "a" / "merged")


def test_a_promotion_is_served_without_a_restart_and_can_be_rolled_back(live_server):
    """The transformers engine resolves the adapter per request: a promotion answers from the
    next request, and POST /v1/adapters/rollback returns to the one promoted before."""
    from docent.models import generator_path
    from docent.settings import DocentSettings
    from raft.adapters import AdapterRegistry

    folder = live_server.settings.workspace / "adapters"
    registry_file = folder / "registry.json"
    saved = registry_file.read_text()  # shared by the session: put back as found
    state = live_server.app.state.docent
    question = {"question": INVITE, "k": 2, "max_tokens": 4}
    try:
        make_lora_adapter(
            folder / "second-lora", generator_path("default", DocentSettings().cache_dir), seed=1
        )
        AdapterRegistry(folder).promote("second-lora", "default")
        with live_server.client() as c:
            answer = c.post("/v1/ask", json=question)
            assert answer.status_code == 200, answer.text
            assert answer.json()["adapter"] == "second-lora"
            assert state.follow_promoted().adapter == "second-lora"
            assert c.get("/readyz").json()["live_adapter"] == "second-lora"
            assert c.post("/v1/adapters/rollback").status_code == 403  # a user key

        with live_server.admin() as c:
            back = c.post("/v1/adapters/rollback")
            assert back.status_code == 200, back.text
            assert back.json()["promoted"] == ADAPTER
            assert back.json()["serving"]["adapter"] == ADAPTER
            ready = c.get("/readyz").json()
            assert ready["adapter"] == ready["live_adapter"] == ADAPTER

            base = c.post("/v1/adapters/rollback").json()
            assert base["promoted"] is None and base["serving"]["adapter"] is None
            empty = c.post("/v1/adapters/rollback")
            assert empty.status_code == 409 and "nothing to roll back" in empty.json()["detail"]
    finally:
        registry_file.write_text(saved)
        shutil.rmtree(folder / "second-lora", ignore_errors=True)
        state.follow_promoted()
    assert state.live.adapter == ADAPTER
