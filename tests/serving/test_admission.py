"""Admission control on its own: bounded running and waiting answers, 429/503 with a
Retry-After, and recovery once the load is gone."""

from __future__ import annotations

import asyncio

import pytest

from serving.admission import Admission, OverloadedError
from serving.metrics import Metrics


def shed_count(metrics: Metrics, reason: str) -> float:
    return metrics.registry.get_sample_value("docent_shed_total", {"reason": reason}) or 0.0


def test_full_queue_is_refused_at_once_and_the_server_recovers():
    metrics = Metrics()

    async def scenario() -> tuple[list[object], int]:
        admission = Admission(max_active=2, max_queued=1, queue_timeout_s=30, metrics=metrics)
        release = asyncio.Event()
        ran = 0

        async def answer() -> str:
            nonlocal ran
            async with admission.slot():
                ran += 1
                await release.wait()
            return "ok"

        tasks = [asyncio.create_task(answer()) for _ in range(5)]
        await asyncio.sleep(0.05)  # 2 run, 1 waits, 2 are refused
        assert (admission.active, admission.waiting) == (2, 1)
        release.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        # Load gone: the next request runs straight away.
        async with admission.slot():
            ran += 1
        return results, ran

    results, ran = asyncio.run(scenario())
    refused = [r for r in results if isinstance(r, OverloadedError)]
    assert results.count("ok") == 3 and len(refused) == 2
    assert all(r.status == 429 and r.retry_after >= 1 for r in refused)
    assert "busy" in str(refused[0])
    assert ran == 4
    assert shed_count(metrics, "queue_full") == 2


def test_waiting_past_the_deadline_is_a_503_with_retry_after():
    metrics = Metrics()

    async def scenario() -> OverloadedError:
        admission = Admission(max_active=1, max_queued=4, queue_timeout_s=0.2, metrics=metrics)
        hold = asyncio.Event()

        async def holder() -> None:
            async with admission.slot():
                await hold.wait()

        task = asyncio.create_task(holder())
        await asyncio.sleep(0.01)
        with pytest.raises(OverloadedError) as caught:
            async with admission.slot():
                pass
        assert admission.waiting == 0  # the timed-out request left the queue
        hold.set()
        await task
        return caught.value

    error = asyncio.run(scenario())
    assert error.status == 503 and error.retry_after >= 1
    assert "within 0.2 s" in str(error)
    assert shed_count(metrics, "queue_timeout") == 1


def test_retry_after_grows_with_the_queue_and_the_service_time():
    admission = Admission(max_active=2, max_queued=10, queue_timeout_s=1)
    admission.service_s = 4.0
    admission.active, admission.waiting = 2, 0
    short = admission.retry_after()
    admission.waiting = 6
    assert admission.retry_after() > short
    admission.service_s = 1e6
    assert admission.retry_after() == 120  # capped: clients never wait hours
    with pytest.raises(ValueError):
        Admission(max_active=0, max_queued=1, queue_timeout_s=1)
