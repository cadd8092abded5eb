"""Admission control for answering requests: a bounded number run at once, a bounded number
wait, and the rest are turned away at once with 429 + ``Retry-After`` instead of piling up
in memory until every client times out. A request that waits longer than the queue timeout
gets 503 + ``Retry-After``: the server is up but cannot serve it soon enough.

Hand-written (a semaphore and two counters): the rate limiters on PyPI limit requests per
second per client, not work in flight, which is what a generating server runs out of.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator

from docent.errors import DocentError
from serving.metrics import Metrics

EWMA_WEIGHT = 0.2  # how fast the service-time estimate follows new requests
MAX_RETRY_AFTER_S = 120


class OverloadedError(DocentError):
    """Too much work queued already (HTTP 429), or a request waited past its deadline (503)."""

    def __init__(self, message: str, retry_after: int, status: int = 429) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.status = status


class Admission:
    def __init__(
        self,
        max_active: int,
        max_queued: int,
        queue_timeout_s: float,
        metrics: Metrics | None = None,
    ) -> None:
        if max_active < 1 or max_queued < 0:
            raise ValueError("max_active must be >= 1 and max_queued >= 0")
        self.max_active = max_active
        self.max_queued = max_queued
        self.queue_timeout_s = queue_timeout_s
        self.metrics = metrics
        self._slots = asyncio.Semaphore(max_active)
        self.admitted = 0  # running + waiting
        self.active = 0
        self.waiting = 0
        self.service_s = 5.0  # a first guess until requests finish

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the queue ahead drained at the observed rate."""
        rounds = (self.waiting + self.active) / self.max_active
        return max(1, min(MAX_RETRY_AFTER_S, math.ceil(self.service_s * rounds)))

    def _shed(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.shed.labels(reason).inc()

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        # Counted before the first await: requests arriving together all see each other.
        if self.admitted >= self.max_active + self.max_queued:
            self._shed("queue_full")
            raise OverloadedError(
                f"the server is busy ({self.active} answers running, {self.waiting} queued): "
                "retry after the Retry-After seconds",
                self.retry_after(),
            )
        self.admitted += 1
        try:
            self.waiting += 1
            try:
                await asyncio.wait_for(self._slots.acquire(), self.queue_timeout_s)
            except TimeoutError:
                self._shed("queue_timeout")
                raise OverloadedError(
                    f"no answer slot came free within {self.queue_timeout_s:g} s: the server "
                    "is overloaded, retry after the Retry-After seconds",
                    self.retry_after(),
                    status=503,
                ) from None
            finally:
                self.waiting -= 1
            self.active += 1
            started = time.monotonic()
            try:
                yield
            finally:
                self.active -= 1
                self._slots.release()
                took = time.monotonic() - started
                self.service_s += EWMA_WEIGHT * (took - self.service_s)
        finally:
            self.admitted -= 1
