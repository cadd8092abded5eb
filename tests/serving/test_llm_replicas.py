"""Several LLM replicas behind the openai engine (docent/engine/replicas.py), against real
servers: fake_llm.py processes on 127.0.0.1 (the one part here we do not own), killed with
SIGKILL and started again on the same port. The pool's timing is shortened so that a test
takes seconds."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from docent.engine import ChatRequest, Completion, EngineUnavailableError, build_engine
from docent.engine.openai_remote import OpenAIEngine
from docent.engine.replicas import ModelNotServedError, ReplicaTiming
from docent.settings import DocentSettings

from conftest import ROOT, free_port

FAKE_LLM = Path(__file__).with_name("fake_llm.py")
REPLY_END = "<ANSWER>: within 30 days"  # how every fake_llm.py answer ends
FAST = ReplicaTiming(
    health_interval_s=0.2,
    backoff_s=0.2,
    max_backoff_s=0.4,
    probe_timeout_s=1.0,
    retry_pause_s=0.05,
    relist_s=0.1,
)


class FakeReplica:
    """One fake_llm.py server on its own port: started, killed, started again."""

    def __init__(self, delay: float = 0.02, models: tuple[str, ...] = ("fake",)) -> None:
        self.port = free_port()
        self.delay = delay
        self.models = models
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> FakeReplica:
        args = [str(FAKE_LLM), str(self.port), str(self.delay), ",".join(self.models)]
        self.proc = subprocess.Popen(
            [sys.executable, *args],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        return self

    def wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fake_llm.py exited: {self.proc.stderr.read()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/models", timeout=1).status_code == 200:
                    return
            assert time.monotonic() < deadline, "fake_llm.py did not start"
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stats(self) -> dict:
        return httpx.get(f"http://127.0.0.1:{self.port}/stats", timeout=5).json()

    def chats(self, model: str = "fake") -> int:
        return int(self.stats()["chats"].get(model, 0))


@contextlib.contextmanager
def replicas(*specs: FakeReplica) -> Iterator[list[FakeReplica]]:
    """Start them all at once (each takes about a second to import its web stack)."""
    try:
        for replica in specs:
            replica.start()
        for replica in specs:
            replica.wait_ready()
        yield list(specs)
    finally:
        for replica in specs:
            replica.kill()


def ask(adapter: str | None = None) -> ChatRequest:
    return ChatRequest([{"role": "user", "content": "Refunds?"}], max_tokens=64, adapter=adapter)


async def streamed(engine: OpenAIEngine, request: ChatRequest) -> tuple[str, Completion]:
    text, completion = "", None
    async for delta in engine.astream(request):
        text += delta.text
        completion = delta.completion or completion
    assert completion is not None
    return text, completion


def wait_until(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def up(engine: OpenAIEngine) -> dict[str, bool]:
    return {state.url: state.up for state in engine.replicas()}


def test_requests_are_spread_by_least_outstanding(tmp_path):
    with replicas(FakeReplica(), FakeReplica()) as (a, b):
        # Through the settings and the factory, as `docent serve --llm-url A --llm-url B` does.
        settings = DocentSettings(
            workspace=tmp_path, engine="openai", llm_url=[a.url, b.url], llm_model="fake"
        )
        engine = build_engine(settings, serving=True)
        assert isinstance(engine, OpenAIEngine)

        async def main() -> tuple[list[Completion], dict[str, int]]:
            # Eight at once on an idle pool: each goes where the fewest are outstanding.
            both = await asyncio.gather(*(engine.agenerate(ask()) for _ in range(8)))
            counts = {"a": a.chats(), "b": b.chats()}
            # One stream held open on one replica: the next plain calls go to the other.
            stream = engine.astream(ask())
            first = await anext(stream)
            assert first.text and [s.outstanding for s in engine.replicas()] in ([1, 0], [0, 1])
            for _ in range(3):
                await engine.agenerate(ask())
            async for _ in stream:
                pass
            return both, {"a": a.chats() - counts["a"], "b": b.chats() - counts["b"]}

        try:
            both, later = asyncio.run(main())
            assert all(c.text.endswith(REPLY_END) for c in both)
            assert a.chats() + b.chats() == 12
            # 4 + 4 of the eight; then the held stream on one (1) and the three on the other.
            assert sorted(later.values()) == [1, 3]
            assert a.chats() - later["a"] == 4 == b.chats() - later["b"]
            assert [s.outstanding for s in engine.replicas()] == [0, 0]
            assert engine.queue_depth() == 0
        finally:
            engine.close()


def test_a_replica_killed_under_load(tmp_path):
    """Three replicas, plain and streamed requests in flight on all of them, one SIGKILLed.
    No request whose text had not started reaching the caller fails: it is tried again on
    another replica. A stream that had already handed text over from the killed replica ends
    with an error that says it broke off and names the server: a retry elsewhere would write
    a different answer after the words already shown. Requests sent after the kill all work."""
    with replicas(*(FakeReplica(delay=0.04) for _ in range(3))) as (a, victim, c):
        engine = OpenAIEngine([a.url, victim.url, c.url], model="fake", timing=FAST)
        outcomes: list[tuple[str, str, bool]] = []  # (kind, "ok" or the error, had text)

        async def plain() -> None:
            try:
                completion = await engine.agenerate(ask())
                text = completion.text
                outcomes.append(("plain", "ok" if text.endswith(REPLY_END) else text, False))
            except EngineUnavailableError as exc:
                outcomes.append(("plain", str(exc), False))

        async def stream() -> None:
            text = ""
            try:
                async for delta in engine.astream(ask()):
                    text += delta.text
                outcomes.append(("stream", "ok" if text.endswith(REPLY_END) else text, True))
            except EngineUnavailableError as exc:
                outcomes.append(("stream", str(exc), bool(text)))

        async def main() -> dict[str, int]:
            first = [asyncio.create_task(plain() if n % 2 else stream()) for n in range(24)]
            # Kill it while it holds both kinds: plain calls (no byte back yet) and streams.
            active: dict[str, int] = {}
            deadline = time.monotonic() + 10
            while not (active.get("plain", 0) >= 1 and active.get("stream", 0) >= 1):
                assert time.monotonic() < deadline, f"the victim never got both kinds: {active}"
                await asyncio.sleep(0.02)
                async with httpx.AsyncClient() as client:
                    stats = await client.get(f"http://127.0.0.1:{victim.port}/stats")
                    active = stats.json()["active"]
            victim.kill()
            after = [asyncio.create_task(plain() if n % 2 else stream()) for n in range(12)]
            await asyncio.gather(*first, *after)
            return active

        try:
            active = asyncio.run(main())
            assert len(outcomes) == 36
            failed = [o for o in outcomes if o[1] != "ok"]
            # Only streams that had text out; each says what happened and where.
            assert all(kind == "stream" and had_text for kind, _, had_text in failed), failed
            for _, error, _ in failed:
                assert "broke off" in error and victim.url in error, error
            # The victim's streams broke (each had sent its first word before the kill); its
            # plain calls were answered elsewhere.
            assert len(failed) >= 1, active
            assert sum(kind == "plain" for kind, *_ in failed) == 0 < active["plain"]
            assert up(engine) == {a.url: True, victim.url: False, c.url: True}
            assert [s.outstanding for s in engine.replicas()] == [0, 0, 0]
        finally:
            engine.close()


def test_a_replica_that_comes_back_is_used_again():
    with replicas(FakeReplica(), FakeReplica()) as (a, b):
        engine = OpenAIEngine(f"{a.url},{b.url}", model="fake", timing=FAST)
        from serving.metrics import Metrics

        metrics = Metrics()
        metrics.watch_replicas(engine.replicas)
        try:
            b.kill()
            # Answered by a alone: b's failures are retried there, then b is left out.
            for _ in range(4):
                assert engine.generate([ask()])[0].text.endswith(REPLY_END)
            assert up(engine) == {a.url: True, b.url: False}
            scrape = metrics.render().decode()
            assert f'docent_llm_replica_up{{replica="{b.url}"}} 0.0' in scrape
            assert f'docent_llm_replica_up{{replica="{a.url}"}} 1.0' in scrape

            b.start().wait_ready()  # the same address again
            wait_until(lambda: up(engine)[b.url], timeout=5)  # within the backoff (0.4 s max)
            assert "docent_llm_replica_outstanding" in metrics.render().decode()

            async def main() -> list[Completion]:
                return await asyncio.gather(*(engine.agenerate(ask()) for _ in range(6)))

            assert all(c.text.endswith(REPLY_END) for c in asyncio.run(main()))
            assert b.chats() == 3  # the restarted b has its share again
        finally:
            engine.close()


def test_adapters_go_only_to_replicas_that_list_them():
    with replicas(FakeReplica(models=("fake", "lora-a")), FakeReplica()) as (a, b):
        engine = OpenAIEngine([a.url, b.url], model="fake", timing=FAST)
        try:

            async def main() -> list[object]:
                adapter = [engine.agenerate(ask("lora-a")) for _ in range(3)]
                adapter += [streamed(engine, ask("lora-a")) for _ in range(3)]
                base = [engine.agenerate(ask()) for _ in range(4)]
                return await asyncio.gather(*adapter, *base)

            results = asyncio.run(main())
            assert len(results) == 10
            # b would answer lora-a with a 404, which would have failed the call.
            assert a.chats("lora-a") == 6 and b.chats("lora-a") == 0
            # a was busy with six: the base model went to the idle b.
            assert b.chats() == 4 and a.chats() == 0
            assert engine.generate([ask("lora-a")])[0].adapter == "lora-a"

            with pytest.raises(ModelNotServedError) as nowhere:
                asyncio.run(streamed(engine, ask("lora-x")))
            message = str(nowhere.value)
            assert "'lora-x'" in message and a.url in message and b.url in message
            assert "lora-a" in message  # what a does serve

            # The one replica with the adapter is down: that adapter cannot be answered, and
            # the error says for which model; the base model still can.
            a.kill()
            with pytest.raises(EngineUnavailableError, match="lora-a") as down:
                engine.generate([ask("lora-a")])
            assert a.url in str(down.value) and "unreachable" in str(down.value)
            assert engine.generate([ask()])[0].text.endswith(REPLY_END)
        finally:
            engine.close()


def test_llm_urls_from_the_environment_and_repeated_options(monkeypatch):
    import typer.main

    from docent import cli

    monkeypatch.setenv("DOCENT_LLM_URL", " http://gpu-1:8001/v1 , http://gpu-2:8001/v1/")
    settings = DocentSettings()
    assert settings.llm_urls == ["http://gpu-1:8001/v1", "http://gpu-2:8001/v1"]
    assert settings.llm_url == "http://gpu-1:8001/v1,http://gpu-2:8001/v1"  # old readers
    one = DocentSettings(llm_url="https://llm.example.com/v1")
    assert one.llm_url == "https://llm.example.com/v1" and one.llm_urls == [one.llm_url]
    monkeypatch.setenv("DOCENT_LLM_URL", "")
    assert DocentSettings().llm_url is None and DocentSettings().llm_urls == []

    # `docent serve --llm-url A --llm-url B,C`, parsed by the real command.
    serve = typer.main.get_command(cli.app).commands["serve"]  # type: ignore[attr-defined]
    args = ["--llm-url", "http://a:1/v1", "--llm-url", "http://b:1/v1,http://c:1/v1"]
    given = serve.make_context("serve", args).params["llm_url"]
    merged = DocentSettings().with_overrides(llm_url=given)
    assert merged.llm_urls == ["http://a:1/v1", "http://b:1/v1", "http://c:1/v1"]
    unset = serve.make_context("serve", []).params["llm_url"]
    monkeypatch.setenv("DOCENT_LLM_URL", "http://env:1/v1")
    assert DocentSettings().with_overrides(llm_url=unset or None).llm_urls == ["http://env:1/v1"]


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("gpu-box:8001/v1", "'gpu-box:8001/v1' is not an http(s) base URL"),
        ("http://a:1/v1,ftp://b/v1", "'ftp://b/v1' is not an http(s) base URL"),
        ("http://a:99999/v1", "is not an http(s) base URL"),
        ("http:///v1", "is not an http(s) base URL"),
        ("http://a:1/v1?key=1", "is not an http(s) base URL"),
        ("http://a:1/v1,,http://b:1/v1", "has an empty entry"),
        ("http://a:1/v1,http://a:1/v1/", "lists http://a:1/v1 twice"),
    ],
)
def test_a_bad_llm_url_says_which_and_how(value, says):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="llm_url") as bad:
        DocentSettings(llm_url=value)
    assert says in str(bad.value)
    with pytest.raises(ValidationError, match="http://gpu-box:8001/v1|single commas|once"):
        DocentSettings().with_overrides(llm_url=[value])
